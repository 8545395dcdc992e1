"""Shared machinery of our sentencepiece tokenizers that reproduce transformers 4.37 slow tokenizers.

The official InternVL fine-tuning code runs on transformers 4.37.2 with slow (python) tokenizers. Their
encode and decode are fixed here, in our own code, so that changes of the transformers 5 base class cannot
change a single id:

- encode (4.37 ``PreTrainedTokenizer.tokenize``): the text is split on the added tokens (longest match
  first, leftmost first), honouring each token's ``lstrip`` / ``rstrip`` / ``single_word`` flags; every
  remaining chunk goes through the subclass's ``_tokenize``. ``normalized`` has no effect on a slow
  tokenizer without ``do_lower_case``.
- decode (4.37 ``PreTrainedTokenizer._decode``): added tokens outside the special set, and additional
  special tokens past the sentencepiece vocab, are decoded alone; everything between them goes through the
  subclass's ``convert_tokens_to_string``; the parts are joined with spaces (``spaces_between_special_tokens``).
- save: the official on-disk files (``tokenizer.model`` byte for byte, ``tokenizer_config.json`` in the
  4.37 layout from the subclass's ``official_config``, ``special_tokens_map.json``, ``added_tokens.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import sentencepiece as spm
from transformers.tokenization_python import PreTrainedTokenizer
from transformers.tokenization_utils_base import AddedToken

__all__ = ["SentencePieceTokenizerBase", "added_token_dict"]

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def added_token_dict(token: AddedToken) -> dict[str, Any]:
    """An ``added_tokens_decoder`` entry of tokenizer_config.json, as transformers 4.37 writes it."""
    return {
        "content": token.content,
        "lstrip": token.lstrip,
        "normalized": token.normalized,
        "rstrip": token.rstrip,
        "single_word": token.single_word,
        "special": token.special,
    }


class SentencePieceTokenizerBase(PreTrainedTokenizer):
    """Base of the sentencepiece tokenizers with transformers-4.37-slow ids; not used on its own.

    Subclasses call :meth:`_init_sentencepiece` before ``super().__init__`` and implement ``_tokenize``,
    ``convert_tokens_to_string`` and :meth:`official_config`.

    Attributes:
        add_bos_token: prepend ``bos_token`` when special tokens are added.
        add_eos_token: append ``eos_token`` when special tokens are added.
        sp_model: the sentencepiece processor used for encode and decode.
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]
    # True: ``<s> A </s> <s> B </s>`` for a pair (Llama); False: ``<s> A B </s>`` (InternLM2).
    specials_around_each_sequence = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """Load from a directory as transformers does, keeping the config's ``add_bos_token`` /
        ``add_eos_token`` (transformers 5 drops them when the directory has a ``tokenizer.json``).

        Args:
            pretrained_model_name_or_path: the tokenizer directory.
            *args: passed to ``PreTrainedTokenizer.from_pretrained``.
            **kwargs: passed on; they win over the config's values.

        Returns:
            The tokenizer.
        """
        config_file = Path(pretrained_model_name_or_path) / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
            for key, value in cls.init_kwargs_from_config(config).items():
                kwargs.setdefault(key, value)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def init_kwargs_from_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """``__init__`` arguments read from tokenizer_config.json that transformers may not pass through."""
        return {key: config[key] for key in ("add_bos_token", "add_eos_token") if key in config}

    def _init_sentencepiece(
        self, vocab_file: str | os.PathLike, sp_model_kwargs: dict[str, Any] | None, add_bos: bool, add_eos: bool
    ) -> None:
        self.vocab_file = str(vocab_file)
        self.sp_model_kwargs = dict(sp_model_kwargs or {})
        self.sp_model_bytes = Path(vocab_file).read_bytes()  # written back unchanged by save_vocabulary
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.LoadFromSerializedProto(self.runtime_model_proto(self.sp_model_bytes))
        self.add_bos_token = add_bos
        self.add_eos_token = add_eos

    def runtime_model_proto(self, model_bytes: bytes) -> bytes:
        """The serialized sentencepiece model actually run (the file's, unless a subclass edits it)."""
        return model_bytes

    # ----------------------------------------------------------------------------------------- vocab
    @property
    def vocab_size(self) -> int:
        """Number of sentencepiece pieces (added tokens past it not counted)."""
        return self.sp_model.get_piece_size()

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
        """Split ``text`` on the added tokens, then ``_tokenize`` each remaining chunk on its own.

        Args:
            text: the text.
            **kwargs: ``split_special_tokens`` (default: the tokenizer's) is honoured; others are ignored.

        Returns:
            The tokens (added tokens verbatim, sentencepiece pieces otherwise).
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
            if chunk:
                pieces.extend([chunk] if chunk in added else self._tokenize(chunk))
        return pieces

    def _with_specials(self, ids_0: list[int], ids_1: list[int] | None, bos: int, eos: int) -> list[int]:
        head = [bos] if self.add_bos_token else []
        tail = [eos] if self.add_eos_token else []
        if ids_1 is None:
            return head + ids_0 + tail
        if self.specials_around_each_sequence:
            return head + ids_0 + tail + head + ids_1 + tail
        return head + ids_0 + ids_1 + tail

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """Add BOS / EOS as ``add_bos_token`` / ``add_eos_token`` say (for a pair: see the class docs)."""
        return self._with_specials(token_ids_0, token_ids_1, self.bos_token_id, self.eos_token_id)

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        """1 where :meth:`build_inputs_with_special_tokens` put BOS/EOS, else 0."""
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        zeros_1 = None if token_ids_1 is None else [0] * len(token_ids_1)
        return self._with_specials([0] * len(token_ids_0), zeros_1, 1, 1)

    # ---------------------------------------------------------------------------------------- decode
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
    def official_config(self) -> dict[str, Any]:
        """The tokenizer_config.json content in the official (transformers 4.37) layout."""
        raise NotImplementedError

    def common_config(self) -> dict[str, Any]:
        """The tokenizer_config.json fields every official sentencepiece directory has."""
        config: dict[str, Any] = {
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "added_tokens_decoder": {
                str(i): added_token_dict(t) for i, t in sorted(self._added_tokens_decoder.items())
            },
            "additional_special_tokens": [str(t) for t in self._extra_special_tokens],
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "model_max_length": self.model_max_length,
            "sp_model_kwargs": self.sp_model_kwargs,
        }
        for key in SPECIAL_KEYS:
            value = self._special_tokens_map.get(key)
            config[key] = None if value is None else str(value)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return config

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Write ``tokenizer.model`` (the loaded file, byte for byte)."""
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        path = Path(save_directory) / name
        path.write_bytes(self.sp_model_bytes)
        return (str(path),)

    def extra_files(self) -> dict[str, bytes]:
        """Further files (name -> content) that :meth:`save_pretrained` writes; none by default."""
        return {}

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        legacy_format: bool | None = None,
        filename_prefix: str | None = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> tuple[str, ...]:
        """Save in the official on-disk format, loadable by the official code and by this class.

        Writes ``tokenizer.model``, ``tokenizer_config.json`` (:meth:`official_config`),
        ``special_tokens_map.json``, ``added_tokens.json`` when tokens lie past the sentencepiece vocab, and
        the subclass's :meth:`extra_files`.

        Args:
            save_directory: output directory (created if missing).
            legacy_format: accepted for API compatibility; the official format is always written.
            filename_prefix: optional prefix of every file name.
            push_to_hub: not supported (raises).
            **kwargs: accepted for API compatibility and ignored.

        Returns:
            The paths written.
        """
        if push_to_hub:
            raise NotImplementedError(f"{type(self).__name__}.save_pretrained does not push to the hub")
        out = Path(save_directory)
        if out.is_file():
            raise NotADirectoryError(f"tokenizer save path {out} is a file, expected a directory")
        out.mkdir(parents=True, exist_ok=True)
        prefix = filename_prefix + "-" if filename_prefix else ""
        special_map: dict[str, Any] = {"additional_special_tokens": [str(t) for t in self._extra_special_tokens]}
        for key in SPECIAL_KEYS:
            if self._special_tokens_map.get(key) is None:
                continue
            token = str(self._special_tokens_map[key])
            added = self._added_tokens_decoder.get(self._added_tokens_encoder.get(token, -1))
            entry = added_token_dict(added if added is not None else AddedToken(token, normalized=False))
            entry.pop("special")
            special_map[key] = entry
        files: dict[str, Any] = {
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
        for name, data in self.extra_files().items():
            path = out / (prefix + name)
            path.write_bytes(data)
            written.append(str(path))
        return (*written, *self.save_vocabulary(str(out), filename_prefix))
