"""InternViT (300M and 6B shapes) with the official module and parameter names.

Keys match the official ``vision_model.*`` state dict: ``embeddings.{class_embedding,
patch_embedding, position_embedding}`` and ``encoder.layers.N.{attn.qkv, attn.proj, attn.q_norm,
attn.k_norm, mlp.fc1, mlp.fc2, norm1, norm2, ls1, ls2}``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN

from xtuner_vl.model.attention import vision_attention
from xtuner_vl.model.configuration import VisionConfig

__all__ = ["InternRMSNorm", "InternVisionModel", "set_drop_path_rate"]


class InternRMSNorm(nn.Module):
    """RMSNorm computed in fp32, weight applied in the input dtype (as the official InternRMSNorm)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def _norm(norm_type: str, dim: int, eps: float) -> nn.Module:
    return InternRMSNorm(dim, eps=eps) if norm_type == "rms_norm" else nn.LayerNorm(dim, eps=eps)


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, self.embed_dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size
        )
        num_patches = (self.image_size // self.patch_size) ** 2
        self.position_embedding = nn.Parameter(torch.randn(1, num_patches + 1, self.embed_dim))

    def _grid_pos_embed(self, height: int, width: int) -> torch.Tensor:
        """Bicubic interpolation of the patch position grid to (height, width), done in fp32."""
        pos = self.position_embedding[:, 1:, :]
        side = self.image_size // self.patch_size
        grid = pos.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        return grid.reshape(1, -1, height * width).permute(0, 2, 1).to(pos.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))
        batch, _, height, width = patches.shape
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(batch, 1, -1).to(dtype)
        pos = torch.cat([self.position_embedding[:, :1, :], self._grid_pos_embed(height, width)], dim=1)
        return torch.cat([cls, patches], dim=1) + pos.to(dtype)


class InternAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        if self.head_dim * self.num_heads != self.embed_dim:
            raise ValueError(f"vision hidden_size {self.embed_dim} is not divisible by {self.num_heads} heads")
        self.attention_dropout = config.attention_dropout
        self.qkv = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=config.qkv_bias)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            # Normalises over the full width, before the heads are split (official InternViT-6B).
            self.q_norm = InternRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
            self.k_norm = InternRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
        self.proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.proj_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, seq, 3, width).unbind(2)
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        shape = (batch, seq, self.num_heads, self.head_dim)
        out = vision_attention(
            q.view(shape), k.view(shape), v.view(shape), self.attention_dropout if self.training else 0.0
        )
        return self.proj_drop(self.proj(out.reshape(batch, seq, width)))


class InternMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.act = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    """Pre-norm block: ``x + drop_path(ls1 * attn(norm1(x)))``, then the same with the MLP."""

    def __init__(self, config: VisionConfig, drop_path_rate: float) -> None:
        super().__init__()
        dim = config.hidden_size
        self.attn = InternAttention(config)
        self.mlp = InternMLP(config)
        self.norm1 = _norm(config.norm_type, dim, config.layer_norm_eps)
        self.norm2 = _norm(config.norm_type, dim, config.layer_norm_eps)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(dim))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(dim))
        self.drop_path1 = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.drop_path2 = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x).to(x.dtype)) * self.ls1)
        return x + self.drop_path2(self.mlp(self.norm2(x).to(x.dtype)) * self.ls2)


class InternVisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers, device="cpu").tolist()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(config, r) for r in rates)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, output_hidden_states: bool = False) -> tuple[torch.Tensor, ...]:
        """Returns ``(last_hidden_state,)`` or, with ``output_hidden_states``, the embeddings and every
        layer's output (so index -1 is the last layer, as in the official encoder)."""
        states = [x] if output_hidden_states else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
            if states is not None:
                states.append(x)
        return tuple(states) if states is not None else (x,)


class InternVisionModel(nn.Module):
    """InternViT without pooling head; ``forward`` returns the hidden states the projector reads."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        """Hidden state of layer ``select_layer`` (-1 = last) for ``pixel_values`` [tiles, 3, H, W]."""
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be [tiles, 3, H, W], got shape {tuple(pixel_values.shape)}")
        states = self.encoder(self.embeddings(pixel_values), output_hidden_states=select_layer != -1)
        return states[select_layer]


def set_drop_path_rate(model: InternVisionModel, rate: float) -> None:
    """Stochastic depth rising linearly to ``rate`` over the layers (the official fine-tune override)."""
    layers = model.encoder.layers
    rates = torch.linspace(0, rate, len(layers), device="cpu").tolist()
    for layer, r in zip(layers, rates, strict=True):
        layer.drop_path1 = DropPath(r) if r > 0 else nn.Identity()
        layer.drop_path2 = DropPath(r) if r > 0 else nn.Identity()
    model.config.drop_path_rate = rate
