# QLoRA fine-tune of OpenGVLab/InternVL2-40B (InternViT-6B + Nous-Hermes-2-Yi-34B, template Hermes-2).
# xtuner's seed recipe: LLM linears in 4-bit nf4 with double quantization (bitsandbytes), LoRA r128 / alpha 256
# on all LLM linears, ViT and mlp1 unquantized, mlp1 trained; the LoRA schedule of this model otherwise
# (internvl2_40b_hermes2_yi_34b_dynamic_res_2nd_finetune_lora.sh). Each linear is quantized on the GPU as it is
# read. 4-bit weights cannot be sharded by ZeRO-3, so QLoRA runs on ZeRO-2 at most.
_base_ = ["./internvl_v2_yi_40b_lora.py"]

model_path = "InternVL2-40B"  # the release directory (config.json + weights); edit this
model = dict(path=model_path, lora=dict(llm_rank=128, alpha=256), quantization=dict(llm="nf4"))
runtime = dict(deepspeed="zero2")
