"""Small typed structures shared by the data pipeline and the model (neither imports the other)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "IGNORE_INDEX",
    "IMG_CONTEXT_TOKEN",
    "IMG_START_TOKEN",
    "IMG_END_TOKEN",
    "SPECIAL_TOKENS",
    "Sample",
    "Batch",
]

IGNORE_INDEX = -100
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
# The tokens InternVL adds to every LLM vocabulary, in the official order.
SPECIAL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")


@dataclass
class Sample:
    """One tokenized training sample.

    ``pixel_values`` holds every tile of the sample ([tiles, 3, 448, 448]); a text-only sample has one
    dummy tile whose ``image_flags`` entry is 0, so every rank still runs the ViT.
    """

    input_ids: torch.Tensor  # [seq] long
    labels: torch.Tensor  # [seq] long, IGNORE_INDEX where not trained
    pixel_values: torch.Tensor  # [tiles, 3, H, W] float
    image_flags: torch.Tensor  # [tiles] long, 1 real tile / 0 dummy tile
    source: str = ""  # data source name, for statistics
    index: int = -1  # dataset index
    tiles_reduced: bool = False  # tiles were cut below the budget to fit max_length
    position_ids: torch.Tensor | None = None  # [seq]; set on packed rows (restarts at 0 per sample)
    num_packed: int = 1  # samples in this row (packed rows hold several)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


@dataclass
class Batch:
    """A right-padded batch; tiles of all samples concatenated in sample order."""

    input_ids: torch.Tensor  # [batch, seq]
    labels: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq] 1 = real token
    pixel_values: torch.Tensor  # [tiles, 3, H, W]
    image_flags: torch.Tensor  # [tiles]
    position_ids: torch.Tensor | None = None  # [batch, seq]; restarts per sample when packed

    @property
    def packed(self) -> bool:
        """Packed rows attend within each sample only (block-diagonal, from ``position_ids``)."""
        return self.position_ids is not None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})
