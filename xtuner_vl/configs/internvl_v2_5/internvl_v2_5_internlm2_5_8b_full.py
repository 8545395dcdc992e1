# Full fine-tune of OpenGVLab/InternVL2_5-8B (InternViT-300M-448px-V2_5 + internlm2_5-7b-chat, template internvl2_5).
# Official recipe, OpenGVLab/InternVL internvl_chat/shell/internvl2.5/2nd_finetune/internvl2_5_8b_dynamic_res_2nd_finetune_full.sh:
# ViT frozen, mlp1 + LLM trained, lr 4e-05, weight decay 0.05, drop_path 0.1, 4 per GPU, global batch 128 on
# 8 GPUs, 6 tiles, max_seq_length 8192, DeepSpeed ZeRO-1.
_base_ = [
    "../_base_/default_runtime.py",
    "../_base_/schedules/full.py",
    "../_base_/models/internvl_v2_5_internlm2_5_8b.py",
]

model_path = "InternVL2_5-8B"  # the release directory (config.json + weights); edit this
model = dict(path=model_path, drop_path_rate=0.1, freeze=dict(vit=True, mlp=False, llm=False))
optim = dict(lr=4e-05, weight_decay=0.05)
schedule = dict(global_batch_size=128, micro_batch_size=4)
runtime = dict(deepspeed="zero1")
