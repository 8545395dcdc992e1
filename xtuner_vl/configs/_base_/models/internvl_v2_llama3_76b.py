# OpenGVLab/InternVL2-Llama3-76B: InternViT-6B + Hermes-2-Theta-Llama-3-70B, template internlm2-chat.
# Download the release directory and point model_path at it (or override with --cfg-options).
_base_ = ["../datasets/llava_sft.py"]

model_path = "InternVL2-Llama3-76B"
model = dict(type="InternVLChat", path=model_path)
train_dataset = dict(max_dynamic_patch=6)  # official fine-tune tile budget for this release
