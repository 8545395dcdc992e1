"""InternVL chat model: InternViT -> pixel shuffle -> ``mlp1`` -> ``<IMG_CONTEXT>`` splice -> LLM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from xtuner_vl.model.attention import VARLEN_IMPLEMENTATIONS
from xtuner_vl.model.configuration import InternVLConfig
from xtuner_vl.model.intern_vit import InternVisionModel
from xtuner_vl.model.llm import build_llm
from xtuner_vl.model.moe import is_moe, router_aux_loss
from xtuner_vl.structures import IGNORE_INDEX

__all__ = ["InternVLChatModel", "InternVLOutput", "official_state_dict", "pixel_shuffle", "tied_keys", "IGNORE_INDEX"]


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


def tied_keys(module: nn.Module) -> dict[str, str]:
    """State-dict keys naming a Parameter that an earlier key already names -> that key.

    For a tied LLM (``tie_word_embeddings``) that is ``{"...lm_head.weight": "...embed_tokens.weight"}``: the
    embedding is registered first, and official checkpoints store only it. Empty for untied models.
    """
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def official_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` without the tied aliases of :func:`tied_keys`: the keys a checkpoint stores."""
    aliases = tied_keys(module)
    return {k: v for k, v in module.state_dict().items() if k not in aliases}


