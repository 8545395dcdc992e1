# OpenGVLab/InternVL2-40B: InternViT-6B + Nous-Hermes-2-Yi-34B (Llama architecture), template Hermes-2.
# Download the release directory and point model_path at it (or override with --cfg-options).
_base_ = ["../datasets/llava_sft.py"]

model_path = "InternVL2-40B"
model = dict(type="InternVLChat", path=model_path)
train_dataset = dict(max_dynamic_patch=6)  # official fine-tune tile budget for this release
