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
    packed_indices: tuple[int, ...] = ()  # dataset indices of a packed row's samples

    @property
    def indices(self) -> tuple[int, ...]:
        """Dataset indices of the samples in this sample (or packed row)."""
        return self.packed_indices or (self.index,)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


@dataclass
class Batch:
    """A right-padded batch; tiles of all samples concatenated in sample order.

    Besides the padded tensors, collate computes on the CPU what the step would otherwise read back
    from the device: sequence boundaries for variable-length attention, the trained positions and their
    targets, the ``<IMG_CONTEXT>`` positions and the token counts. Positions are flat indices into the
    ``[batch * seq]`` grid of ``input_ids``.
    """

    input_ids: torch.Tensor  # [batch, seq]
    labels: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq] 1 = real token
    pixel_values: torch.Tensor  # [tiles, 3, H, W]
    image_flags: torch.Tensor  # [tiles]; stays on the host (see ``to``)
    # [batch, seq]: restarting at 0 for every sample and for every row's padding tail. None: 0, 1, ...
    position_ids: torch.Tensor | None = None
    packed: bool = False  # rows hold several samples, which must attend only within themselves
    # Variable-length attention: every sample and every padding tail of the flattened rows is a
    # segment; cu_seqlens [segments + 1] int32 are their cumulative lengths, max_seqlen the longest.
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    loss_index: torch.Tensor | None = None  # flat positions t whose token t + 1 is trained, same sample
    loss_targets: torch.Tensor | None = None  # the token ids t + 1 of loss_index
    # float32 weight of each loss_index position (``loss_reduction`` sample / square); None: 1 each (token)
    loss_weights: torch.Tensor | None = None
    image_token_index: torch.Tensor | None = None  # flat positions of <IMG_CONTEXT>; None: found on device
    num_tokens: int = 0  # real (unpadded) tokens
    num_trained: int = 0  # == len(loss_index)
    loss_weight_sum: float = 0.0  # == sum(loss_weights) in float64, num_trained when loss_weights is None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Tensors on ``device``; ``image_flags`` stays where it is, so the model can pick real tiles
        without reading a device tensor back."""
        moved = {
            k: v.to(device, non_blocking=non_blocking)
            for k, v in self.__dict__.items()
            if isinstance(v, torch.Tensor) and k != "image_flags"
        }
        return Batch(**{**self.__dict__, **moved})

    def pin_memory(self) -> Batch:
        """Page-locked copies (DataLoader ``pin_memory=True``), for asynchronous host-to-device copies."""
        return Batch(**{k: (v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})
