"""transformers-native ``InternVLForConditionalGeneration`` directory -> official InternVL directory.

The inverse of :mod:`xtuner_vl.checkpoint.hf_export`. The official key set and shapes are those of our model
built (on the meta device) from the official config; each official tensor is assembled from the hf tensors the
forward mapping (:func:`~xtuner_vl.checkpoint.hf_export.hf_tensors`) gives it: renamed back, ViT ``q/k/v``
concatenated into ``attn.qkv``, InternLM2 ``q/k/v_proj`` re-packed into the grouped ``wqkv``. Values and dtype
are kept, so hf -> official after official -> hf is bitwise identical.

Qwen3-MoE experts: our export and transformers 5's ``save_pretrained`` (default ``save_original_format=True``,
which reverts the ``qwen2_moe`` conversion of ``transformers/conversion_mapping.py``) write per-expert
``mlp.experts.E.{gate,up,down}_proj.weight``; ``save_original_format=False`` writes transformers 5's fused
``mlp.experts.gate_up_proj`` [E, 2 I, H] (gate rows, then up rows) and ``mlp.experts.down_proj`` [E, H, I]. Both
are read; a fused one is sliced per expert without loading it whole.

Tied head: transformers 5 ties ``lm_head`` to the embedding when the top-level ``tie_word_embeddings`` says so
(``InternVLConfig`` defaults to true) and the directory has no ``lm_head.weight`` or one equal to the embedding;
the official directory is then tied too (no ``lm_head.weight``; only the transformers-native backbones can be).

With ``base_dir`` (the official release the model came from) its config.json is the template (with the
official fields the hf directory recorded) and its tokenizer, generation and remote-code files are copied;
without it the official config is rebuilt from the hf config and the hf tokenizer files are copied.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from xtuner_vl.checkpoint.hf_export import OFFICIAL_FIELDS_KEY, hf_tensors
from xtuner_vl.checkpoint.stream import ShardWriter
from xtuner_vl.checkpoint.trained import CheckpointError
from xtuner_vl.model.configuration import InternVLConfig as OfficialConfig
from xtuner_vl.model.internlm2 import LLAMA_SHARED_FIELDS
from xtuner_vl.model.internvl import official_state_dict
from xtuner_vl.model.llm import is_tied
from xtuner_vl.model.loader import build_empty_model
from xtuner_vl.model.saver import copy_support_files
from xtuner_vl.model.weights import atomic_write_text, weight_files

__all__ = ["hf_to_official", "official_config_from_hf", "pack_wqkv"]

_TEXT_ARCHS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}
# InternVL3.5 (Qwen3 / Qwen3-MoE) releases all use the internvl2_5 template; Qwen2 ones are InternVL2 (Hermes-2)
# or InternVL2.5 / 3 (internvl2_5), so a Qwen2 directory without recorded fields keeps Hermes-2.
_DEFAULT_TEMPLATES = {
    "InternLM2ForCausalLM": "internlm2-chat",
    "Qwen3ForCausalLM": "internvl2_5",
    "Qwen3MoeForCausalLM": "internvl2_5",
    "GptOssForCausalLM": "internvl3_5_gpt_oss",
}
_HEAD, _EMBEDDING = "lm_head.weight", "model.language_model.embed_tokens.weight"
_EXPERT = re.compile(r"^(?P<experts>.+\.mlp\.experts)\.(?P<index>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")
_INTERNLM2_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}
_INTERNVL_AUTO_MAP = {
    "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
    "AutoModel": "modeling_internvl_chat.InternVLChatModel",
    "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
}
# transformers 5 writes some fields under another name than the transformers 4.x classes the official code runs on
# read: Qwen3-MoE's num_experts as num_local_experts (GPT-OSS's num_local_experts is its own name in both).
_OFFICIAL_NAMES = {"qwen3_moe": {"num_local_experts": "num_experts"}}
_HF_ONLY_TEXT = ("rope_parameters", "dtype", "model_type", "architectures", "transformers_version")
_HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Inverse of :func:`~xtuner_vl.checkpoint.hf_export.split_wqkv`: per KV head, its query heads, key, value."""
    head_dim = k.shape[0] // num_kv_heads
    tail = q.shape[1:]
    groups = q.shape[0] // head_dim // num_kv_heads
    q = q.reshape(num_kv_heads, groups, head_dim, *tail)
    k, v = (t.reshape(num_kv_heads, 1, head_dim, *tail) for t in (k, v))
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail).contiguous()


