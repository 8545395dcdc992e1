# OpenGVLab/InternVL2-4B: InternViT-300M + Phi-3-mini-128k (su rope), template phi3-chat.
# Download the release directory and point model_path at it (or override with --cfg-options).
_base_ = ["../datasets/llava_sft.py"]

model_path = "InternVL2-4B"
model = dict(type="InternVLChat", path=model_path)
train_dataset = dict(max_dynamic_patch=6)  # official fine-tune tile budget for this release
