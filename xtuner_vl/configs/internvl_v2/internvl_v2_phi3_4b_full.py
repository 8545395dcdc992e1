# Full fine-tune of OpenGVLab/InternVL2-4B (InternViT-300M + Phi-3-mini-128k (su rope), template phi3-chat).
# Official recipe (OpenGVLab/InternVL internvl_chat/shell/internvl2.0/2nd_finetune/internvl2_4b_phi3_3_8b_dynamic_res_2nd_finetune_full.sh): ViT frozen, mlp1 + LLM
# trained, lr 4e-05, weight decay 0.01, drop_path 0.1, 4 per GPU, global batch 128 on 8 GPUs,
# DeepSpeed ZeRO-1.
_base_ = [
    "../_base_/default_runtime.py",
    "../_base_/schedules/full.py",
    "../_base_/models/internvl_v2_phi3_4b.py",
]

model_path = "InternVL2-4B"  # the release directory (config.json + weights); edit this
model = dict(path=model_path, drop_path_rate=0.1, freeze=dict(vit=True, mlp=False, llm=False))
optim = dict(lr=4e-05, weight_decay=0.01)
schedule = dict(global_batch_size=128, micro_batch_size=4)
runtime = dict(deepspeed="zero1")
