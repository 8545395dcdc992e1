"""Tiny tokenizers, trained locally, in the exact on-disk format of the official InternVL releases.

One writer per LLM family, each mirroring a release directory: file names, ``tokenizer_config.json``
fields, special tokens and their flags, sentencepiece normalizer settings, and InternVL's 9 image tokens
added right after the family's own tokens. Only the vocabularies are tiny (a few hundred pieces, trained
on a small built-in corpus), so the ids differ from the real ones; ask the tokenizer for them.

- ``internlm2`` (InternVL2-2B/8B/26B, InternVL-Chat-V1-5, Mini-InternVL-Chat-2B-V1-5): sentencepiece BPE,
  no dummy prefix, chat tokens as the last user-defined pieces of the sentencepiece vocab (in the order of
  the real ids 92538-92543), remote-code ``auto_map``.
- ``phi3`` (InternVL2-4B, Mini-InternVL-Chat-4B-V1-5): Phi-3-mini's Llama-2 style sentencepiece model plus
  ``tokenizer.json``, with Phi-3's 11 added tokens (chat markers strip the whitespace on their right).
- ``qwen2`` (InternVL2-1B): byte-level BPE (``vocab.json``, ``merges.txt``, ``tokenizer.json``), no BOS.
- ``llama`` (InternVL2-40B, Nous-Hermes-2-Yi-34B): Yi's sentencepiece layout (``<|startoftext|>``,
  ``<|endoftext|>``, ChatML tokens at ids 6-8, no dummy prefix), ``LlamaTokenizer``, no BOS.
  InternVL2-76B's Llama-3 tiktoken-style tokenizer is not modelled.
- ``gpt_oss`` (InternVL3_5-GPT-OSS-20B-A4B): gpt-oss-20b's o200k_harmony layout (``tokenizer.json`` only,
  ``PreTrainedTokenizerFast``): byte-level BPE with the o200k split regex and ``ignore_merges``, no BOS added,
  then the 21 harmony special tokens (ids 199998-200018 in the real vocab, ``<|reserved_*|>`` ones included),
  as https://huggingface.co/openai/gpt-oss-20b ``tokenizer_config.json`` lists them; ``<|return|>`` is EOS.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

__all__ = ["IMAGE_TOKENS", "TOKENIZER_FAMILIES", "write_tiny_tokenizer"]

# InternVL's tokens, appended by its training code right after each family's own vocabulary.
IMAGE_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
INTERNLM2_CHAT_TOKENS = (
    "<|plugin|>",
    "<|interpreter|>",
    "<|action_end|>",
    "<|action_start|>",
    "<|im_end|>",
    "<|im_start|>",
)
# Phi-3-mini's added tokens (ids 32000-32010 in the real vocab), and whether each eats the whitespace on its
# right (rstrip).
PHI3_TOKENS = (
    ("<|endoftext|>", False),
    ("<|assistant|>", True),
    ("<|placeholder1|>", True),
    ("<|placeholder2|>", True),
    ("<|placeholder3|>", True),
    ("<|placeholder4|>", True),
    ("<|system|>", True),
    ("<|end|>", True),
    ("<|placeholder5|>", True),
    ("<|placeholder6|>", True),
    ("<|user|>", True),
)
QWEN2_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Yi: ids 3-5 are reserved pieces (unused by InternVL), ChatML tokens at 6-8.
YI_PIECES = ("<|reserved_3|>", "<|reserved_4|>", "<|reserved_5|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>")
# gpt-oss-20b's added tokens, in id order (199998-200018 in the real vocab).
GPT_OSS_TOKENS = (
    "<|startoftext|>",
    "<|endoftext|>",
    "<|reserved_200000|>",
    "<|reserved_200001|>",
    "<|return|>",
    "<|constrain|>",
    "<|reserved_200004|>",
    "<|channel|>",
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|reserved_200009|>",
    "<|reserved_200010|>",
    "<|reserved_200011|>",
    "<|call|>",
    *(f"<|reserved_{i}|>" for i in range(200013, 200018)),
    "<|endofprompt|>",
)
TOKENIZER_FAMILIES = ("internlm2", "phi3", "qwen2", "llama", "gpt_oss")

_SP_VOCAB = 640  # sentencepiece pieces (with the family's own user-defined pieces)
_BPE_VOCAB = 640  # byte-level BPE vocab before added tokens
_MODEL_MAX_LENGTH = 8192  # InternVL's fine-tuning sets this before saving the tokenizer
_INTERNLM2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# o200k_base's pre-tokenization regex (openai/tiktoken tiktoken_ext/openai_public.py), which o200k_harmony keeps.
_O200K_SPLIT = "|".join(
    (
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    )
)
_GPT_OSS_CORPUS = (  # harmony words and InternVL3.5-GPT-OSS's default system message, for the gpt_oss vocab only
    "You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: 2024-06\n"
    "Current date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. Channel must be included for every "
    "message.",
    "assistant final analysis commentary user system developer tool functions",
)

# ------------------------------------------------------------------------------------------- corpus
_SYSTEM_MESSAGES = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。",
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。",
    "You are an AI assistant whose name is InternLM (书生·浦语).",
    "You are an AI assistant whose name is Phi-3.",
    "Answer the questions.",
)
_WORDS = (
    "the a an of to and in on is are it that this what which who where when how why image picture photo "
    "describe please detail color red green blue white black small large left right top bottom cat dog "
    "person man woman child car tree house street sky water table chair book phone there two three one many "
    "some no yes answer question user assistant system frame text read write number count show see look box "
    "region object scene background hello world model train data token vision language chart document video"
).split()
_PUNCT = ".,!?;:'\"()[]{}-_/@#$%&*+=<>|~`^\\"


def _corpus() -> Iterator[str]:
    """A small deterministic corpus: English words, digits, punctuation, newlines and the system messages."""
    yield from _SYSTEM_MESSAGES * 8
    yield from ("user\n", "assistant\n", "system\n", "Image-1: ", "Frame-1: ", _PUNCT, "0 1 2 3 4 5 6 7 8 9")
    for i in range(1500):
        n = 4 + i % 9
        words = [_WORDS[(i * 31 + j * 17 + (i * j) % 7) % len(_WORDS)] for j in range(n)]
        words[0] = words[0].capitalize() if i % 3 else words[0]
        line = " ".join(words) + ".?!,:"[i % 5]
        if i % 4 == 0:
            line += f" {(i * 37) % 1000} [[{i % 100}, {(i * 3) % 1000}, {(i * 7) % 1000}, {(i * 11) % 1000}]]"
        if i % 5 == 0:
            line += "\n" + _SYSTEM_MESSAGES[i % 2][: 8 + i % 30]
        if i % 6 == 0:
            line = "  " + line + "\n\n" + _PUNCT[i % len(_PUNCT)] + " (" + words[-1] + ")"
        yield line


# ------------------------------------------------------------------------------------- sentencepiece
def _train_sentencepiece(
    add_dummy_prefix: bool, vocab_size: int = _SP_VOCAB, head_pieces: tuple[str, ...] = (), **specs: Any
) -> sp_pb2.ModelProto:
    """Train a byte-fallback BPE model (Llama-2 / InternLM2 style settings) and return its proto."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_corpus(),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        shuffle_input_sentence=False,
        user_defined_symbols=list(head_pieces),
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        **specs,
    )
    return sp_pb2.ModelProto.FromString(buf.getvalue())


