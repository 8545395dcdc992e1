# OpenGVLab/InternVL3_5-4B: InternViT-300M-448px-V2_5 + Qwen3-4B, template internvl2_5.
# Download the release directory and point model_path at it (or override with --cfg-options).
_base_ = ["../datasets/llava_sft.py"]

model_path = "InternVL3_5-4B"
model = dict(type="InternVLChat", path=model_path)
train_dataset = dict(max_dynamic_patch=12, max_length=32768)
