# LoRA fine-tune of OpenGVLab/InternVL2-8B (InternViT-300M + internlm2_5-7b-chat (dynamic NTK rope), template internlm2-chat).
# Official recipe (OpenGVLab/InternVL internvl_chat/shell/internvl2.0/2nd_finetune/internvl2_8b_internlm2_7b_dynamic_res_2nd_finetune_lora.sh): LoRA r16 on the LLM (alpha 2r, dropout 0.05, official
# target modules), ViT frozen, mlp1 trained, lr 4e-05, weight decay 0.05, 4 per GPU, global batch 16
# on 2 GPUs, DeepSpeed ZeRO-2.
_base_ = [
    "../_base_/default_runtime.py",
    "../_base_/schedules/lora.py",
    "../_base_/models/internvl_v2_internlm2_5_8b.py",
]

model_path = "InternVL2-8B"  # the release directory (config.json + weights); edit this
model = dict(path=model_path, freeze=dict(vit=True, mlp=False), lora=dict(llm_rank=16, dropout=0.05))
optim = dict(lr=4e-05, weight_decay=0.05)
schedule = dict(global_batch_size=16, micro_batch_size=4)
runtime = dict(deepspeed="zero2")
