# QLoRA fine-tune of OpenGVLab/InternVL3_5-GPT-OSS-20B-A4B (InternViT-300M-448px-V2_5 + gpt-oss-20b (32 experts, 4 per token), template internvl3_5_gpt_oss).
# xtuner's seed recipe: LLM linears in 4-bit nf4 with double quantization (bitsandbytes), LoRA r128 / alpha 256,
# ViT and mlp1 unquantized, mlp1 trained; the LoRA schedule of this model otherwise. GPT-OSS's experts are fused
# 3-D weights, not linears: only attention is 4-bit; the experts stay in bf16 and get LoRA too (peft's
# target_parameters), so the LLM adapter has no dropout (0.0, inherited from the LoRA config).
# 4-bit weights cannot be sharded by ZeRO-3, so QLoRA runs on ZeRO-2 at most.
_base_ = ["./internvl_v3_5_gpt_oss_20b_a4b_lora.py"]

model_path = "InternVL3_5-GPT-OSS-20B-A4B"  # the release directory (config.json + weights); edit this
model = dict(path=model_path, lora=dict(llm_rank=128, alpha=256), quantization=dict(llm="nf4"))
runtime = dict(deepspeed="zero2")
