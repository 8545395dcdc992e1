# OpenGVLab/InternVL3_5-GPT-OSS-20B-A4B: InternViT-300M-448px-V2_5 + gpt-oss-20b (32 experts, 4 per token), template internvl3_5_gpt_oss.
# Download the release directory and point model_path at it (or override with --cfg-options).
_base_ = ["../datasets/llava_sft.py"]

model_path = "InternVL3_5-GPT-OSS-20B-A4B"
model = dict(type="InternVLChat", path=model_path)
train_dataset = dict(max_dynamic_patch=12, max_length=32768)
