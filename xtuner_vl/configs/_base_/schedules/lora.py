# Official InternVL2 LoRA recipe (2nd_finetune/*_lora.sh): 2 GPUs, global batch 16, 4 per device,
# lr 4e-5, wd 0.01 (8B / 26B: 0.05), warmup 3%, cosine, 1 epoch; LoRA r=16, alpha=2r, dropout 0.05.
optim = dict(lr=4e-5, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8, max_grad_norm=1.0)
schedule = dict(global_batch_size=16, micro_batch_size=4, epochs=1, warmup_ratio=0.03)
