# OpenGVLab/InternVL3-38B: InternViT-6B-448px-V2_5 + Qwen2.5-32B, template internvl2_5.
# Download the release directory and point model_path at it (or override with --cfg-options).
_base_ = ["../datasets/llava_sft.py"]

model_path = "InternVL3-38B"
model = dict(type="InternVLChat", path=model_path)
train_dataset = dict(max_dynamic_patch=12, max_length=16384)
