# QLoRA fine-tune of OpenGVLab/InternVL2_5-8B (InternViT-300M-448px-V2_5 + internlm2_5-7b-chat, template internvl2_5).
# xtuner's seed recipe: LLM linears in 4-bit nf4 with double quantization (bitsandbytes), LoRA r128 / alpha 256
# on all LLM linears, ViT and mlp1 unquantized, mlp1 trained; the LoRA schedule of this model otherwise.
# 4-bit weights cannot be sharded by ZeRO-3, so QLoRA runs on ZeRO-2 at most.
_base_ = ["./internvl_v2_5_internlm2_5_8b_lora.py"]

model_path = "InternVL2_5-8B"  # the release directory (config.json + weights); edit this
model = dict(path=model_path, lora=dict(llm_rank=128, alpha=256), quantization=dict(llm="nf4"))
runtime = dict(deepspeed="zero1")
