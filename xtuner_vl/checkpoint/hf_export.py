"""Official InternVL directory -> transformers-native ``InternVLForConditionalGeneration`` directory.

transformers implements InternVL natively (no remote code) for ``ps_version`` v2 with any AutoModel text model;
InternLM2 (as Llama), Qwen2 / Qwen2.5, Llama, Qwen3, Qwen3-MoE and GPT-OSS backbones are exported (GPT-OSS keys are
transformers' own on both sides; transformers loads it with eager attention, the one that has its sinks). This module
writes such a directory from an official one, one tensor at a time:

- weights: ``vision_model`` -> ``model.vision_tower`` (``attn.qkv`` split into ``q/k/v_proj``), ``mlp1`` ->
  ``model.multi_modal_projector``, ``language_model.model`` -> ``model.language_model``,
  ``language_model.lm_head`` / ``.output`` -> ``lm_head``; InternLM2 layers renamed onto Llama's
  (``wqkv`` split per KV group, see :func:`split_wqkv`). Qwen3-MoE experts keep their per-expert keys
  (``mlp.experts.E.{gate,up,down}_proj.weight``, as the transformers 4.x-saved OpenGVLab ``*-HF`` repos hold
  them): transformers 5 fuses them at load time (the ``qwen3_moe`` -> ``qwen2_moe`` entry of its
  ``conversion_mapping.py``) and its ``save_pretrained`` writes them per expert again;
- tied head (``llm_config.tie_word_embeddings`` true, which the InternVL3.5 code honours for transformers-native
  backbones, see :mod:`xtuner_vl.model.llm`): the official checkpoint stores no head, and the hf config ties it
  (top-level ``tie_word_embeddings``, the flag transformers 5 reads for ``InternVLForConditionalGeneration``, and
  the text config's);
- config.json: ``InternVLConfig`` (vision fields translated, text config of the backbone's transformers type),
  plus ``internvl_chat_config``: the official top-level fields, so ``--from-hf`` can restore them;
- tokenizer and processor: a ``tokenizer.json`` (the fast pipeline of :func:`xtuner_vl.model.load_tokenizer`:
  for sentencepiece models the one of :mod:`xtuner_vl.model.sentencepiece_fast`, same ids), the image tokens
  named as transformers' ``InternVLProcessor`` expects, a ``GotOcr2ImageProcessor`` with the official tiling
  and normalisation, and a chat template rendering the official template of the checkpoint.

How close the exported processor is to the official tiling (``dynamic_preprocess`` + per-tile transform, which
:func:`xtuner_vl.dataset.load_image_tiles` equals bit for bit; checked in tests/checkpoint/test_hf_export.py):

- grid choice: transformers' ``get_optimal_tiled_canvas`` is the official rule, exact-tie rule included (a
  larger grid with the same aspect distance wins only if ``w * h > 0.5 * size**2 * cols * rows``). Over 454 548
  sizes (every ``w, h`` in 1..548, 100 000 random up to 8000, 54 244 exact multiples of every grid) and tile
  bounds (1, 6), (1, 12), (1, 40), (2, 6), (2, 12), (3, 12), (4, 12), no size gets a different grid.
- configuration: ``size`` = force_image_size, BICUBIC, rescale 1/255, ImageNet mean/std, RGB conversion,
  ``min/max_patches`` = min/max_dynamic_patch. ``InternVLProcessor`` forces ``crop_to_patches=True`` on every
  call, so a model without ``dynamic_image_size`` is written with ``max_patches=1`` (a 1x1 grid, no thumbnail:
  the official single resize).
- pixels, PIL backend: ``AutoProcessor.from_pretrained(out, image_processor=AutoImageProcessor.from_pretrained(
  out, backend="pil"))`` gives our tiles exactly (max abs difference 0, tiny, wide, tall, tie and 4K images).
- pixels, default backend: ``AutoProcessor.from_pretrained(out)`` picks the torchvision backend whenever
  torchvision is installed, and no saved field can choose the backend. Same grids and tile counts, but torch's
  uint8 bicubic resize is not Pillow's: Pillow orders its two passes per image and rounds the intermediate to
  uint8, torch always resamples horizontally first, with its own fixed-point weights. On 90 sizes up to 4K the
  resized levels differ by at most 2 (0.4 % of values) on smooth images and 26 (2.8 %; 0.455 after
  normalisation) on pixel noise, where intermediate clipping matters most. Its fused rescale + normalise,
  ``(x - 255 mean) / (255 std)``, differs from ``(x / 255 - mean) / std`` by at most 2.4e-7.
- not configurable: transparency is composited on white (the official ``convert('RGB')`` drops alpha, so pass
  RGB images); a thumbnail is always appended to multi-tile images (a ``use_thumbnail: false`` model gets one
  tile more; a warning says so); every image gets up to ``max_patches`` tiles (training splits
  max_dynamic_patch across a sample's images: pass ``images_kwargs={"max_patches": n}``); 16-bit greyscale is
  clipped as by the official (our loader scales it); video frames are labelled ``Frame1: `` as in the official
  model card, while the official training data used ``Frame-1: ``, and the processor does not sample frames.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import (
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLProcessor,
    InternVLVideoProcessor,
    InternVLVisionConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from xtuner_vl.checkpoint.stream import ShardWriter, iter_base_tensors
from xtuner_vl.checkpoint.trained import CheckpointError
from xtuner_vl.dataset.image import IMAGENET_MEAN, IMAGENET_STD
from xtuner_vl.dataset.templates import get_template
from xtuner_vl.model.configuration import InternVLConfig as OfficialConfig
from xtuner_vl.model.configuration import VisionConfig, read_config
from xtuner_vl.model.internlm2 import LLAMA_SHARED_FIELDS
from xtuner_vl.model.llm import build_llm_config, is_tied
from xtuner_vl.model.sentencepiece_fast import NonLegacyLlamaTokenizerFast
from xtuner_vl.model.tokenizer import IMG_CONTEXT_TOKEN, img_context_token_id, load_tokenizer
from xtuner_vl.model.weights import atomic_write_text

__all__ = [
    "HF_LLM_ARCHS",
    "IMAGE_TOKENS",
    "OFFICIAL_FIELDS_KEY",
    "check_hf_exportable",
    "hf_config",
    "hf_tensors",
    "official_to_hf",
    "split_wqkv",
    "write_hf_processor",
]

logger = logging.getLogger(__name__)

HF_LLM_ARCHS = (
    "InternLM2ForCausalLM",
    "Qwen2ForCausalLM",
    "LlamaForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "GptOssForCausalLM",
)
OFFICIAL_FIELDS_KEY = "internvl_chat_config"  # official top-level config fields kept in the hf config.json
# Names transformers' InternVLProcessor reads from the tokenizer.
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": IMG_CONTEXT_TOKEN}
VIDEO_TOKEN = "<video>"
_INTERNLM2_RENAMES = (  # official InternLM2 name part -> Llama name part (wqkv is split separately)
    ("model.tok_embeddings.", "model.embed_tokens."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".feed_forward.w1.", ".mlp.gate_proj."),
    (".feed_forward.w3.", ".mlp.up_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
)
_VIT_RENAMES = (
    ("embeddings.class_embedding", "embeddings.cls_token"),
    ("embeddings.position_embedding", "embeddings.position_embeddings"),
    ("embeddings.patch_embedding.", "embeddings.patch_embeddings.projection."),
    ("encoder.layers.", "encoder.layer."),
    (".attn.proj.", ".attention.projection_layer."),
    (".attn.q_norm.", ".attention.q_norm."),
    (".attn.k_norm.", ".attention.k_norm."),
    (".norm1.", ".layernorm_before."),
    (".norm2.", ".layernorm_after."),
    (".ls1", ".lambda_1"),
    (".ls2", ".lambda_2"),
)
_MLP1 = {
    "mlp1.0.": "model.multi_modal_projector.layer_norm.",
    "mlp1.1.": "model.multi_modal_projector.linear_1.",
    "mlp1.3.": "model.multi_modal_projector.linear_2.",
}


def check_hf_exportable(raw: dict[str, Any], source: str) -> None:
    """Refuse, before anything is written, an official config transformers' InternVL cannot represent.

    Raises:
        CheckpointError: ``ps_version`` v1 (transformers implements only v2's pixel shuffle; a v1 model's image
            features would be transposed), a Phi-3 or other unsupported backbone.
    """
    ps_version = raw.get("ps_version", "v1")  # the official config class defaults to v1
    if ps_version != "v2":
        raise CheckpointError(
            f"{source}: ps_version is {ps_version!r}; transformers' InternVLForConditionalGeneration implements "
            "only the v2 pixel shuffle (v1 feeds transposed image features), so --format hf cannot represent it"
        )
    arch = (raw.get("llm_config", {}).get("architectures") or [None])[0]
    if arch == "Phi3ForCausalLM":
        raise CheckpointError(
            f"{source}: Phi-3 backbone; transformers' InternVL has no Phi-3 text model mapping with the official "
            "'su' rope semantics and fused qkv/gate_up layout, so --format hf refuses it (use --format official)"
        )
    if arch not in HF_LLM_ARCHS:
        raise CheckpointError(f"{source}: backbone {arch!r} is not supported by --format hf ({HF_LLM_ARCHS})")


def _internlm2_text_config(llm: dict[str, Any]) -> LlamaConfig:
    rope = {"rope_type": "default", "rope_theta": float(llm.get("rope_theta", 10000))}
    scaling = llm.get("rope_scaling")
    if scaling:
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind not in ("dynamic", "linear"):
            raise CheckpointError(f"InternLM2 rope_scaling {scaling} is not supported by --format hf")
        # transformers' dynamic rope equals the official InternLM2 one up to the longest length seen, but it
        # resets to the unscaled table for inputs shorter than max_position_embeddings, while the official
        # InternLM2 keeps its longest table: a generation that grew past max_position_embeddings and is
        # followed by a shorter call differs.
        rope.update(rope_type=kind, factor=float(scaling["factor"]))
    return LlamaConfig(
        **{k: llm[k] for k in LLAMA_SHARED_FIELDS if llm.get(k) is not None},
        attention_bias=bool(llm.get("bias")),
        mlp_bias=False,
        rope_parameters=rope,
        tie_word_embeddings=False,
    )


def _vision_config(raw_vision: dict[str, Any]) -> InternVLVisionConfig:
    v = VisionConfig.from_dict(raw_vision)
    return InternVLVisionConfig(
        hidden_size=v.hidden_size,
        num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads,
        intermediate_size=v.intermediate_size,
        hidden_act=v.hidden_act,
        layer_norm_eps=v.layer_norm_eps,
        norm_type=v.norm_type,
        image_size=v.image_size,
        patch_size=v.patch_size,
        num_channels=v.num_channels,
        attention_bias=v.qkv_bias,
        use_qk_norm=v.qk_normalization,
        attention_dropout=v.attention_dropout,
        hidden_dropout_prob=v.dropout,
        projection_dropout=v.dropout,
        initializer_range=raw_vision.get("initializer_range", 0.02),
        # InternViT initialises ls1/ls2 to initializer_factor; no final norm, hence "mean pooling" (Identity).
        layer_scale_init_value=v.initializer_factor,
        use_mean_pooling=True,
        use_absolute_position_embeddings=True,
    )


def hf_config(raw: dict[str, Any], image_token_id: int) -> InternVLConfig:
    """transformers' ``InternVLConfig`` equivalent to the official config.json ``raw`` (text config of the
    backbone's transformers type, e.g. ``Qwen3Config``; head tied as the official ``llm_config`` ties it)."""
    llm = raw["llm_config"]
    if llm["architectures"][0] == "InternLM2ForCausalLM":
        text = _internlm2_text_config(llm)
    else:
        text = build_llm_config(llm)
    cfg = OfficialConfig.from_dict(raw)
    config = InternVLConfig(
        vision_config=_vision_config(raw["vision_config"]).to_dict(),
        text_config=text.to_dict(),
        image_token_id=image_token_id,
        image_seq_length=cfg.num_image_token,
        downsample_ratio=cfg.downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=cfg.select_layer,
        vision_feature_select_strategy="default",
        tie_word_embeddings=is_tied(llm),
    )
    config.architectures = ["InternVLForConditionalGeneration"]
    config.dtype = raw.get("torch_dtype", "bfloat16")
    official = {k: v for k, v in raw.items() if k not in ("vision_config", "llm_config")}
    official["llm_architecture"] = llm["architectures"][0]
    setattr(config, OFFICIAL_FIELDS_KEY, official)
    return config


