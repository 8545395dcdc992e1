# LoRA fine-tune of OpenGVLab/InternVL2-Llama3-76B (InternViT-6B + Hermes-2-Theta-Llama-3-70B, template
# internlm2-chat). Official recipe, OpenGVLab/InternVL internvl_chat/shell/internvl2.0/2nd_finetune/
# internvl2_76b_hermes2_llama3_70b_dynamic_res_2nd_finetune_lora.sh: LoRA r16 on the LLM (alpha 2r, dropout
# 0.05, official target modules), ViT frozen, lr 2e-05, weight decay 0.05, 1 per GPU, global batch 16 on 8 GPUs,
# DeepSpeed ZeRO-3 (zero_stage3_config_100b.json). As in the other LoRA configs here mlp1 trains; the script
# freezes it (--freeze_mlp True): set freeze=dict(mlp=True) for the script's exact method.
_base_ = [
    "../_base_/default_runtime.py",
    "../_base_/schedules/lora.py",
    "../_base_/models/internvl_v2_llama3_76b.py",
]

model_path = "InternVL2-Llama3-76B"  # the release directory (config.json + weights); edit this
model = dict(path=model_path, freeze=dict(vit=True, mlp=False), lora=dict(llm_rank=16, dropout=0.05))
optim = dict(lr=2e-05, weight_decay=0.05)
schedule = dict(global_batch_size=16, micro_batch_size=1)
runtime = dict(deepspeed="zero3")
