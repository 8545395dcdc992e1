"""Training checkpoints -> shareable models: merged official weights (streamed) and peft adapters."""

from xtuner_vl.checkpoint.adapter import ADAPTER_DIRS, NON_LORA_FILE, export_adapters
from xtuner_vl.checkpoint.delta import (
    LoraPair,
    TrainedDelta,
    check_against_base,
    merge_lora_weight,
    official_name,
    split_delta,
)
from xtuner_vl.checkpoint.official import DTYPE_NAMES, DTYPES, converted_config, export_official
from xtuner_vl.checkpoint.stream import ShardWriter, base_shapes, iter_base_tensors
from xtuner_vl.checkpoint.trained import CheckpointError, TrainedCheckpoint, materialize, read_trained_checkpoint

__all__ = [
    "ADAPTER_DIRS",
    "DTYPES",
    "DTYPE_NAMES",
    "NON_LORA_FILE",
    "CheckpointError",
    "LoraPair",
    "ShardWriter",
    "TrainedCheckpoint",
    "TrainedDelta",
    "base_shapes",
    "check_against_base",
    "converted_config",
    "export_adapters",
    "export_official",
    "iter_base_tensors",
    "materialize",
    "merge_lora_weight",
    "official_name",
    "read_trained_checkpoint",
    "split_delta",
]
