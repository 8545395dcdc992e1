"""Fast tokenizers with exactly the ids of the official slow sentencepiece tokenizers.

The official InternVL fine-tuning code tokenizes with transformers 4.37.2 slow tokenizers (``use_fast=False``):
InternLM2's remote ``InternLM2Tokenizer`` (``tokenization_internlm2.py`` shipped in every InternLM2-based
release) and ``LlamaTokenizer`` (Phi-3 and Yi releases). All of them split the text on the added tokens
(leftmost, longest first, honouring each token's ``lstrip`` / ``rstrip``), then run sentencepiece on every
remaining chunk on its own. This module builds that algorithm as a ``tokenizers.Tokenizer`` from a directory's
``tokenizer.model`` and ``tokenizer_config.json``, using public APIs only:

- model: ``BPE`` over the sentencepiece pieces, byte fallback on; the merges are every split of every normal
  piece, ranked by the merged piece's score (sentencepiece BPE merges the best-scored adjacent pair first, the
  leftmost on a tie), so BPE reproduces sentencepiece's segmentation.
- added tokens (``added_tokens_decoder`` and the named / additional special tokens): ``normalized=False``,
  split off the raw text first as the slow tokenizers do. Sentencepiece user-defined pieces that are no added
  token (Yi's reserved pieces) become ``normalized=True`` added tokens: sentencepiece keeps them whole inside
  a chunk, after normalization.
- normalizer: the model's precompiled character map, if any, its dummy prefix (``▁`` before every chunk: the
  legacy algorithm), spaces to ``▁``. InternLM2 and Yi have no dummy prefix.
- ``legacy: false`` (Phi-3 as released): transformers 4.37 runs the model without dummy prefix, replaces the
  text's own ``▁`` by spaces and prepends one ``▁`` to the whole text, dropped again when the text starts with
  a special token. A lone ``▁`` before a leading added token that is not special (``<|system|>``, the Phi-3
  chat template's first token) cannot come out of a tokenizers pipeline (a normalizer would also rewrite the
  added tokens' own text), so :class:`NonLegacyLlamaTokenizerFast` applies that text step in Python before the
  pipeline. The 4.37 code encodes chunks after ``<unk>`` and cuts its pieces off; that equals plain encoding
  unless a piece spans the ``<unk>`` boundary, which :func:`build_sentencepiece_tokenizer` checks.
- decode follows the fast pipeline (``▁`` to spaces, byte fallback, one leading space stripped after a dummy
  prefix); the 4.37 slow decoders also put spaces around special and added tokens. Ids are what training
  depends on; decode is only used to read generated answers. ``tokenize`` returns the matched text of an
  added token, so a token with ``rstrip`` / ``lstrip`` shows the whitespace it ate (``"<|end|>\\n"``); its id
  is the token's.

The ids are checked against golden ids of the official tokenizers in tests/model/test_tokenizer.py.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "NonLegacyLlamaTokenizerFast",
    "build_sentencepiece_tokenizer",
    "load_sentencepiece_tokenizer",
    "tokenizer_json_for_release",
]

SPIECE_UNDERLINE = "▁"
_NAMED = ("bos_token", "eos_token", "unk_token", "pad_token")
_Piece = sp_pb2.ModelProto.SentencePiece


def _content(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an ``AddedToken`` dict."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _specials(config: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    named = {k: _content(config[k]) for k in _NAMED if _content(config.get(k)) is not None}
    extra = [_content(t) for t in config.get("additional_special_tokens") or []]
    return named, extra


def _added_tokens(directory: Path, config: dict[str, Any], vocab: dict[str, int]) -> dict[int, AddedToken]:
    """id -> added token, as the 4.37 slow tokenizer registers them: ``added_tokens_decoder`` (or, in older
    directories, ``added_tokens.json``), then every named and additional special token."""
    named, extra = _specials(config)
    slow_special = set(named.values()) | set(extra)
    flags: dict[int, dict[str, Any]] = {}
    for index, entry in (config.get("added_tokens_decoder") or {}).items():
        flags[int(index)] = entry
    if not flags:
        for content, index in _read_json(directory / "added_tokens.json").items():
            flags[int(index)] = {"content": content}
    known = {entry["content"] for entry in flags.values()}
    next_id = max([len(vocab) - 1, *flags]) + 1
    for content in [*named.values(), *extra]:
        if content not in known:
            index = vocab.get(content)
            if index is None:
                index, next_id = next_id, next_id + 1
            flags[index] = {"content": content}
            known.add(content)
    tokens = {}
    for index, entry in sorted(flags.items()):
        if entry.get("single_word"):
            raise ValueError(f"{directory}: added token {entry['content']!r} is single_word; not supported")
        tokens[index] = AddedToken(
            entry["content"],
            lstrip=bool(entry.get("lstrip")),
            rstrip=bool(entry.get("rstrip")),
            single_word=False,
            normalized=False,
            special=entry["content"] in slow_special,
        )
    return tokens


def _merges(proto: sp_pb2.ModelProto, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of every normal piece into two pieces, best-scored merged piece first."""
    ranked = []
    for index, piece in enumerate(proto.pieces):
        if piece.type != _Piece.NORMAL:
            continue
        text = piece.piece
        for k in range(1, len(text)):
            left, right = text[:k], text[k:]
            if left in vocab and right in vocab:
                ranked.append((-piece.score, index, vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def _check_model(proto: sp_pb2.ModelProto, model_file: Path) -> None:
    spec = proto.normalizer_spec
    if proto.trainer_spec.model_type != sp_pb2.TrainerSpec.BPE:
        raise ValueError(f"{model_file}: only sentencepiece BPE models are supported (InternLM2, Llama, Yi)")
    if spec.remove_extra_whitespaces or not spec.escape_whitespaces or proto.trainer_spec.treat_whitespace_as_suffix:
        raise ValueError(f"{model_file}: whitespace folding / suffix whitespace is not supported")
    scores = [p.score for p in proto.pieces if p.type == _Piece.NORMAL]
    if len(set(scores)) != len(scores):
        raise ValueError(f"{model_file}: normal pieces share scores; BPE merge ranks would be ambiguous")


def _check_unk_boundary(proto: sp_pb2.ModelProto, unk: str, model_file: Path) -> None:
    """4.37 non-legacy encodes ``unk + chunk`` and cuts the unk pieces off: plain encoding of the chunk only
    when no piece spans the boundary (a suffix of ``unk`` followed by the chunk's leading ``▁``)."""
    suffixes = [unk[k:] for k in range(len(unk))]
    for piece in proto.pieces:
        if any(piece.piece.startswith(s + SPIECE_UNDERLINE) for s in suffixes):
            raise ValueError(
                f"{model_file}: piece {piece.piece!r} spans the {unk!r} prefix of the non-legacy "
                "Llama algorithm; not supported"
            )


def build_sentencepiece_tokenizer(directory: str | os.PathLike) -> tuple[Tokenizer, dict[str, Any]]:
    """Build the fast pipeline of a sentencepiece tokenizer directory (InternLM2, Phi-3, Yi / Llama).

    Args:
        directory: holds ``tokenizer.model`` and ``tokenizer_config.json``.

    Returns:
        The ``tokenizers.Tokenizer`` (without BOS / EOS post-processing: :func:`load_sentencepiece_tokenizer`
        sets it) and the ``PreTrainedTokenizerFast`` keyword arguments read from the config, with ``legacy``.

    Raises:
        FileNotFoundError: ``tokenizer.model`` is missing.
        ValueError: a sentencepiece model or token flag this algorithm does not cover (see the checks).
    """
    directory = Path(directory)
    model_file = directory / "tokenizer.model"
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file} is missing: sentencepiece tokenizers need it")
    config = _read_json(directory / "tokenizer_config.json")
    proto = sp_pb2.ModelProto.FromString(model_file.read_bytes())
    _check_model(proto, model_file)
    internlm2 = not str(config.get("tokenizer_class", "")).startswith("Llama")
    legacy = internlm2 or config.get("legacy") is not False
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    bpe = models.BPE(vocab, _merges(proto, vocab), unk_token=unk, fuse_unk=True, byte_fallback=True)
    fast = Tokenizer(bpe)
    spec = proto.normalizer_spec
    dummy_prefix = spec.add_dummy_prefix and legacy  # non-legacy: the model runs without it
    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    steps += [normalizers.Prepend(SPIECE_UNDERLINE)] if dummy_prefix else []
    fast.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPIECE_UNDERLINE)])
    strip = [decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix or not legacy else []
    fast.decoder = decoders.Sequence(
        [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    added = _added_tokens(directory, config, vocab)
    fast.add_tokens([added[i] for i in sorted(added)])
    contents = {t.content for t in added.values()}
    user_defined = [p.piece for p in proto.pieces if p.type == _Piece.USER_DEFINED and p.piece not in contents]
    if user_defined and dummy_prefix:
        raise ValueError(f"{model_file}: user-defined pieces {user_defined[:3]} with a dummy prefix are not supported")
    fast.add_tokens([AddedToken(p, normalized=True, special=False) for p in user_defined])
    if not legacy:
        _check_unk_boundary(proto, _content(config.get("unk_token")) or unk, model_file)
    named, extra = _specials(config)
    kwargs: dict[str, Any] = {
        **named,
        "additional_special_tokens": extra,
        "add_bos_token": config.get("add_bos_token", True),
        "add_eos_token": config.get("add_eos_token", False),
        "clean_up_tokenization_spaces": config.get("clean_up_tokenization_spaces", False),
        "legacy": legacy,
    }
    for key in ("model_max_length", "padding_side", "chat_template"):
        if config.get(key) is not None:
            kwargs[key] = config[key]
    return fast, kwargs


def load_sentencepiece_tokenizer(directory: str | os.PathLike) -> PreTrainedTokenizerFast:
    """The tokenizer of a sentencepiece directory with the official slow tokenizer's ids.

    Args:
        directory: an InternLM2, Phi-3 or Yi / Llama tokenizer directory.

    Returns:
        A ``PreTrainedTokenizerFast``; a :class:`NonLegacyLlamaTokenizerFast` for ``legacy: false`` Llama
        directories.
    """
    fast, kwargs = build_sentencepiece_tokenizer(directory)
    cls = PreTrainedTokenizerFast if kwargs.pop("legacy") else NonLegacyLlamaTokenizerFast
    return cls(tokenizer_object=fast, name_or_path=str(directory), **kwargs)


class NonLegacyLlamaTokenizerFast(PreTrainedTokenizerFast):
    """transformers 4.37 ``LlamaTokenizer`` with ``legacy: false``: a text step, then the fast pipeline.

    The text's ``▁`` become spaces and one ``▁`` is prepended, unless the 4.37 code would drop it again
    (the text starts with a special token, after whitespace that token's ``lstrip`` eats). Applied by
    ``__call__``, ``encode`` and ``tokenize`` to ``str`` inputs and lists of them; offsets refer to the
    transformed text. Not saved: the step is not part of ``tokenizer.json``.
    """

    def _leading_special(self, text: str) -> bool:
        added = self.added_tokens_encoder
        if getattr(self, "_pattern_for", None) != len(added):
            ordered = sorted(added, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(t) for t in ordered))
            self._pattern_for = len(added)
        match = self._pattern.search(text)
        if match is None:
            return False
        head = text[: match.start()]
        if self.added_tokens_decoder[added[match.group()]].lstrip:
            head = head.rstrip()
        return head == SPIECE_UNDERLINE and match.group() in self.all_special_tokens

    def official_text(self, text: str) -> str:
        """The text the fast pipeline sees, as 4.37 ``LlamaTokenizer.tokenize`` prepares it (non-legacy)."""
        if not text:
            return text
        text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        return text[1:] if self._leading_special(text) else text

    def _mapped(self, text: Any) -> Any:
        if isinstance(text, str):
            return self.official_text(text)
        if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
            return [self.official_text(t) for t in text]
        if text is None:
            return None
        raise TypeError(f"{type(self).__name__} takes str or a list of str (no pre-split words)")

    def __call__(self, text: Any = None, text_pair: Any = None, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedTokenizerFast.__call__`` on the 4.37-prepared texts."""
        if kwargs.get("is_split_into_words"):
            raise TypeError(f"{type(self).__name__} does not take pre-split words")
        for key in ("text_target", "text_pair_target"):
            if key in kwargs:
                kwargs[key] = self._mapped(kwargs[key])
        return super().__call__(self._mapped(text), self._mapped(text_pair), *args, **kwargs)

    def encode(self, text: Any, text_pair: Any = None, *args: Any, **kwargs: Any) -> list[int]:
        """``PreTrainedTokenizerFast.encode`` on the 4.37-prepared texts."""
        return super().encode(self._mapped(text), self._mapped(text_pair), *args, **kwargs)

    def tokenize(
        self, text: str, pair: str | None = None, add_special_tokens: bool = False, **kwargs: Any
    ) -> list[str]:
        """``PreTrainedTokenizerFast.tokenize`` on the 4.37-prepared texts."""
        return super().tokenize(self._mapped(text), self._mapped(pair), add_special_tokens, **kwargs)

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        """Refused: ``tokenizer.json`` cannot hold the text step; keep the release's own tokenizer files."""
        raise NotImplementedError(
            "the non-legacy Llama (Phi-3) tokenizer prepares texts in Python; save the release's tokenizer files"
        )


def tokenizer_json_for_release(tokenizer: PreTrainedTokenizerFast) -> str:
    """``tokenizer.json`` text of ``tokenizer``'s pipeline, readable by tokenizers 0.15 (transformers 4.37).

    Current tokenizers write merges as pairs and an ``ignore_merges`` flag, which tokenizers before 0.19 / 0.20
    cannot read; merges are written as ``"a b"`` strings (sentencepiece pieces hold no spaces).

    Raises:
        ValueError: ``tokenizer`` needs a text step outside its pipeline (:class:`NonLegacyLlamaTokenizerFast`),
            or a merge holds a space.
    """
    if isinstance(tokenizer, NonLegacyLlamaTokenizerFast):
        raise ValueError("a non-legacy Llama tokenizer cannot be written as tokenizer.json alone")
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model = data["model"]
    if model.get("type") == "BPE":
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        if any(m.count(" ") != 1 for m in merges):
            raise ValueError("a BPE merge holds a space; it cannot be written in the tokenizers 0.15 format")
        model["merges"] = merges
        model.pop("ignore_merges", None)
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