def _rope_fields(text: dict[str, Any], arch: str) -> tuple[float, dict[str, Any] | None]:
    """``rope_theta`` and the official ``rope_scaling`` of transformers 5's ``rope_parameters``: InternLM2's
    ``{type, factor}``, else every scaling field under transformers 4's names (GPT-OSS's yarn keeps ``beta_fast``,
    ``original_max_position_embeddings`` and the others with ``rope_type``)."""
    rope = dict(text.get("rope_parameters") or {})
    theta = float(rope.pop("rope_theta", text.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return theta, None
    return theta, ({"type": kind, "factor": rope["factor"]} if arch == "InternLM2ForCausalLM" else rope)


def _llm_config(text: dict[str, Any], arch: str, dtype: str) -> dict[str, Any]:
    theta, scaling = _rope_fields(text, arch)
    if arch == "InternLM2ForCausalLM":
        llm = {k: text[k] for k in LLAMA_SHARED_FIELDS if k in text}
        llm.update(
            architectures=[arch],
            auto_map=_INTERNLM2_AUTO_MAP,
            model_type="internlm2",
            attn_implementation="eager",
            bias=bool(text.get("attention_bias")),
        )
    else:
        renamed = _OFFICIAL_NAMES.get(text["model_type"], {})
        llm = {renamed.get(k, k): v for k, v in text.items() if k not in _HF_ONLY_TEXT}
        llm.update(architectures=[arch], model_type=text["model_type"])
    llm.update(rope_theta=theta, rope_scaling=scaling, torch_dtype=dtype, tie_word_embeddings=False)
    return llm


def _vision_config(vision: dict[str, Any], dtype: str) -> dict[str, Any]:
    first = lambda x: x[0] if isinstance(x, (list, tuple)) else x  # noqa: E731
    return {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": vision["hidden_size"],
        "num_hidden_layers": vision["num_hidden_layers"],
        "num_attention_heads": vision["num_attention_heads"],
        "intermediate_size": vision["intermediate_size"],
        "hidden_act": vision.get("hidden_act", "gelu"),
        "layer_norm_eps": vision.get("layer_norm_eps", 1e-6),
        "norm_type": vision.get("norm_type", "layer_norm"),
        "image_size": first(vision.get("image_size", 448)),
        "patch_size": first(vision.get("patch_size", 14)),
        "num_channels": vision.get("num_channels", 3),
        "qkv_bias": bool(vision.get("attention_bias")),
        "qk_normalization": bool(vision.get("use_qk_norm")),
        "dropout": vision.get("hidden_dropout_prob", 0.0),
        "attention_dropout": vision.get("attention_dropout", 0.0),
        "drop_path_rate": 0.0,
        "initializer_factor": vision.get("layer_scale_init_value", 0.1),
        "initializer_range": vision.get("initializer_range", 0.02),
        "torch_dtype": dtype,
    }


def _set_tied(raw: dict[str, Any], tied: bool) -> None:
    """Write ``tied`` into ``llm_config`` and the top level (where the official config has the field)."""
    for d in (raw["llm_config"], raw):
        if tied or "tie_word_embeddings" in d:
            d["tie_word_embeddings"] = tied


def official_config_from_hf(hf: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The official config.json for the hf config.json ``hf`` (template: ``base``'s config.json, if given).

    The head is tied as transformers 5 ties it by config: top-level ``tie_word_embeddings`` (default true), for
    the backbones whose official code honours it; :func:`hf_to_official` unties it when the weights hold a head
    that differs from the embedding.

    Raises:
        CheckpointError: the hf directory is not an InternVL one, or its text model has no official backbone.
    """
    if hf.get("model_type") != "internvl":
        kind = hf.get("model_type")
        raise CheckpointError(f"model_type is {kind!r}, not InternVLForConditionalGeneration's 'internvl'")
    recorded = copy.deepcopy(hf.get(OFFICIAL_FIELDS_KEY) or {})
    text = hf["text_config"]
    arch = recorded.pop("llm_architecture", None) or (base or {}).get("llm_config", {}).get("architectures", [None])[0]
    arch = arch or _TEXT_ARCHS.get(text.get("model_type"))
    if arch is None:
        raise CheckpointError(f"text model type {text.get('model_type')!r} has no official InternVL backbone")
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"
    if base is not None:
        raw = copy.deepcopy(base)
        raw.update(recorded)
    else:
        default_template = _DEFAULT_TEMPLATES.get(arch, "Hermes-2")
        raw = {
            "architectures": ["InternVLChatModel"],
            "auto_map": _INTERNVL_AUTO_MAP,
            "model_type": "internvl_chat",
            "dynamic_image_size": True,
            "force_image_size": _vision_config(hf["vision_config"], dtype)["image_size"],
            "max_dynamic_patch": 12,
            "min_dynamic_patch": 1,
            "pad2square": False,
            "template": default_template,
            "use_thumbnail": True,
            **recorded,
        }
        raw["vision_config"] = _vision_config(hf["vision_config"], dtype)
        raw["llm_config"] = _llm_config(text, arch, dtype)
    raw.update(
        downsample_ratio=hf.get("downsample_ratio", 0.5),
        select_layer=hf.get("vision_feature_layer", -1),
        ps_version="v2",
        use_backbone_lora=0,
        use_llm_lora=0,
        torch_dtype=dtype,
    )
    for sub in ("vision_config", "llm_config"):
        if "torch_dtype" in raw[sub]:
            raw[sub]["torch_dtype"] = dtype
    _set_tied(raw, is_tied({**raw["llm_config"], "tie_word_embeddings": hf.get("tie_word_embeddings", True)}))
    return raw


class _HfTensors:
    """Name -> tensor of an hf directory's safetensors files, each read only when asked for."""

    def __init__(self, hf_dir: Path) -> None:
        self.files = {}
        for file in weight_files(hf_dir):
            if file.suffix != ".safetensors":
                raise CheckpointError(f"{file}: --from-hf reads safetensors weights only")
            with safe_open(str(file), framework="pt") as f:
                self.files.update(dict.fromkeys(f.keys(), file))

    def get(self, name: str | tuple[str, int, str]) -> torch.Tensor:
        """A tensor by name, or ``(fused name, expert, projection)``: one expert's slice of a fused tensor."""
        if isinstance(name, str):
            with safe_open(str(self.files[name]), framework="pt") as f:
                return f.get_tensor(name)
        fused, index, proj = name
        with safe_open(str(self.files[fused]), framework="pt") as f:
            part = f.get_slice(fused)
            if proj == "down":
                return part[index]
            half = part.get_shape()[1] // 2  # gate_up_proj [E, 2 I, H]: gate rows, then up rows
            return part[index, :half] if proj == "gate" else part[index, half:]


def _sources(names: list[str], present: set[str]) -> list[str | tuple[str, int, str]]:
    """Where the hf names of one official tensor are read: themselves, or a per-expert name's slice of the
    fused ``experts.gate_up_proj`` / ``experts.down_proj`` of transformers 5 when only those are present."""
    if len(names) != 1 or names[0] in present or not (m := _EXPERT.match(names[0])):
        return list(names)
    fused = f"{m['experts']}.{'down' if m['proj'] == 'down' else 'gate_up'}_proj"
    return [(fused, int(m["index"]), m["proj"])] if fused in present else list(names)


def _name(source: str | tuple[str, int, str]) -> str:
    return source if isinstance(source, str) else source[0]


def _official_tensor(
    key: str, names: list[str | tuple[str, int, str]], meta: torch.Tensor, llm: dict[str, Any], hf: _HfTensors
) -> torch.Tensor:
    parts = [hf.get(name) for name in names]
    if len(parts) == 1:
        tensor = parts[0]
    elif key.startswith("vision_model."):
        tensor = torch.cat(parts, dim=0)
    else:
        tensor = pack_wqkv(*parts, llm.get("num_key_value_heads") or llm["num_attention_heads"])
    if tuple(tensor.shape) != tuple(meta.shape):
        raise CheckpointError(f"{key}: hf weights give shape {tuple(tensor.shape)}, the config {tuple(meta.shape)}")
    return tensor


def hf_to_official(
    hf_dir: str | Path,
    out_dir: str | Path,
    base_dir: str | Path | None = None,
    max_shard_size: int | str = "5GB",
    progress: bool = True,
) -> Path:
    """Write the transformers-native InternVL directory ``hf_dir`` in the official format at ``out_dir``.

    Args:
        hf_dir: an ``InternVLForConditionalGeneration`` directory (safetensors weights).
        out_dir: output directory (created).
        base_dir: the official release it came from: config template, tokenizer and remote-code files.
        max_shard_size: largest weight file written.
        progress: show a progress bar.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        CheckpointError: not an InternVL hf directory, missing / unexpected / mis-shaped weights.
    """
    src, out = Path(hf_dir), Path(out_dir)
    if out.resolve() in {src.resolve(), *([Path(base_dir).resolve()] if base_dir else [])}:
        raise CheckpointError(f"output directory {out} is an input directory; choose another one")
    hf_raw = json.loads((src / "config.json").read_text(encoding="utf-8"))
    base_raw = json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8")) if base_dir else None
    raw = official_config_from_hf(hf_raw, base_raw)
    tensors = _HfTensors(src)
    present = set(tensors.files)
    alias = set()  # a head equal to the tied embedding: transformers ties it, the official directory omits it
    if is_tied(raw["llm_config"]) and {_HEAD, _EMBEDDING} <= present:
        if torch.equal(tensors.get(_HEAD), tensors.get(_EMBEDDING)):
            alias = {_HEAD}
        else:  # transformers does not tie a head that differs from the embedding (it warns), nor do we
            _set_tied(raw, False)
    expected = official_state_dict(build_empty_model(OfficialConfig.from_dict(raw), img_context_token_id=0))
    llm = raw["llm_config"]
    plan = {key: _sources([name for name, _ in hf_tensors(key, meta, llm)], present) for key, meta in expected.items()}
    wanted = {_name(source) for sources in plan.values() for source in sources} | alias
    missing, unused = sorted(wanted - present), sorted(present - wanted)
    if missing or unused:
        raise CheckpointError(
            f"{src}: weights do not match the official {llm['architectures'][0]} model of its config: "
            f"{len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unused)} without official counterpart (e.g. {unused[:3]})"
        )
    writer = ShardWriter(out, max_shard_size)
    for key, meta in tqdm(expected.items(), desc="from hf", disable=not progress):
        writer.add(key, _official_tensor(key, plan[key], meta, llm, tensors))
    writer.finish()
    if base_dir is not None:
        copy_support_files(base_dir, out)
    else:
        for name in _HF_TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, out / name)
    atomic_write_text(out / "config.json", json.dumps(raw, indent=2, ensure_ascii=False) + "\n")
    return out
