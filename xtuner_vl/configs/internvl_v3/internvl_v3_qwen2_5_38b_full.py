# Full fine-tune of OpenGVLab/InternVL3-38B (InternViT-6B-448px-V2_5 + Qwen2.5-32B, template internvl2_5).
# Official recipe, OpenGVLab/InternVL internvl_chat/shell/internvl3.0/2nd_finetune/internvl3_38b_dynamic_res_2nd_finetune_full.sh:
# ViT frozen, mlp1 + LLM trained, lr 2e-05, weight decay 0.05, drop_path 0.2, 2 per GPU, global batch
# 128 on 16 GPUs, 12 tiles, max_seq_length 16384, DeepSpeed ZeRO-3.
_base_ = [
    "../_base_/default_runtime.py",
    "../_base_/schedules/full.py",
    "../_base_/models/internvl_v3_qwen2_5_38b.py",
]

model_path = "InternVL3-38B"  # the release directory (config.json + weights); edit this
model = dict(path=model_path, drop_path_rate=0.2, freeze=dict(vit=True, mlp=False, llm=False))
optim = dict(lr=2e-05, weight_decay=0.05)
schedule = dict(global_batch_size=128, micro_batch_size=2)
runtime = dict(deepspeed="zero3")
