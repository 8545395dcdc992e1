# OpenGVLab/InternVL2-8B: InternViT-300M + internlm2_5-7b-chat (dynamic NTK rope), template internlm2-chat.
# Download the release directory and point model_path at it (or override with --cfg-options).
_base_ = ["../datasets/llava_sft.py"]

model_path = "InternVL2-8B"
model = dict(type="InternVLChat", path=model_path)
train_dataset = dict(max_dynamic_patch=6)  # official fine-tune tile budget for this release