def _added(content: str, special: bool = True, rstrip: bool = False) -> dict[str, Any]:
    """An ``added_tokens_decoder`` entry; the releases' added tokens are never normalized."""
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": rstrip,
        "single_word": False,
        "special": special,
    }


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _save_fast(fast: Tokenizer, path: Path, decoder: dict | None = None, **model_fields: Any) -> None:
    """Save ``tokenizer.json`` in the layout of the releases (merges as ``"a b"`` strings, no
    ``ignore_merges``), which the tokenizers versions pinned by the official code (< 0.19) can read."""
    data = json.loads(fast.to_str())
    data["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    data["model"].pop("ignore_merges", None)
    data["model"].update(model_fields)
    if decoder is not None:  # tokenizers' ByteLevel decoder no longer serializes its (unused) options
        data["decoder"] = decoder
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_common(out: Path, config: dict[str, Any], decoder: dict[int, dict], first_added: int | None) -> int:
    """Write tokenizer_config.json, special_tokens_map.json and added_tokens.json as transformers 4.37 did
    (4.55 with a fast-only tokenizer: ``first_added=None`` writes no added_tokens.json)."""
    config = {
        **config,
        "added_tokens_decoder": {str(i): decoder[i] for i in sorted(decoder)},
        "model_max_length": _MODEL_MAX_LENGTH,
    }
    _write_json(out / "tokenizer_config.json", config)
    special_map: dict[str, Any] = {}
    if "additional_special_tokens" in config:
        special_map["additional_special_tokens"] = config["additional_special_tokens"]
    by_content = {d["content"]: d for d in decoder.values()}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if config.get(key) is not None:
            special_map[key] = {k: v for k, v in by_content[config[key]].items() if k != "special"}
    _write_json(out / "special_tokens_map.json", special_map)
    if first_added is not None:
        _write_json(out / "added_tokens.json", {d["content"]: i for i, d in decoder.items() if i >= first_added})
    return max(decoder) + 1


def _write_internlm2(out: Path) -> int:
    proto = _train_sentencepiece(add_dummy_prefix=False, vocab_size=_SP_VOCAB - len(INTERNLM2_CHAT_TOKENS))
    for token in INTERNLM2_CHAT_TOKENS:  # last pieces of the vocab, in the real order (92538..92543)
        proto.pieces.add(piece=token, score=0.0, type=sp_pb2.ModelProto.SentencePiece.USER_DEFINED)
    proto.trainer_spec.vocab_size = len(proto.pieces)
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())
    n = len(proto.pieces)
    names = ("<unk>", "<s>", "</s>") + INTERNLM2_CHAT_TOKENS
    decoder = {i: _added(t) for i, t in zip((0, 1, 2, *range(n - 6, n)), names, strict=True)}
    decoder.update({n + k: _added(t) for k, t in enumerate(IMAGE_TOKENS)})
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "additional_special_tokens": [
            "<|im_start|>",
            "<|im_end|>",
            "<|action_start|>",
            "<|action_end|>",
            "<|interpreter|>",
            "<|plugin|>",
            *IMAGE_TOKENS,
        ],
        "auto_map": {
            "AutoTokenizer": [
                "tokenization_internlm2.InternLM2Tokenizer",
                "tokenization_internlm2_fast.InternLM2TokenizerFast",
            ]
        },
        "bos_token": "<s>",
        "chat_template": _INTERNLM2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False,
        "eos_token": "</s>",
        "pad_token": "</s>",
        "sp_model_kwargs": {},
        "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>",
    }
    return _write_common(out, config, decoder, n)


