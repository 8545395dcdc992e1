# OpenGVLab/InternVL2-1B: InternViT-300M + Qwen2-0.5B-Instruct, template Hermes-2.
# Download the release directory and point model_path at it (or override with --cfg-options).
_base_ = ["../datasets/llava_sft.py"]

model_path = "InternVL2-1B"
model = dict(type="InternVLChat", path=model_path)
train_dataset = dict(max_dynamic_patch=6)  # official fine-tune tile budget for this release
