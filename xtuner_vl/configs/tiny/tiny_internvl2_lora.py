# Tiny CPU config used by the tests and the demo: a tiny official-format InternVL2 (InternLM2
# family) written by `xtuner-vl make-tiny internvl2-2b DIR`, synthetic data, LoRA r8, fp32 on CPU.
_base_ = ["../_base_/default_runtime.py", "../_base_/datasets/llava_sft.py", "../_base_/schedules/lora.py"]

model_path = "work_dirs/tiny/internvl2-2b"

model = dict(
    type="InternVLChat",
    path=model_path,
    dtype="auto",
    gradient_checkpointing=True,
    freeze=dict(vit=True),
    lora=dict(llm_rank=8),
)
train_dataset = dict(
    data_paths=["work_dirs/tiny/data/data.jsonl"],
    image_folders=["work_dirs/tiny/data/images"],
    repeat_times=[1.0],
    max_length=2048,
    max_dynamic_patch=2,
)
optim = dict(lr=2e-3, weight_decay=0.0)
schedule = dict(global_batch_size=4, micro_batch_size=2, epochs=2, warmup_ratio=0.1)
dataloader = dict(num_workers=0)
runtime = dict(save_steps=4, log_interval=1, keep_last=2)