def _sp_merges(proto: sp_pb2.ModelProto) -> list[tuple[str, str]]:
    """BPE merges equivalent to a sentencepiece BPE model: every split of a normal piece into two pieces,
    ranked by the merged piece's id (sentencepiece merges the highest-scored, i.e. lowest-id, piece first)."""
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = []
    for piece in proto.pieces:
        if piece.type != sp_pb2.ModelProto.SentencePiece.NORMAL:
            continue
        text = piece.piece
        splits = [(text[:k], text[k:]) for k in range(1, len(text))]
        splits = [(left, right) for left, right in splits if left in vocab and right in vocab]
        merges.extend(sorted(splits, key=lambda lr: (vocab[lr[0]], vocab[lr[1]])))
    return merges


def _write_phi3(out: Path) -> int:
    proto = _train_sentencepiece(add_dummy_prefix=True)
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())
    n = len(proto.pieces)
    decoder = {0: _added("<unk>"), 1: _added("<s>"), 2: _added("</s>", special=False, rstrip=True)}
    decoder.update({n + k: _added(t, rstrip=rstrip) for k, (t, rstrip) in enumerate(PHI3_TOKENS)})
    decoder.update({n + len(PHI3_TOKENS) + k: _added(t) for k, t in enumerate(IMAGE_TOKENS)})
    # tokenizer.json as transformers 4.x converted Phi-3's slow tokenizer (legacy Llama layout).
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    bpe = models.BPE(vocab, _sp_merges(proto), unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    fast = Tokenizer(bpe)
    fast.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    fast.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    fast.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    fast.add_special_tokens([AddedToken(**{k: v for k, v in d.items()}) for _, d in sorted(decoder.items())])
    _save_fast(fast, out / "tokenizer.json")
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "additional_special_tokens": list(IMAGE_TOKENS),
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": False,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    return _write_common(out, config, decoder, n)


def _train_byte_level(fast: Tokenizer, corpus: Iterable[str]) -> int:
    """Train ``fast``'s BPE model on ``corpus`` over the 256 byte-level symbols; returns its vocabulary size."""
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    fast.train_from_iterator(corpus, trainer=trainer)
    return fast.get_vocab_size()


def _write_qwen2(out: Path) -> int:
    fast = Tokenizer(models.BPE(dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False))
    fast.normalizer = normalizers.NFC()
    fast.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    fast.decoder = decoders.ByteLevel()
    fast.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    n = _train_byte_level(fast, _corpus())
    decoder = {n + k: _added(t) for k, t in enumerate(QWEN2_TOKENS + IMAGE_TOKENS)}
    fast.add_special_tokens([AddedToken(**d) for _, d in sorted(decoder.items())])
    byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    _save_fast(
        fast,
        out / "tokenizer.json",
        decoder={"type": "ByteLevel", **byte_level},
        continuing_subword_prefix="",
        end_of_word_suffix="",
    )
    fast.model.save(str(out))  # vocab.json + merges.txt, the slow Qwen2Tokenizer's files
    config = {
        "add_prefix_space": False,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", *IMAGE_TOKENS],
        "bos_token": None,
        "chat_template": _QWEN2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    return _write_common(out, config, decoder, n)


def _write_llama(out: Path) -> int:
    proto = _train_sentencepiece(
        add_dummy_prefix=False, head_pieces=YI_PIECES, bos_piece="<|startoftext|>", eos_piece="<|endoftext|>"
    )
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())
    n = len(proto.pieces)
    decoder = {0: _added("<unk>"), 1: _added("<|startoftext|>"), 2: _added("<|endoftext|>")}
    decoder.update({6: _added("<|im_start|>"), 7: _added("<|im_end|>"), 8: _added("<|im_sep|>")})
    decoder.update({n + k: _added(t) for k, t in enumerate(IMAGE_TOKENS)})
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "additional_special_tokens": list(IMAGE_TOKENS),
        "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "legacy": True,
        "pad_token": "<unk>",
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    return _write_common(out, config, decoder, n)


def _write_gpt_oss(out: Path) -> int:
    fast = Tokenizer(models.BPE(dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False))
    fast.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_O200K_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    fast.decoder = decoders.ByteLevel()
    fast.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    n = _train_byte_level(fast, [*_corpus(), *_GPT_OSS_CORPUS * 8])
    decoder = {n + k: _added(t) for k, t in enumerate(GPT_OSS_TOKENS + IMAGE_TOKENS)}
    fast.add_special_tokens([AddedToken(**d) for _, d in sorted(decoder.items())])
    # tokenizer.json laid out as transformers' TikTokenConverter (convert_slow_tokenizer.py) builds a tiktoken
    # vocab: merges as pairs, ignore_merges on, ByteLevel decoder and post-processor with their default options.
    data = json.loads(fast.to_str())
    data["model"].update(ignore_merges=True, continuing_subword_prefix="", end_of_word_suffix="")
    data["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    (out / "tokenizer.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    # tokenizer_config.json as transformers 4.55 saves it after InternVL's training code loaded the tokenizer with
    # add_eos_token=False and added the image tokens with add_tokens(..., special_tokens=True).
    config = {
        "add_eos_token": False,
        "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|return|>",
        "extra_special_tokens": {},
        "model_input_names": ["input_ids", "attention_mask"],
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    return _write_common(out, config, decoder, None)


_WRITERS = {
    "internlm2": _write_internlm2,
    "phi3": _write_phi3,
    "qwen2": _write_qwen2,
    "llama": _write_llama,
    "gpt_oss": _write_gpt_oss,
}


def write_tiny_tokenizer(family: str, out_dir: str | os.PathLike) -> int:
    """Write a tiny tokenizer of ``family`` in the official InternVL on-disk format; same bytes every run.

    Args:
        family: one of ``internlm2``, ``phi3``, ``qwen2``, ``llama``, ``gpt_oss`` (see the module docstring).
        out_dir: directory to write into (created if missing); existing tokenizer files are overwritten.

    Returns:
        The vocabulary size including added tokens (what ``len(tokenizer)`` gives); set the LLM config's
        ``vocab_size`` to it.

    Raises:
        ValueError: on an unknown family.
    """
    if family not in _WRITERS:
        raise ValueError(f"unknown tokenizer family {family!r}; choose from {', '.join(TOKENIZER_FAMILIES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _WRITERS[family](out)
