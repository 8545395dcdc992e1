# OpenGVLab/InternVL3_5-241B-A28B: InternViT-6B-448px-V2_5 (5.5B) + Qwen3-235B-A22B (128 experts, 8 per token), template internvl2_5.
# Download the release directory and point model_path at it (or override with --cfg-options).
_base_ = ["../datasets/llava_sft.py"]

model_path = "InternVL3_5-241B-A28B"
model = dict(type="InternVLChat", path=model_path)
train_dataset = dict(max_dynamic_patch=12, max_length=32768)
