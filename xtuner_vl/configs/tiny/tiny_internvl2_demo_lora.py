# `xtuner-vl demo`: LoRA on the tiny InternVL2 (InternLM2 family) that the demo writes, on CPU.
# The tiny tokenizer and model learn from scratch, so the learning rate is far above a real model's
# and each scene is one tile (no dynamic tiling: it keeps the run to a few minutes on 2 cores).
_base_ = ["./tiny_internvl2_lora.py"]

model = dict(gradient_checkpointing=False, lora=dict(llm_rank=16))  # official LoRA rank; tiny activations
train_dataset = dict(max_length=1024, max_dynamic_patch=1)
optim = dict(lr=3e-3, weight_decay=0.0)
# One process takes the whole step: tiny models cost per call, not per sample, so one rank with 4 samples does the
# work of two ranks with 2 each in about the same time and half the CPU.
schedule = dict(global_batch_size=4, micro_batch_size=4, epochs=1, warmup_ratio=0.1)
dataloader = dict(num_workers=0, group_by_length=False)
runtime = dict(log_interval=50, save_steps=100000, keep_last=1)
