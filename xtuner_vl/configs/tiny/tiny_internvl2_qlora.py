# Tiny QLoRA: LLM linears in nf4 + double quant (bitsandbytes), LoRA r8 on top; ViT and mlp1 unquantized.
_base_ = ["./tiny_internvl2_lora.py"]
model = dict(quantization=dict(llm="nf4"))
