# OpenGVLab/InternVL-Chat-V1-5: InternViT-6B-448px-V1-5 + internlm2-chat-20b, template internlm2-chat.
# Download the release directory and point model_path at it (or override with --cfg-options).
_base_ = ["../datasets/llava_sft.py"]

model_path = "InternVL-Chat-V1-5"
model = dict(type="InternVLChat", path=model_path)
train_dataset = dict(max_dynamic_patch=12, template_version="internvl1_5")  # V1.5 tile budget and system messages