@dataclass
class InternVLOutput:
    """``logits`` [batch, seq, vocab] (None in the training form); ``loss`` the mean cross-entropy over
    trained tokens (or None)."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    cache: Any = None
    loss_sum: torch.Tensor | None = None  # float64 sum of the trained tokens' cross-entropy
    # MoE LLMs, training form: the router load-balancing loss of this batch and the weight it is added with
    aux_loss: torch.Tensor | None = None
    aux_loss_coef: float = 0.0


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
        # A MoE LLM's router loss is added to the training loss as the InternVL 3.5 code adds it: router_aux_loss_coef
        # times the loss when the LLM returns router logits, i.e. when llm_config says output_router_logits, and for
        # GPT-OSS always (internvl_chat_gpt_oss/internvl/train/internvl_chat_finetune.py turns them on for it); else
        # it is only logged. Training recipes may set another coefficient.
        self.moe = is_moe(language_model)
        llm = config.llm_config
        routed = llm.get("output_router_logits") or llm["architectures"][0] == "GptOssForCausalLM"
        self.router_aux_loss_coef = float(llm.get("router_aux_loss_coef", 0.0)) if self.moe and routed else 0.0

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

    def tie_weights(self) -> None:
        """Tie the LLM's output head to its input embedding where its config says so (transformers' own
        ``tie_weights``); a load that assigns the embedding a new Parameter calls it again."""
        self.language_model.tie_weights()

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
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.Tensor,
        image_flags: torch.Tensor | None = None,
        image_token_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the ``<IMG_CONTEXT>`` positions replaced by the real tiles' features.

        ``image_flags`` on the CPU and ``image_token_index`` (flat positions of ``<IMG_CONTEXT>``, as
        collate computes them) spare the device reads that finding them on the device takes.
        """
        if self.img_context_token_id is None:
            raise ValueError("img_context_token_id is not set; pass it to load_internvl or set the attribute")
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if image_token_index is None:
            selected = input_ids == self.img_context_token_id
            n_slots = int(selected.sum())
        else:
            selected, n_slots = None, image_token_index.numel()
        if pixel_values is None:
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} <IMG_CONTEXT> tokens but no pixel_values")
            return embeds
        vit = self.extract_feature(pixel_values)
        real, dummy = self._split_tiles(vit, image_flags)
        n_feats = real.shape[0] * real.shape[1]
        if n_slots != n_feats:
            raise ValueError(
                f"input_ids hold {n_slots} <IMG_CONTEXT> tokens but the {real.shape[0]} real tiles give {n_feats} "
                f"features ({self.num_image_token} per tile); the prompt and the images disagree"
            )
        feats = real.reshape(-1, real.shape[-1]).to(embeds.dtype)
        if selected is None:
            embeds = embeds.reshape(-1, embeds.shape[-1]).index_copy(0, image_token_index, feats).view_as(embeds)
        else:
            embeds = embeds.clone()
            embeds[selected] = feats
        if dummy is None:
            return embeds
        # Dummy tiles (flag 0) run through the ViT so every rank uses the same parameters (ZeRO-3,
        # DDP); adding their features times zero keeps them in the graph without changing values.
        return embeds + (dummy.sum() * 0.0).to(embeds.dtype)

    @staticmethod
    def _split_tiles(vit: torch.Tensor, image_flags: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(real tiles' features, dummy tiles' features or None)``; flags on the CPU cost no device read."""
        if image_flags is None:
            return vit, None
        flags = image_flags.reshape(-1)
        if flags.numel() != vit.shape[0]:
            raise ValueError(f"image_flags has {flags.numel()} entries for {vit.shape[0]} tiles")
        if flags.device.type != "cpu":
            return vit[flags == 1], vit[flags != 1]
        real = (flags == 1).nonzero().flatten()
        if real.numel() == vit.shape[0]:
            return vit, None
        dummy = (flags != 1).nonzero().flatten()
        return vit.index_select(0, real.to(vit.device)), vit.index_select(0, dummy.to(vit.device))

    def _attention_inputs(
        self,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
    ) -> dict[str, Any]:
        """What the LLM gets to keep samples apart (see :mod:`xtuner_vl.model.attention`).

        Variable-length back-ends get the segment boundaries explicitly and no mask; the others get the
        padding mask, or for packed rows (``attention_mask=None``) restarting ``position_ids``, from
        which transformers builds a block-diagonal mask.
        """
        impl = self.language_model.config._attn_implementation
        if cu_seqlens is not None and impl in VARLEN_IMPLEMENTATIONS:
            return {
                "attention_mask": None,
                "position_ids": position_ids,
                "cu_seq_lens_q": cu_seqlens,
                "cu_seq_lens_k": cu_seqlens,
                "max_length_q": max_seqlen,
                "max_length_k": max_seqlen,
            }
        return {"attention_mask": attention_mask, "position_ids": position_ids}

    def forward(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        image_flags: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        image_token_index: torch.Tensor | None = None,
        loss_index: torch.Tensor | None = None,
        loss_targets: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> InternVLOutput:
        """Official forward semantics: logits for every position; ``loss`` = mean next-token
        cross-entropy over labels != -100 (0 with gradient when no position is trained).

        Training form: with ``loss_index`` / ``loss_targets`` (flat trained positions and their next
        tokens, from collate) no logits are returned, only ``loss_sum``, computed by the chunked fp32
        loss on those positions alone (:mod:`xtuner_vl.model.loss`), each weighted by ``loss_weights`` when
        given (``loss_reduction`` sample / square). ``cu_seqlens`` / ``max_seqlen`` are
        the segment boundaries for the variable-length attention back-ends. For a MoE LLM the training form also
        returns the router's load-balancing ``aux_loss`` over the real tokens (``token_mask``, 1 = real; default
        ``attention_mask``).
        """
        embeds = self.embed(pixel_values, input_ids, image_flags, image_token_index)
        lm_inputs = {**self._attention_inputs(attention_mask, position_ids, cu_seqlens, max_seqlen), **kwargs}
        lm = self.language_model
        if loss_index is None and labels is None:
            out = lm(inputs_embeds=embeds, **lm_inputs)
            return InternVLOutput(logits=out.logits, cache=getattr(out, "cache", None))
        if self.moe:
            lm_inputs["output_router_logits"] = True
        decoded = lm.get_decoder()(inputs_embeds=embeds, **lm_inputs)
        hidden = decoded.last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])
        head = lm.get_output_embeddings()
        aux = {}
        if self.moe:
            mask = token_mask if token_mask is not None else attention_mask
            cfg = lm.config
            gpt_oss = cfg.architectures[0] == "GptOssForCausalLM"  # the official 4.55 stack's router inputs
            experts, top_k = cfg.num_local_experts, cfg.num_experts_per_tok
            aux_loss = router_aux_loss(decoded.router_logits, experts, top_k, mask, scores_as_logits=gpt_oss)
            aux = {"aux_loss": aux_loss, "aux_loss_coef": self.router_aux_loss_coef}
        if loss_index is not None:
            return InternVLOutput(logits=None, loss_sum=head(flat[loss_index], loss_targets, loss_weights), **aux)
        index = (labels.reshape(-1)[1:] != IGNORE_INDEX).nonzero().flatten()
        index = index[(index + 1) % labels.shape[1] != 0]  # a row's last token predicts no next row
        loss_sum = head(flat[index], labels.reshape(-1)[index + 1])
        loss = (loss_sum / max(index.numel(), 1)).float()
        if aux:
            loss = loss + aux["aux_loss_coef"] * aux["aux_loss"]
        return InternVLOutput(logits=head(hidden), loss=loss, loss_sum=loss_sum, **aux)

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
