"""InternVL chat model: InternViT -> pixel shuffle -> ``mlp1`` -> ``<IMG_CONTEXT>`` splice -> LLM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from xtuner_vl.model.configuration import InternVLConfig
from xtuner_vl.model.intern_vit import InternVisionModel
from xtuner_vl.model.llm import build_llm
from xtuner_vl.structures import IGNORE_INDEX

__all__ = ["InternVLChatModel", "InternVLOutput", "pixel_shuffle", "IGNORE_INDEX"]


def pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5, version: str = "v2") -> torch.Tensor:
    """Space-to-depth on a ``[n, w, h, c]`` feature map, as the official ``pixel_shuffle``.

    ``v1`` returns the transposed map the early InternVL 1.5 models were trained with; ``v2`` (and
    transformers' native InternVL) permutes it back.
    """
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    if version == "v2":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


@dataclass
class InternVLOutput:
    """``logits`` [batch, seq, vocab]; ``loss`` the mean cross-entropy over trained tokens (or None)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    cache: Any = None


class InternVLChatModel(nn.Module):
    """The official InternVLChatModel architecture with its parameter names (``vision_model``,
    ``mlp1``, ``language_model``), running on transformers 5 without remote code."""

    def __init__(
        self,
        config: InternVLConfig,
        vision_model: InternVisionModel,
        language_model: PreTrainedModel,
        img_context_token_id: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.vision_model = vision_model
        self.language_model = language_model
        vit_dim = config.vision.hidden_size * int(1 / config.downsample_ratio) ** 2
        llm_dim = language_model.config.hidden_size
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(vit_dim), nn.Linear(vit_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim)
        )
        self.img_context_token_id = img_context_token_id

    @classmethod
    def from_config(
        cls, config: InternVLConfig, img_context_token_id: int | None = None, attn_implementation: str = "sdpa"
    ) -> InternVLChatModel:
        """Randomly initialised model of ``config`` (use :func:`xtuner_vl.model.load_internvl` for weights)."""
        return cls(
            config,
            InternVisionModel(config.vision),
            build_llm(config.llm_config, attn_implementation),
            img_context_token_id,
        )

    @property
    def num_image_token(self) -> int:
        return self.config.num_image_token

    @property
    def template(self) -> str | None:
        return self.config.template

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[tiles, 3, H, W]`` pixels -> ``[tiles, num_image_token, llm_hidden]`` projected tokens."""
        vit = self.vision_model(pixel_values, select_layer=self.config.select_layer)[:, 1:, :]
        side = int(vit.shape[1] ** 0.5)
        vit = vit.reshape(vit.shape[0], side, side, -1)
        vit = pixel_shuffle(vit, self.config.downsample_ratio, self.config.ps_version)
        return self.mlp1(vit.reshape(vit.shape[0], -1, vit.shape[-1]))

    def embed(
        self, pixel_values: torch.Tensor | None, input_ids: torch.Tensor, image_flags: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings with the ``<IMG_CONTEXT>`` positions replaced by the real tiles' features."""
        if self.img_context_token_id is None:
            raise ValueError("img_context_token_id is not set; pass it to load_internvl or set the attribute")
        embeds = self.language_model.get_input_embeddings()(input_ids)
        selected = input_ids == self.img_context_token_id
        if pixel_values is None:
            if selected.any():
                raise ValueError(f"input_ids hold {int(selected.sum())} <IMG_CONTEXT> tokens but no pixel_values")
            return embeds
        vit = self.extract_feature(pixel_values)
        flags = torch.ones(vit.shape[0], dtype=torch.long, device=vit.device) if image_flags is None else image_flags
        flags = flags.reshape(-1)
        if flags.numel() != vit.shape[0]:
            raise ValueError(f"image_flags has {flags.numel()} entries for {vit.shape[0]} tiles")
        real = vit[flags == 1]
        n_slots, n_feats = int(selected.sum()), real.shape[0] * real.shape[1]
        if n_slots != n_feats:
            raise ValueError(
                f"input_ids hold {n_slots} <IMG_CONTEXT> tokens but the {real.shape[0]} real tiles give {n_feats} "
                f"features ({self.num_image_token} per tile); the prompt and the images disagree"
            )
        # Dummy tiles (flag 0) run through the ViT so every rank uses the same parameters (ZeRO-3,
        # DDP); adding their features times zero keeps them in the graph without changing values.
        keep_in_graph = vit[flags != 1].sum() * 0.0
        embeds = embeds.clone()
        embeds[selected] = real.reshape(-1, real.shape[-1]).to(embeds.dtype)
        return embeds + keep_in_graph.to(embeds.dtype)

    def forward(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        image_flags: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> InternVLOutput:
        """Official forward semantics: logits for every position; ``loss`` = mean next-token
        cross-entropy over labels != -100 (0 with gradient when no position is trained)."""
        embeds = self.embed(pixel_values, input_ids, image_flags)
        out = self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        loss = None if labels is None else causal_lm_loss(out.logits, labels)
        return InternVLOutput(logits=out.logits, loss=loss, cache=getattr(out, "cache", None))

    def gradient_checkpointing_enable(self, vit: bool = True, llm: bool = True) -> None:
        """Recompute ViT and/or LLM layer activations in backward instead of storing them."""
        self.vision_model.encoder.gradient_checkpointing = vit
        if llm:
            lm = self.language_model
            if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
                lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_flags: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Generate continuation ids (only the new tokens) for a prompt with spliced images."""
        embeds = self.embed(pixel_values, input_ids, image_flags)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of position t predicting label t+1, over labels != IGNORE_INDEX, in fp32."""
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (shift_labels != IGNORE_INDEX).sum().clamp(min=1)
