# Full fine-tune of OpenGVLab/InternVL3_5-1B (InternViT-300M-448px-V2_5 + Qwen3-0.6B, template internvl2_5).
# Official recipe, OpenGVLab/InternVL internvl_chat_gpt_oss/shell/internvl3_5_qwen3/internvl3_5_1b_sft.sh:
# ViT, mlp1 and LLM trained, lr 8e-05, weight decay 0.05, drop_path 0.0, global batch 512 packed rows of
# 32768 tokens (up to 96 tiles) at 1 per GPU, loss_reduction square, DeepSpeed ZeRO-3; epochs instead of the
# script's 8000 steps (see the schedules/internvl3_5_sft.py base).
_base_ = [
    "../_base_/schedules/internvl3_5_sft.py",
    "../_base_/models/internvl_v3_5_qwen3_1b.py",
]

model_path = "InternVL3_5-1B"  # the release directory (config.json + weights); edit this
model = dict(path=model_path, drop_path_rate=0.0, freeze=dict(vit=False, mlp=False, llm=False))
optim = dict(lr=8e-05, weight_decay=0.05)
