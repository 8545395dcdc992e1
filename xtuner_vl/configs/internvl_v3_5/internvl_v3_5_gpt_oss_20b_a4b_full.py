# Full fine-tune of OpenGVLab/InternVL3_5-GPT-OSS-20B-A4B (InternViT-300M-448px-V2_5 + gpt-oss-20b (32 experts, 4 per token), template internvl3_5_gpt_oss).
# Official recipe, OpenGVLab/InternVL internvl_chat_gpt_oss/shell/internvl3_5_gpt_oss/internvl3_5_gpt_oss_20b_stage2_sft.sh:
# ViT, mlp1 and LLM trained, lr 8e-05, weight decay 0.05, drop_path 0.1, global batch 512 packed rows of
# 32768 tokens (up to 96 tiles) at 1 per GPU, loss_reduction square, DeepSpeed ZeRO-3, router logits on (the
# router loss weighted by the checkpoint's router_aux_loss_coef); epochs instead of the script's 8000 steps (see the
# schedules/internvl3_5_sft.py base). Attention runs eager (the learned sinks; see docs/en/models.md).
_base_ = [
    "../_base_/schedules/internvl3_5_sft.py",
    "../_base_/models/internvl_v3_5_gpt_oss_20b_a4b.py",
]

model_path = "InternVL3_5-GPT-OSS-20B-A4B"  # the release directory (config.json + weights); edit this
model = dict(path=model_path, drop_path_rate=0.1, freeze=dict(vit=False, mlp=False, llm=False))
optim = dict(lr=8e-05, weight_decay=0.05)
