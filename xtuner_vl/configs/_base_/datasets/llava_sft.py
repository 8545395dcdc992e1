# LLaVA-style sources: one entry per source in each list. Edit data_paths / image_folders /
# repeat_times in your leaf config. Template, tokens per tile and thumbnail come from the model's
# config.json unless set here.
train_dataset = dict(
    type="InternVLDataset",
    data_paths=["data/llava_instruct.jsonl"],
    image_folders=["data/images"],
    repeat_times=[1.0],
    max_length=4096,  # official max_seq_length
    min_dynamic_patch=1,
    max_dynamic_patch=6,  # InternVL2 fine-tune recipes (V1.5: 12)
    template_version="internvl2",
)
