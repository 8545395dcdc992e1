# QLoRA fine-tune of OpenGVLab/InternVL2-4B (InternViT-300M + Phi-3-mini-128k (su rope), template phi3-chat).
# xtuner's seed recipe: LLM linears in 4-bit nf4 with double quantization (bitsandbytes), LoRA r128 / alpha 256
# on all LLM linears, ViT and mlp1 unquantized, mlp1 trained; the LoRA schedule of this model otherwise.
# 4-bit weights cannot be sharded by ZeRO-3, so QLoRA runs on ZeRO-2 at most.
_base_ = ["./internvl_v2_phi3_4b_lora.py"]

model_path = "InternVL2-4B"  # the release directory (config.json + weights); edit this
model = dict(path=model_path, lora=dict(llm_rank=128, alpha=256), quantization=dict(llm="nf4"))
runtime = dict(deepspeed="zero1")
