# LoRA fine-tune of OpenGVLab/InternVL3_5-GPT-OSS-20B-A4B (InternViT-300M-448px-V2_5 + gpt-oss-20b (32 experts, 4 per token), template internvl3_5_gpt_oss).
# The official repository has no InternVL3.5 LoRA script (OpenGVLab/InternVL#1189); this takes its SFT data
# settings and loss (OpenGVLab/InternVL internvl_chat_gpt_oss/shell/internvl3_5_gpt_oss/internvl3_5_gpt_oss_20b_stage2_sft.sh:
# packed rows of 32768 tokens, loss_reduction square) and the InternVL2.5 LoRA method (internvl_chat/shell/internvl2.5/2nd_finetune/*_lora.sh:
# r16, alpha 2r, ViT frozen, lr 2e-05, weight decay 0.05), global batch 16 rows, 1 per GPU, DeepSpeed ZeRO-2.
# LoRA wraps attention and both fused 3-D expert weights (mlp.experts.gate_up_proj / down_proj: parameters, not
# linears, adapted through peft's target_parameters; the router stays frozen, see docs/en/models.md). mlp1 trains, as
# in the other LoRA configs here.
_base_ = [
    "../_base_/schedules/internvl3_5_sft.py",
    "../_base_/models/internvl_v3_5_gpt_oss_20b_a4b.py",
]

model_path = "InternVL3_5-GPT-OSS-20B-A4B"  # the release directory (config.json + weights); edit this
# dropout 0.0, not the official 0.05: peft's target_parameters adapters (the experts) take no dropout
model = dict(path=model_path, freeze=dict(vit=True, mlp=False), lora=dict(llm_rank=16, dropout=0.0))
optim = dict(lr=2e-05, weight_decay=0.05)
schedule = dict(global_batch_size=16, micro_batch_size=1)
runtime = dict(deepspeed="zero2")
