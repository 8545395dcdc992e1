"""Load the tokenizer of an official InternVL directory on transformers 5, without its remote code.

The official fine-tuning code tokenizes with transformers 4.37.2's slow tokenizers (``use_fast=False``); the
ids must be exactly theirs. InternLM2 directories name the remote ``InternLM2Tokenizer`` (``auto_map`` to the
checkpoint's own .py files); Phi-3 and Yi directories name ``LlamaTokenizer``, whose transformers 5 version
gives other ids than the 4.37 slow class. For all of them we build a fast tokenizer with the slow ids from
``tokenizer.model`` (:mod:`xtuner_vl.model.sentencepiece_fast`). Qwen2 (``Qwen2Tokenizer``) is built into
transformers 5 with the 4.37 slow ids, loaded by ``AutoTokenizer`` with ``trust_remote_code=False``; so is the
``tokenizer.json`` that ``xtuner-vl convert`` writes into official-format outputs (``PreTrainedTokenizerFast``).
No file of the directory is ever imported.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from xtuner_vl.model.sentencepiece_fast import load_sentencepiece_tokenizer

__all__ = ["IMG_CONTEXT_TOKEN", "img_context_token_id", "load_tokenizer"]

IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
logger = logging.getLogger(__name__)

_INTERNLM2_CLASSES = ("InternLM2Tokenizer", "InternLM2TokenizerFast")
_LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")


def _read_config(directory: Path) -> dict:
    config_file = directory / "tokenizer_config.json"
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing: not an InternVL checkpoint / tokenizer directory")
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from err


def _is_internlm2(config: dict) -> bool:
    if config.get("tokenizer_class") in _INTERNLM2_CLASSES:
        return True
    remote = (config.get("auto_map") or {}).get("AutoTokenizer") or []
    remote = [remote] if isinstance(remote, str) else remote
    named_remote = any(str(r).startswith("tokenization_internlm2") for r in remote)
    return not config.get("tokenizer_class") and named_remote


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load the tokenizer of an official InternVL (1.5 / 2) directory, never executing its code.

    Args:
        path: directory holding ``tokenizer_config.json`` and the family's vocabulary files.

    Returns:
        For InternLM2 directories and ``LlamaTokenizer`` / ``LlamaTokenizerFast`` directories with a
        ``tokenizer.model``: a ``PreTrainedTokenizerFast`` with the 4.37 slow ids (see
        :func:`xtuner_vl.model.sentencepiece_fast.load_sentencepiece_tokenizer`); else the transformers built-in
        class named by ``tokenizer_class`` (via ``AutoTokenizer``, ``trust_remote_code=False``).

    Raises:
        FileNotFoundError: the directory, its ``tokenizer_config.json`` or (InternLM2) ``tokenizer.model`` is
            missing.
        ValueError: ``tokenizer_config.json`` is not valid JSON, or names a remote-code class we do not
            re-implement.
    """
    directory = Path(path)
    config = _read_config(directory)
    if _is_internlm2(config):
        model_file = directory / "tokenizer.model"
        if not model_file.is_file():
            raise FileNotFoundError(f"{model_file} is missing: InternLM2 needs the sentencepiece model")
        return load_sentencepiece_tokenizer(directory)
    name = config.get("tokenizer_class")
    if (config.get("auto_map") or {}).get("AutoTokenizer") and not (name and hasattr(transformers, name)):
        raise ValueError(
            f"{directory / 'tokenizer_config.json'} names a remote-code tokenizer ({name!r}, auto_map"
            f" {config['auto_map']['AutoTokenizer']}); xtuner-vl never runs checkpoint code and supports the"
            " InternLM2, Phi-3 / Llama (sentencepiece) and Qwen2 tokenizers of the official InternVL releases"
        )
    if name in _LLAMA_CLASSES and (directory / "tokenizer.model").is_file():
        if name == "LlamaTokenizerFast":
            # transformers 4.37's AutoTokenizer keeps a "...Fast" class even with use_fast=False.
            logger.warning(
                "%s names LlamaTokenizerFast: the official code (transformers 4.37) would tokenize with the"
                " fast tokenizer there; xtuner-vl uses the slow LlamaTokenizer algorithm on tokenizer.model,"
                " whose ids can differ",
                directory / "tokenizer_config.json",
            )
        return load_sentencepiece_tokenizer(directory)
    if name and isinstance(cls := getattr(transformers, name, None), type):
        # The named class itself: AutoTokenizer would also read config.json, whose model_type (internvl_chat)
        # transformers does not know, and warn about it on every load.
        return cls.from_pretrained(str(directory))
    return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)


def img_context_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Id of ``<IMG_CONTEXT>``, the placeholder that the projected ViT tokens replace.

    Args:
        tokenizer: a tokenizer from :func:`load_tokenizer`.

    Returns:
        The id, as a single token (never split).

    Raises:
        ValueError: the tokenizer has no ``<IMG_CONTEXT>`` token (not an InternVL tokenizer).
    """
    name = tokenizer.name_or_path or type(tokenizer).__name__
    token_id = tokenizer.get_vocab().get(IMG_CONTEXT_TOKEN)
    if token_id is None:
        raise ValueError(
            f"tokenizer {name!r} has no {IMG_CONTEXT_TOKEN} token; is it the tokenizer of an InternVL"
            " checkpoint (not of the bare LLM)?"
        )
    if tokenizer.encode(IMG_CONTEXT_TOKEN, add_special_tokens=False) != [token_id]:
        raise ValueError(f"tokenizer {name!r} splits {IMG_CONTEXT_TOKEN}; it must be one added token")
    return int(token_id)
