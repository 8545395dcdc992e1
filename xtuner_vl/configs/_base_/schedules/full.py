# Official InternVL2 full fine-tune recipe (internvl_chat/shell/internvl2.0/2nd_finetune/*_full.sh):
# AdamW (0.9, 0.999, eps 1e-8), lr 4e-5, wd 0.01 (8B / 26B: 0.05), warmup 3%, cosine, 1 epoch,
# global batch 128 = 8 GPUs x 4 per device x 4 accumulation (26B: 2 per device), clip 1.0.
optim = dict(lr=4e-5, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8, max_grad_norm=1.0)
schedule = dict(global_batch_size=128, micro_batch_size=4, epochs=1, warmup_ratio=0.03)