def split_wqkv(wqkv: torch.Tensor, num_heads: int, num_kv_heads: int) -> tuple[torch.Tensor, ...]:
    """InternLM2 ``wqkv`` [(heads + 2 kv) * d, ...] -> (q, k, v): rows grouped per KV head as
    ``(kv, q_per_kv + 2, d)``: that group's query heads, then its key head, then its value head."""
    groups = num_heads // num_kv_heads
    head_dim = wqkv.shape[0] // (num_heads + 2 * num_kv_heads)
    w = wqkv.reshape(num_kv_heads, groups + 2, head_dim, *wqkv.shape[1:])
    tail = wqkv.shape[1:]
    q = w[:, :groups].reshape(num_heads * head_dim, *tail)
    k = w[:, groups].reshape(num_kv_heads * head_dim, *tail)
    v = w[:, groups + 1].reshape(num_kv_heads * head_dim, *tail)
    return q.contiguous(), k.contiguous(), v.contiguous()


def _rename(key: str, renames: tuple[tuple[str, str], ...]) -> str:
    for old, new in renames:
        key = key.replace(old, new)
    return key


def hf_tensors(key: str, tensor: torch.Tensor, llm: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """The transformers-native ``(name, tensor)`` pairs of one official tensor ``key``."""
    internlm2 = llm["architectures"][0] == "InternLM2ForCausalLM"
    if key.startswith("vision_model."):
        name = "model.vision_tower." + _rename(key[len("vision_model.") :], _VIT_RENAMES)
        if ".attn.qkv." in name:
            parts = tensor.chunk(3, dim=0)  # InternViT's qkv rows: all q, then all k, then all v
            return [
                (name.replace(".attn.qkv.", f".attention.{p}_proj."), t.contiguous())
                for p, t in zip("qkv", parts, strict=True)
            ]
        return [(name, tensor)]
    for old, new in _MLP1.items():
        if key.startswith(old):
            return [(new + key[len(old) :], tensor)]
    if key in ("language_model.lm_head.weight", "language_model.output.weight"):
        return [("lm_head.weight", tensor)]
    if not key.startswith("language_model.model."):
        raise CheckpointError(f"official weight {key!r} has no transformers-native counterpart")
    name = "model.language_model." + key[len("language_model.model.") :]
    if not internlm2:
        return [(name, tensor)]
    name = _rename("model." + name[len("model.language_model.") :], _INTERNLM2_RENAMES)
    name = "model.language_model." + name[len("model.") :]
    if ".attention.wqkv." in name:
        heads = llm["num_attention_heads"]
        qkv = split_wqkv(tensor, heads, llm.get("num_key_value_heads") or heads)
        return [(name.replace(".attention.wqkv.", f".self_attn.{p}_proj."), t) for p, t in zip("qkv", qkv, strict=True)]
    return [(name, tensor)]


def _chat_template(raw: dict[str, Any]) -> str:
    """Jinja rendering of the official MPT prompt: system block (the release default unless the messages start
    with a system message), one block per message (images as ``<IMG_CONTEXT>``, which the processor expands to
    ``<img>`` + 256 per tile + ``</img>``), then the assistant header."""
    t = get_template(raw.get("template") or "internlm2-chat", raw.get("system_message"))
    user, assistant = (json.dumps(r) for r in t.roles)
    sep, system = json.dumps(t.sep), json.dumps(t.system_template.split("{system_message}")[0])
    return (
        "{%- macro text(c) -%}{%- if c is string -%}{{ c }}{%- else -%}{%- for p in c -%}"
        f"{{%- if p['type'] == 'image' -%}}{{{{ '{IMG_CONTEXT_TOKEN}\\n' }}}}"
        f"{{%- elif p['type'] == 'video' -%}}{{{{ '{VIDEO_TOKEN}\\n' }}}}"
        "{%- elif p['type'] == 'text' -%}{{ p['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
        f"{{%- set sys = {json.dumps(t.system_message)} -%}}{{%- set msgs = messages -%}}"
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set sys = text(messages[0]['content']) -%}"
        "{%- set msgs = messages[1:] -%}{%- endif -%}"
        f"{{{{ {system} + sys + {sep} }}}}"
        "{%- for m in msgs -%}"
        f"{{{{ ({user} if m['role'] == 'user' else {assistant}) + text(m['content']) + {sep} }}}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ {assistant} }}}}{{%- endif -%}}"
    )


