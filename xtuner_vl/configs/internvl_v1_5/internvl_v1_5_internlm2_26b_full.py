# Full fine-tune of OpenGVLab/InternVL-Chat-V1-5 (InternViT-6B-448px-V1-5 + internlm2-chat-20b, template internlm2-chat).
# Official recipe (OpenGVLab/InternVL internvl_chat/shell/internvl1.5/2nd_finetune/internvl_chat_v1_5_internlm2_20b_dynamic_res_2nd_finetune_full.sh): ViT frozen, mlp1 + LLM
# trained, lr 2e-05, weight decay 0.05, drop_path 0.4, 2 per GPU, global batch 128 on 8 GPUs,
# DeepSpeed ZeRO-3.
_base_ = [
    "../_base_/default_runtime.py",
    "../_base_/schedules/full.py",
    "../_base_/models/internvl_v1_5_internlm2_26b.py",
]

model_path = "InternVL-Chat-V1-5"  # the release directory (config.json + weights); edit this
model = dict(path=model_path, drop_path_rate=0.4, freeze=dict(vit=True, mlp=False, llm=False))
optim = dict(lr=2e-05, weight_decay=0.05)
schedule = dict(global_batch_size=128, micro_batch_size=2)
runtime = dict(deepspeed="zero3")
