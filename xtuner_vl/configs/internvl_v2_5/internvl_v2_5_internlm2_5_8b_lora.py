# LoRA fine-tune of OpenGVLab/InternVL2_5-8B (InternViT-300M-448px-V2_5 + internlm2_5-7b-chat, template internvl2_5).
# Official recipe, OpenGVLab/InternVL internvl_chat/shell/internvl2.5/2nd_finetune/internvl2_5_8b_dynamic_res_2nd_finetune_lora.sh:
# LoRA r16 on the LLM (alpha 2r, dropout 0.05, official target modules), ViT frozen, lr 4e-05, weight decay
# 0.05, 4 per GPU, global batch 16 on 2 GPUs, DeepSpeed ZeRO-1. As in the other LoRA configs here mlp1 trains;
# the script freezes it (--freeze_mlp True): set freeze=dict(mlp=True) for the script's exact method.
_base_ = [
    "../_base_/default_runtime.py",
    "../_base_/schedules/lora.py",
    "../_base_/models/internvl_v2_5_internlm2_5_8b.py",
]

model_path = "InternVL2_5-8B"  # the release directory (config.json + weights); edit this
model = dict(path=model_path, freeze=dict(vit=True, mlp=False), lora=dict(llm_rank=16, dropout=0.05))
optim = dict(lr=4e-05, weight_decay=0.05)
schedule = dict(global_batch_size=16, micro_batch_size=4)
runtime = dict(deepspeed="zero1")
