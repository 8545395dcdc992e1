"""Our own InternLM2 tokenizer: ids and decode of the official slow ``InternLM2Tokenizer``, on transformers 5.

The official class (remote code shipped in every InternLM2-based InternVL checkpoint) is a slow
transformers-4.37 tokenizer. Its behaviour, which this class reproduces exactly:

- encode: the text is split on the added tokens (longest match first, leftmost first: the tokens of
  ``added_tokens_decoder``, i.e. ``<s>``, ``</s>``, ``<unk>``, the chat tokens and InternVL's image tokens),
  honouring each token's ``lstrip``/``rstrip``/``single_word`` flags; every remaining chunk is encoded
  on its own by sentencepiece with the model's own normalizer settings (InternLM2's ``tokenizer.model``
  has ``add_dummy_prefix`` off, so no ``▁`` is prepended to a chunk, and spaces are kept as they are).
  ``<s>`` is prepended when ``add_bos_token`` (default), ``</s>`` appended when ``add_eos_token``.
- decode: special tokens (named + ``additional_special_tokens``) inside the sentencepiece vocab are
  glued to the text with one space before a run of them; added tokens past the sentencepiece vocab are
  joined with spaces (``spaces_between_special_tokens``); the transformers ``clean_up_tokenization``
  rules always run on the sentencepiece part, as in the official ``convert_tokens_to_string``.

Nothing here imports or executes code from a checkpoint directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import sentencepiece as spm
from transformers.tokenization_python import PreTrainedTokenizer
from transformers.tokenization_utils_base import AddedToken

__all__ = ["OFFICIAL_AUTO_MAP", "InternLM2Tokenizer"]

# What the official tokenizer_config.json points at; written back on save so that the official remote
# code (lmdeploy, vLLM, transformers with trust_remote_code) still loads a directory we saved.
OFFICIAL_AUTO_MAP = {
    "AutoTokenizer": [
        "tokenization_internlm2.InternLM2Tokenizer",
        "tokenization_internlm2_fast.InternLM2TokenizerFast",
    ]
}
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _added_token_dict(token: AddedToken) -> dict[str, Any]:
    return {
        "content": token.content,
        "lstrip": token.lstrip,
        "normalized": token.normalized,
        "rstrip": token.rstrip,
        "single_word": token.single_word,
        "special": token.special,
    }


class InternLM2Tokenizer(PreTrainedTokenizer):
    """Sentencepiece InternLM2 tokenizer with the official slow tokenizer's ids and decode.

    Args:
        vocab_file: path of the sentencepiece ``tokenizer.model``.
        unk_token: unknown token.
        bos_token: beginning-of-sequence token.
        eos_token: end-of-sequence token.
        pad_token: padding token (the official configs use ``</s>``).
        sp_model_kwargs: extra arguments of ``sentencepiece.SentencePieceProcessor``.
        add_bos_token: prepend ``bos_token`` when special tokens are added.
        add_eos_token: append ``eos_token`` when special tokens are added.
        decode_with_prefix_space: kept for the config round trip; the official decode ignores it.
        clean_up_tokenization_spaces: run ``clean_up_tokenization`` on the joined decode output.
        **kwargs: passed to ``PreTrainedTokenizer`` (``added_tokens_decoder``, ``additional_special_tokens``).
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | os.PathLike,
        unk_token: str | AddedToken = "<unk>",
        bos_token: str | AddedToken = "<s>",
        eos_token: str | AddedToken = "</s>",
        pad_token: str | AddedToken = "</s>",
        sp_model_kwargs: dict[str, Any] | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        decode_with_prefix_space: bool = False,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("auto_map", None)  # always written back as OFFICIAL_AUTO_MAP
        self.vocab_file = str(vocab_file)
        self.sp_model_kwargs = dict(sp_model_kwargs or {})
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.Load(self.vocab_file)
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.decode_with_prefix_space = decode_with_prefix_space
        super().__init__(
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    # ----------------------------------------------------------------------------------------- vocab
    @property
    def vocab_size(self) -> int:
        """Number of sentencepiece pieces (added tokens past it not counted)."""
        return self.sp_model.get_piece_size()

    @property
    def bos_token_id(self) -> int | None:
        """The official class reads BOS/EOS ids from the sentencepiece model, not from the vocab."""
        return self.sp_model.bos_id()

    @property
    def eos_token_id(self) -> int | None:
        return self.sp_model.eos_id()

    def get_vocab(self) -> dict[str, int]:
        """Token -> id for every sentencepiece piece (added-token names win) plus the added tokens."""
        vocab = {self.convert_ids_to_tokens(i): i for i in range(self.vocab_size)}
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    # ---------------------------------------------------------------------------------------- encode
    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        """Split ``text`` on the added tokens, then sentencepiece-encode each remaining chunk on its own.

        This is the transformers 4.37 slow-tokenizer algorithm the official class runs on, kept here
        explicitly so that changes in the transformers base class cannot change our ids.
        """
        if kwargs.pop("split_special_tokens", self.split_special_tokens):
            return self._tokenize(text)
        chunks = self.tokens_trie.split(text)  # holds every added token (kept in sync by the base class)
        added = self._added_tokens_encoder
        for i, chunk in enumerate(chunks):
            if chunk not in added:
                continue
            token = self._added_tokens_decoder[added[chunk]]
            left = chunks[i - 1] if i > 0 else None
            right = chunks[i + 1] if i < len(chunks) - 1 else None
            if token.rstrip and right:
                chunks[i + 1] = right.lstrip()
            if token.lstrip and left:
                chunks[i - 1] = left.rstrip()
            if token.single_word and left and left[-1] != " ":
                chunks[i - 1] += chunk
                chunks[i] = ""
            elif token.single_word and right and right[0] != " ":
                chunks[i + 1] = chunk + chunks[i + 1]
                chunks[i] = ""
        pieces: list[str] = []
        for chunk in chunks:
            if not chunk:
                continue
            pieces.extend([chunk] if chunk in added else self._tokenize(chunk))
        return pieces

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """``[<s>] + ids_0 (+ ids_1) [+ </s>]`` as the official class does (no BOS between a pair)."""
        output = ([self.bos_token_id] if self.add_bos_token else []) + token_ids_0
        if token_ids_1 is not None:
            output = output + token_ids_1
        return output + ([self.eos_token_id] if self.add_eos_token else [])

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        """1 where :meth:`build_inputs_with_special_tokens` put BOS/EOS, else 0."""
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        body = [0] * (len(token_ids_0) + len(token_ids_1 or []))
        return [1] * bool(self.add_bos_token) + body + [1] * bool(self.add_eos_token)

    # ---------------------------------------------------------------------------------------- decode
    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Official ``convert_tokens_to_string``: special tokens kept verbatim, a space before each run."""
        specials = set(self.all_special_tokens)
        out, pending, prev_special = "", [], False
        for token in tokens:
            if token in specials:
                out += ("" if prev_special else " ") + self.sp_model.decode(pending) + token
                pending, prev_special = [], True
            else:
                pending.append(token)
                prev_special = False
        out += self.sp_model.decode(pending)
        # The official class always cleans here, then adds and strips one leading space (a no-op).
        return self.clean_up_tokenization(out)

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        spaces_between_special_tokens: bool = True,
        **kwargs: Any,
    ) -> str:
        """transformers 4.37 slow ``_decode``: added tokens outside the special set, and additional special
        tokens past the sentencepiece vocab, are decoded alone and joined to the rest with spaces."""
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        tokens = self.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)
        specials = set(self.all_special_tokens)
        extra = [str(t) for t in self._extra_special_tokens]
        standalone = (set(self._added_tokens_encoder) - specials) | {
            t for t in extra if self.convert_tokens_to_ids(t) >= self.vocab_size
        }
        texts: list[str] = []
        current: list[str] = []
        for token in tokens:
            if token in standalone:
                if current:
                    text = self.convert_tokens_to_string(current)
                    if text:
                        texts.append(text)
                    current = []
                texts.append(token)
            else:
                current.append(token)
        if current:
            texts.append(self.convert_tokens_to_string(current))
        text = (" " if spaces_between_special_tokens else "").join(texts)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    # ------------------------------------------------------------------------------------------ save
    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Write ``tokenizer.model`` (the loaded sentencepiece model, byte for byte)."""
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        path = Path(save_directory) / name
        path.write_bytes(self.sp_model.serialized_model_proto())
        return (str(path),)

    def official_config(self) -> dict[str, Any]:
        """The tokenizer_config.json content in the official (transformers 4.37) layout."""
        config: dict[str, Any] = {
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "added_tokens_decoder": {
                str(i): _added_token_dict(t) for i, t in sorted(self._added_tokens_decoder.items())
            },
            "additional_special_tokens": [str(t) for t in self._extra_special_tokens],
            "auto_map": OFFICIAL_AUTO_MAP,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "decode_with_prefix_space": self.decode_with_prefix_space,
            "model_max_length": self.model_max_length,
            "sp_model_kwargs": self.sp_model_kwargs,
            "tokenizer_class": "InternLM2Tokenizer",
        }
        for key in _SPECIAL_KEYS:
            config[key] = str(getattr(self, key))
        if self.padding_side != "right":
            config["padding_side"] = self.padding_side
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return config

    def save_pretrained(
        self, save_directory: str | os.PathLike, filename_prefix: str | None = None, **kwargs: Any
    ) -> tuple[str, ...]:
        """Save in the official on-disk format, loadable by the official remote code and by this class.

        Writes ``tokenizer.model``, ``tokenizer_config.json`` (``tokenizer_class: InternLM2Tokenizer`` and the
        official ``auto_map``), ``special_tokens_map.json`` and, when tokens lie past the sentencepiece vocab,
        ``added_tokens.json``.

        Args:
            save_directory: output directory (created if missing).
            filename_prefix: optional prefix of every file name.
            **kwargs: accepted for API compatibility and ignored (no hub push).

        Returns:
            The paths written.
        """
        out = Path(save_directory)
        if out.is_file():
            raise NotADirectoryError(f"tokenizer save path {out} is a file, expected a directory")
        out.mkdir(parents=True, exist_ok=True)
        prefix = filename_prefix + "-" if filename_prefix else ""
        extra = [str(t) for t in self._extra_special_tokens]
        special_map: dict[str, Any] = {"additional_special_tokens": extra}
        for key in _SPECIAL_KEYS:
            token = str(self._special_tokens_map[key])
            added = self._added_tokens_decoder.get(self._added_tokens_encoder.get(token, -1))
            entry = _added_token_dict(added if added is not None else AddedToken(token, normalized=False))
            entry.pop("special")
            special_map[key] = entry
        files = {
            "tokenizer_config.json": self.official_config(),
            "special_tokens_map.json": special_map,
        }
        past_vocab = {t: i for t, i in self._added_tokens_encoder.items() if i >= self.vocab_size}
        if past_vocab:
            files["added_tokens.json"] = past_vocab
        written = []
        for name, content in files.items():
            path = out / (prefix + name)
            text = json.dumps(content, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
            path.write_text(text, encoding="utf-8")
            written.append(str(path))
        return (*written, *self.save_vocabulary(str(out), filename_prefix))