def _image_processor(cfg: OfficialConfig) -> GotOcr2ImageProcessor:
    """transformers' image processor configured as the official tiling of ``cfg`` (see the module docstring)."""
    if cfg.dynamic_image_size and not cfg.use_thumbnail:
        logger.warning(
            "use_thumbnail is false in config.json, but transformers' GotOcr2ImageProcessor always appends a "
            "thumbnail to multi-tile images: the exported processor gives those images one tile more than the "
            "model was trained with"
        )
    # InternVLProcessor passes crop_to_patches=True on every call, over the image processor's own setting, so a
    # model without dynamic tiling is written as a single-patch grid: 1x1, no thumbnail, one bicubic resize.
    dynamic = bool(cfg.dynamic_image_size)
    return GotOcr2ImageProcessor(
        size={"height": cfg.image_size, "width": cfg.image_size},
        resample=Image.Resampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
        crop_to_patches=dynamic,
        min_patches=cfg.min_dynamic_patch if dynamic else 1,
        max_patches=cfg.max_dynamic_patch if dynamic else 1,
    )


def write_hf_processor(official_dir: str | Path, out_dir: str | Path, raw: dict[str, Any]) -> None:
    """Write the tokenizer (``tokenizer.json``, no remote code), image/video processors and chat template."""
    source, out = Path(official_dir), Path(out_dir)
    trained = load_tokenizer(source)  # the training tokenizer; its fast pipeline has the training ids
    if isinstance(trained, NonLegacyLlamaTokenizerFast):
        raise CheckpointError(f"{source}: a legacy=false Llama tokenizer cannot be exported as tokenizer.json")
    fast = Tokenizer.from_str(trained.backend_tokenizer.to_str())
    named = {
        k: str(getattr(trained, k))
        for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        if getattr(trained, k, None) is not None
    }
    template = _chat_template(raw)
    # <video> is not in the official vocabularies: the processor replaces it by frame tiles before tokenizing,
    # so its new id (len(vocab)) never reaches the model.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=fast,
        **named,
        extra_special_tokens={**IMAGE_TOKENS, "video_token": VIDEO_TOKEN},
        model_max_length=trained.model_max_length,
        padding_side=trained.padding_side,
        chat_template=template,
    )
    cfg = OfficialConfig.from_dict(raw)
    # Frames are one tile each, resized like a tile; the caller samples them (do_sample_frames off).
    video = InternVLVideoProcessor(
        size={"height": cfg.image_size, "width": cfg.image_size},
        resample=Image.Resampling.BICUBIC,
        rescale_factor=1 / 255,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
        do_sample_frames=False,
    )
    processor = InternVLProcessor(
        image_processor=_image_processor(cfg),
        tokenizer=tokenizer,
        video_processor=video,
        image_seq_length=cfg.num_image_token,
        chat_template=template,
    )
    processor.save_pretrained(str(out))


