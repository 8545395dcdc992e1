# LoRA fine-tune of OpenGVLab/InternVL2-2B (InternViT-300M + internlm2-chat-1_8b, template internlm2-chat).
# Official recipe (OpenGVLab/InternVL internvl_chat/shell/internvl2.0/2nd_finetune/internvl2_2b_internlm2_1_8b_dynamic_res_2nd_finetune_lora.sh): LoRA r16 on the LLM (alpha 2r, dropout 0.05, official
# target modules), ViT frozen, mlp1 trained, lr 4e-05, weight decay 0.01, 4 per GPU, global batch 16
# on 2 GPUs, DeepSpeed ZeRO-1.
_base_ = [
    "../_base_/default_runtime.py",
    "../_base_/schedules/lora.py",
    "../_base_/models/internvl_v2_internlm2_2b.py",
]

model_path = "InternVL2-2B"  # the release directory (config.json + weights); edit this
model = dict(path=model_path, freeze=dict(vit=True, mlp=False), lora=dict(llm_rank=16, dropout=0.05))
optim = dict(lr=4e-05, weight_decay=0.01)
schedule = dict(global_batch_size=16, micro_batch_size=4)
runtime = dict(deepspeed="zero1")
