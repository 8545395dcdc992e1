# LoRA fine-tune of OpenGVLab/InternVL3_5-38B (InternViT-6B-448px-V2_5 (5.5B) + Qwen3-32B, template internvl2_5).
# The official repository has no InternVL3.5 LoRA script (OpenGVLab/InternVL#1189); this takes its SFT data
# settings and loss (OpenGVLab/InternVL internvl_chat_gpt_oss/shell/internvl3_5_qwen3/internvl3_5_38b_sft.sh: packed rows of 32768 tokens,
# loss_reduction square) and the InternVL2.5 LoRA method (internvl_chat/shell/internvl2.5/2nd_finetune/*_lora.sh:
# r16, alpha 2r, dropout 0.05, ViT frozen, lr 2e-05, weight decay 0.05), global batch 16 rows, 1 per GPU,
# DeepSpeed ZeRO-3. mlp1 trains, as in the other LoRA configs here.
_base_ = [
    "../_base_/schedules/internvl3_5_sft.py",
    "../_base_/models/internvl_v3_5_qwen3_38b.py",
]

model_path = "InternVL3_5-38B"  # the release directory (config.json + weights); edit this
model = dict(path=model_path, freeze=dict(vit=True, mlp=False), lora=dict(llm_rank=16, dropout=0.05))
optim = dict(lr=2e-05, weight_decay=0.05)
schedule = dict(global_batch_size=16, micro_batch_size=1)
runtime = dict(deepspeed="zero3")
