# Official InternVL3.5 SFT recipe (OpenGVLab/InternVL internvl_chat_gpt_oss/shell/internvl3_5_qwen3/*_sft.sh):
# AdamW (0.9, 0.999, eps 1e-8), lr 8e-5 (241B-A28B: 2e-5), wd 0.05, warmup 3%, cosine, global batch 512 packed
# rows of 1 per device, packed data (--use_packed_ds: 32768 tokens, up to 96 images per row), every token weighted
# 1/sqrt(its sample's trained tokens) (--loss_reduction square), ZeRO-3, bf16, gradient checkpointing, ViT, mlp1 and
# LLM all trained. The scripts stop at --max_steps 8000 of the official SFT corpus; a fine-tune of your data runs
# epochs instead (set schedule.max_steps for a step budget).
_base_ = ["../default_runtime.py"]

optim = dict(lr=8e-5, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8, max_grad_norm=1.0)
schedule = dict(global_batch_size=512, micro_batch_size=1, epochs=1, warmup_ratio=0.03, loss_reduction="square")
dataloader = dict(pack=True, pack_length=32768, pack_max_tiles=96)
runtime = dict(deepspeed="zero3")  # the model sections set 32768 tokens per sample and 12 tiles
