# Tiny full fine-tune (mlp1 + LLM trained, ViT frozen) for CPU tests.
_base_ = ["./tiny_internvl2_lora.py"]
model = dict(lora=None)
optim = dict(lr=1e-3)
