"""Merged export to the official InternVL format, streamed shard by shard over the base directory.

Tokenizer files, served as trained: the official InternLM2 directories map ``AutoTokenizer`` to the remote
``tokenization_internlm2_fast.InternLM2TokenizerFast`` (``auto_map``), which transformers 5 and vLLM pick with
``trust_remote_code`` and which splits text otherwise than the slow ``InternLM2Tokenizer`` the model was
trained with (" who are you" -> ``w, ho, a, re, y``); transformers 5 rebuilds Yi's ``LlamaTokenizer`` with other
ids as well. For these directories (sentencepiece, legacy algorithm) the output gets the training tokenizer's
own pipeline as ``tokenizer.json`` and a ``tokenizer_config.json`` naming ``PreTrainedTokenizerFast`` without
the ``AutoTokenizer`` remote-code entry: a built-in class every loader resolves without running code
(transformers 4.37 with ``use_fast=False`` too, which loads ``PreTrainedTokenizerFast`` for that name), so
transformers, vLLM and lmdeploy all tokenize with the training ids. Pointing ``auto_map`` at the slow class
only would still run checkpoint code, which breaks on new transformers. ``tokenizer.model`` and the remote
``.py`` files stay for tools that read them. Phi-3 (``legacy: false``) needs a text step that ``tokenizer.json``
cannot hold, and Qwen2's files already give the training ids: both are copied unchanged.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from xtuner_vl.checkpoint.delta import TrainedDelta, merge_lora_weight
from xtuner_vl.checkpoint.stream import ShardWriter, iter_base_tensors
from xtuner_vl.checkpoint.trained import CheckpointError, materialize
from xtuner_vl.model.saver import copy_support_files
from xtuner_vl.model.sentencepiece_fast import tokenizer_json_for_release
from xtuner_vl.model.tokenizer import load_tokenizer
from xtuner_vl.model.weights import atomic_write_text

__all__ = ["DTYPES", "DTYPE_NAMES", "converted_config", "export_official", "write_served_tokenizer"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def converted_config(
    base: Mapping[str, Any], dtype: torch.dtype, changed: Mapping[str, Any], vision_changed: Mapping[str, Any]
) -> dict[str, Any]:
    """The base config.json with the run's changes: merged LoRA flags 0, ``torch_dtype`` = ``dtype``,
    top-level fields ``changed`` and ``vision_config`` fields ``vision_changed``; nothing else added."""
    raw = copy.deepcopy(dict(base))
    raw.update(changed)
    raw["use_backbone_lora"] = 0
    raw["use_llm_lora"] = 0
    raw["torch_dtype"] = DTYPE_NAMES[dtype]
    raw["vision_config"].update(vision_changed)
    for sub in ("llm_config", "vision_config"):
        if "torch_dtype" in raw[sub]:
            raw[sub]["torch_dtype"] = DTYPE_NAMES[dtype]
    return raw


def write_served_tokenizer(base_dir: str | Path, out_dir: str | Path) -> bool:
    """Write the training tokenizer of ``base_dir`` into ``out_dir`` as ``tokenizer.json`` +
    ``tokenizer_config.json`` (``PreTrainedTokenizerFast``, no remote-code ``AutoTokenizer``), see the module
    docstring. Other files are left as they are.

    Returns:
        Whether the files were written (sentencepiece directories with the legacy algorithm: InternLM2, Yi);
        False leaves the copied release files (Phi-3 ``legacy: false``, Qwen2, directories without
        ``tokenizer.model``).
    """
    base, out = Path(base_dir), Path(out_dir)
    if not (base / "tokenizer.model").is_file():
        return False
    tokenizer = load_tokenizer(base)
    if type(tokenizer) is not PreTrainedTokenizerFast:  # subclasses: Qwen2's, non-legacy Llama's text step
        return False
    config = json.loads((base / "tokenizer_config.json").read_text(encoding="utf-8"))
    auto_map = {k: v for k, v in (config.pop("auto_map", None) or {}).items() if k != "AutoTokenizer"}
    if auto_map:
        config["auto_map"] = auto_map
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["added_tokens_decoder"] = {
        str(i): {
            "content": t.content,
            "lstrip": t.lstrip,
            "normalized": t.normalized,
            "rstrip": t.rstrip,
            "single_word": t.single_word,
            "special": t.special,
        }
        for i, t in sorted(tokenizer.added_tokens_decoder.items())
    }
    atomic_write_text(out / "tokenizer.json", tokenizer_json_for_release(tokenizer))
    text = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write_text(out / "tokenizer_config.json", text)
    return True


def _converted(key: str, tensor: torch.Tensor, delta: TrainedDelta, dtype: torch.dtype) -> torch.Tensor:
    if key in delta.replacements:
        tensor = materialize(delta.replacements[key])
    elif key in delta.loras:
        # The base weight as released (bf16 for QLoRA too: never the nf4 copy training used).
        tensor = merge_lora_weight(tensor, delta.loras[key])
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def export_official(
    delta: TrainedDelta,
    base_dir: str | Path,
    out_dir: str | Path,
    config: Mapping[str, Any],
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: int | str = "5GB",
    progress: bool = True,
) -> list[str]:
    """Write base + ``delta`` as an official InternVL directory, one tensor at a time.

    Every key of the base is written once, with its base shape, in ``dtype`` (non-floating tensors
    unchanged); replaced tensors come from the checkpoint, LoRA targets are merged in fp32. Remote-code,
    tokenizer and generation files are copied from ``base_dir``, the tokenizer is then written as served
    (:func:`write_served_tokenizer`), and ``config`` is written as config.json.

    Returns:
        The names of the weight files written.

    Raises:
        CheckpointError: ``out_dir`` is ``base_dir``, or a delta key was never met in the base.
    """
    base, out = Path(base_dir), Path(out_dir)
    if out.resolve() == base.resolve():
        raise CheckpointError(f"output directory {out} is the base directory; choose another one")
    writer = ShardWriter(out, max_shard_size)
    seen = set()
    for key, tensor in iter_base_tensors(base, "convert" if progress else None):
        writer.add(key, _converted(key, tensor, delta, dtype))
        seen.add(key)
        del tensor  # not held while the next one is read
    unused = delta.touched() - seen
    if unused:
        raise CheckpointError(f"{sorted(unused)[:5]} of the checkpoint were not found in {base}")
    names = writer.finish()
    copy_support_files(base, out)
    write_served_tokenizer(base, out)
    atomic_write_text(out / "config.json", json.dumps(dict(config), indent=2, ensure_ascii=False) + "\n")
    return names
