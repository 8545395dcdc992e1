# Runtime shared by every config: checkpoints, logging, seed, skip tolerance.
runtime = dict(
    seed=42,
    save_steps=500,  # checkpoint every N optimizer steps (and at the end)
    keep_last=2,  # complete checkpoints kept on disk
    log_interval=10,  # log line every N steps
    max_skip_fraction=0.01,  # stop when more than 1% of the samples seen were unusable
    deepspeed=None,  # set by --deepspeed, or a preset name / json path here
)
dataloader = dict(num_workers=4, group_by_length=True, group_factor=50)  # official: group_by_length