def _converted(source: Path, llm: dict[str, Any], progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    for key, tensor in iter_base_tensors(source, "to hf" if progress else None):
        pieces = hf_tensors(key, tensor, llm)
        del tensor  # not held while the next one is read
        yield from pieces


def official_to_hf(
    official_dir: str | Path, out_dir: str | Path, max_shard_size: int | str = "5GB", progress: bool = True
) -> Path:
    """Write the official InternVL directory ``official_dir`` as a transformers-native one at ``out_dir``.

    Weights keep their dtype and values (only renamed and split), streamed one tensor at a time. Loadable with
    ``InternVLForConditionalGeneration.from_pretrained(out_dir)``, ``AutoProcessor`` and ``AutoTokenizer``,
    without ``trust_remote_code``.

    Raises:
        CheckpointError: a v1 / Phi-3 / unsupported model (nothing written), or ``out_dir`` is ``official_dir``.
    """
    source, out = Path(official_dir), Path(out_dir)
    raw = json.loads((source / "config.json").read_text(encoding="utf-8"))
    check_hf_exportable(raw, str(source / "config.json"))
    if out.resolve() == source.resolve():
        raise CheckpointError(f"output directory {out} is the source directory; choose another one")
    read_config(source)  # validates the official config as our loader does
    config = hf_config(raw, img_context_token_id(load_tokenizer(source)))
    writer = ShardWriter(out, max_shard_size)
    for name, tensor in _converted(source, raw["llm_config"], progress):
        writer.add(name, tensor)
    writer.finish()
    atomic_write_text(out / "config.json", config.to_json_string())
    if (source / "generation_config.json").is_file():
        (out / "generation_config.json").write_bytes((source / "generation_config.json").read_bytes())
    write_hf_processor(source, out, raw)
    return out
