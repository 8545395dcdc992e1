# Full fine-tune of OpenGVLab/InternVL2-26B (InternViT-6B + internlm2-chat-20b, template internlm2-chat).
# Official recipe (OpenGVLab/InternVL internvl_chat/shell/internvl2.0/2nd_finetune/internvl2_26b_internlm2_20b_dynamic_res_2nd_finetune_full.sh): ViT frozen, mlp1 + LLM
# trained, lr 2e-05, weight decay 0.05, drop_path 0.4, 2 per GPU, global batch 128 on 8 GPUs,
# DeepSpeed ZeRO-3.
_base_ = [
    "../_base_/default_runtime.py",
    "../_base_/schedules/full.py",
    "../_base_/models/internvl_v2_internlm2_26b.py",
]

model_path = "InternVL2-26B"  # the release directory (config.json + weights); edit this
model = dict(path=model_path, drop_path_rate=0.4, freeze=dict(vit=True, mlp=False, llm=False))
optim = dict(lr=2e-05, weight_decay=0.05)
schedule = dict(global_batch_size=128, micro_batch_size=2)
runtime = dict(deepspeed="zero3")
