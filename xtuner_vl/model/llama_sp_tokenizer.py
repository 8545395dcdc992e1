"""Our own sentencepiece Llama tokenizer: ids and decode of transformers 4.37.2's slow ``LlamaTokenizer``.

InternVL2-4B / Mini-InternVL-Chat-4B-V1-5 (Phi-3, ``legacy: false``) and InternVL2-40B (Yi, legacy, no
dummy prefix) name ``LlamaTokenizer``; the official fine-tuning code loads it with ``use_fast=False`` on
transformers 4.37.2. transformers 5 has no slow Llama class and its rebuilt tokenizer gives other ids
(e.g. no ``▁`` before a leading ``<|system|>``, other ids for leading spaces). This class reproduces the
4.37.2 algorithm exactly:

- ``legacy`` (default when the config does not say): every chunk between added tokens is encoded by
  sentencepiece with the model's own normalizer (so a dummy prefix, if the model has one, on every chunk).
- ``legacy: false``: the model runs with ``add_dummy_prefix`` switched off; the text gets ``▁`` prepended
  (its own ``▁`` become spaces), and that lone ``▁`` is dropped again when a *special* token (named or
  ``additional_special_tokens``, not every added token) follows it. A chunk starting with a space or ``▁``
  is encoded after the unknown token's text, whose pieces are then cut off, so that its leading space
  stays a ``▁`` of the first word.
- added tokens: split first (longest, leftmost), ``lstrip``/``rstrip``/``single_word`` honoured;
  ``<s>`` prepended when ``add_bos_token``, ``</s>`` appended when ``add_eos_token``; for a pair, both
  sequences get them.
- decode: the first piece of each run loses one leading ``▁``; special tokens are kept verbatim (with a
  space before a run of them when legacy); added tokens outside the special set are joined with spaces.

Nothing here imports or executes code from a checkpoint directory.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from transformers.tokenization_utils_base import AddedToken

from xtuner_vl.model.sp_tokenizer_base import SentencePieceTokenizerBase

__all__ = ["SPIECE_UNDERLINE", "LlamaSentencePieceTokenizer"]

logger = logging.getLogger(__name__)

SPIECE_UNDERLINE = "▁"


class LlamaSentencePieceTokenizer(SentencePieceTokenizerBase):
    """Sentencepiece tokenizer with the ids and decode of transformers 4.37.2's slow ``LlamaTokenizer``.

    Args:
        vocab_file: path of the sentencepiece ``tokenizer.model``.
        unk_token: unknown token.
        bos_token: beginning-of-sequence token.
        eos_token: end-of-sequence token.
        pad_token: padding token (none by default).
        sp_model_kwargs: extra arguments of ``sentencepiece.SentencePieceProcessor``.
        add_bos_token: prepend ``bos_token`` when special tokens are added.
        add_eos_token: append ``eos_token`` when special tokens are added.
        clean_up_tokenization_spaces: run ``clean_up_tokenization`` on the decode output.
        use_default_system_prompt: kept for the config round trip (unused).
        spaces_between_special_tokens: kept for the config round trip; as in 4.37, ``decode`` joins added
            tokens with spaces unless its own ``spaces_between_special_tokens=False`` is passed.
        legacy: the 4.37 ``legacy`` switch (``None``: legacy, as 4.37 defaulted).
        tokenizer_file: ``tokenizer.json`` of the directory, copied through by ``save_pretrained``
            (default: the one next to ``vocab_file``, if any).
        official_tokenizer_class: ``tokenizer_class`` of the loaded config (``LlamaTokenizer`` or
            ``LlamaTokenizerFast``), written back on save.
        **kwargs: passed to ``PreTrainedTokenizer`` (``added_tokens_decoder``, ``additional_special_tokens``).
    """

    specials_around_each_sequence = True

    def __init__(
        self,
        vocab_file: str | os.PathLike,
        unk_token: str | AddedToken = "<unk>",
        bos_token: str | AddedToken = "<s>",
        eos_token: str | AddedToken = "</s>",
        pad_token: str | AddedToken | None = None,
        sp_model_kwargs: dict[str, Any] | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
        use_default_system_prompt: bool = False,
        spaces_between_special_tokens: bool | None = None,
        legacy: bool | None = None,
        tokenizer_file: str | os.PathLike | None = None,
        official_tokenizer_class: str = "LlamaTokenizer",
        **kwargs: Any,
    ) -> None:
        kwargs.pop("from_slow", None)
        self.legacy = True if legacy is None else bool(legacy)
        self.use_default_system_prompt = use_default_system_prompt
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.official_class = official_tokenizer_class
        self._padding_side_given = "padding_side" in kwargs
        json_file = Path(tokenizer_file) if tokenizer_file else Path(vocab_file).with_name("tokenizer.json")
        self.tokenizer_json = json_file.read_bytes() if json_file.is_file() else None
        self._init_sentencepiece(vocab_file, sp_model_kwargs, add_bos_token, add_eos_token)
        super().__init__(
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    @classmethod
    def init_kwargs_from_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Also the config's ``tokenizer_class``, to write it back on save."""
        kwargs = super().init_kwargs_from_config(config)
        if config.get("tokenizer_class") in ("LlamaTokenizer", "LlamaTokenizerFast"):
            kwargs["official_tokenizer_class"] = config["tokenizer_class"]
        return kwargs

    def runtime_model_proto(self, model_bytes: bytes) -> bytes:
        """Non-legacy 4.37 runs the model with ``add_dummy_prefix`` off (encode and decode alike)."""
        if self.legacy:
            return model_bytes
        proto = sp_pb2.ModelProto.FromString(model_bytes)
        proto.normalizer_spec.add_dummy_prefix = False
        return proto.SerializeToString()

    @property
    def unk_token_length(self) -> int:
        """Number of pieces sentencepiece splits the unknown token's text into."""
        return len(self.sp_model.encode(str(self.unk_token)))

    # ---------------------------------------------------------------------------------------- encode
    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        """4.37 ``LlamaTokenizer.tokenize``: non-legacy prepends ``▁`` unless a special token follows it.

        Args:
            text: the text.
            **kwargs: ``split_special_tokens`` is honoured; others are ignored.

        Returns:
            The tokens (added tokens verbatim, sentencepiece pieces otherwise).
        """
        if self.legacy or not text:
            return super().tokenize(text, **kwargs)
        tokens = super().tokenize(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "), **kwargs)
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.all_special_tokens:
            tokens = tokens[1:]
        return tokens

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        tokens = self.sp_model.encode(text, out_type=str)
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return tokens
        # The model strips a leading "▁" (no dummy prefix): encode "<unk>" + text, cut the unk pieces off.
        tokens = self.sp_model.encode(str(self.unk_token) + text, out_type=str)
        length = self.unk_token_length
        return tokens[length:] if len(tokens) >= length else tokens

    # ---------------------------------------------------------------------------------------- decode
    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """4.37 ``LlamaTokenizer.convert_tokens_to_string``: the first piece loses one leading ``▁``;
        special tokens are kept verbatim, after a space when legacy and not at the start of a run."""
        if not tokens:
            return ""
        tokens = list(tokens)
        if tokens[0].startswith(SPIECE_UNDERLINE):
            tokens[0] = tokens[0][1:]
        specials = set(self.all_special_tokens)
        out, pending, prev_special = "", [], False
        for i, token in enumerate(tokens):
            if token in specials:
                if not prev_special and i != 0 and self.legacy:
                    out += " "
                out += self.sp_model.decode(pending) + token
                pending, prev_special = [], True
            else:
                pending.append(token)
                prev_special = False
        return out + self.sp_model.decode(pending)

    # ------------------------------------------------------------------------------------------ save
    def official_config(self) -> dict[str, Any]:
        """The tokenizer_config.json content in the official (transformers 4.37) layout."""
        config = self.common_config()
        config.update(
            legacy=self.legacy,
            tokenizer_class=self.official_class,
            use_default_system_prompt=self.use_default_system_prompt,
        )
        if self.spaces_between_special_tokens is not None:
            config["spaces_between_special_tokens"] = self.spaces_between_special_tokens
        if self._padding_side_given or self.padding_side != "right":
            config["padding_side"] = self.padding_side
        return config

    def extra_files(self) -> dict[str, bytes]:
        """The directory's ``tokenizer.json``, byte for byte, while its added tokens are still ours.

        After tokens were added to this tokenizer the copy would disagree with it; it is then left out
        (the official code loads the slow tokenizer from ``tokenizer.model`` anyway).
        """
        if self.tokenizer_json is None:
            return {}
        added = json.loads(self.tokenizer_json).get("added_tokens") or []
        if {t["content"]: t["id"] for t in added} != dict(self._added_tokens_encoder):
            logger.warning("tokenizer.json not saved: its added tokens differ from the tokenizer's")
            return {}
        return {"tokenizer.json": self.tokenizer_json}
