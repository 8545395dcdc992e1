# LoRA fine-tune of OpenGVLab/InternVL3-8B (InternViT-300M-448px-V2_5 + Qwen2.5-7B, template internvl2_5).
# The official repository has no InternVL3 LoRA script; this follows its InternVL2.5 LoRA recipe for the
# same LLM size (OpenGVLab/InternVL internvl_chat/shell/internvl2.5/2nd_finetune/*_lora.sh): LoRA r16 on the LLM (alpha 2r, dropout 0.05,
# official target modules), ViT frozen, lr 4e-05, weight decay 0.05, 4 per GPU, global batch 16,
# DeepSpeed ZeRO-1, with InternVL3's data settings (12 tiles, 16384 tokens). mlp1 trains, as in the
# other LoRA configs here (the 2.5 scripts freeze it: set freeze=dict(mlp=True) for theirs).
_base_ = [
    "../_base_/default_runtime.py",
    "../_base_/schedules/lora.py",
    "../_base_/models/internvl_v3_qwen2_5_8b.py",
]

model_path = "InternVL3-8B"  # the release directory (config.json + weights); edit this
model = dict(path=model_path, freeze=dict(vit=True, mlp=False), lora=dict(llm_rank=16, dropout=0.05))
optim = dict(lr=4e-05, weight_decay=0.05)
schedule = dict(global_batch_size=16, micro_batch_size=4)
runtime = dict(deepspeed="zero1")
