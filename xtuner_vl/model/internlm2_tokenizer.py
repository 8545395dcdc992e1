"""Our own InternLM2 tokenizer: ids and decode of the official slow ``InternLM2Tokenizer``, on transformers 5.

The official class (remote code shipped in every InternLM2-based InternVL checkpoint) is a slow
transformers-4.37 tokenizer. Its behaviour, which this class reproduces exactly:

- encode: the text is split on the added tokens (longest match first, leftmost first: the tokens of
  ``added_tokens_decoder``, i.e. ``<s>``, ``</s>``, ``<unk>``, the chat tokens and InternVL's image tokens),
  honouring each token's ``lstrip``/``rstrip``/``single_word`` flags; every remaining chunk is encoded
  on its own by sentencepiece with the model's own normalizer settings (InternLM2's ``tokenizer.model``
  has ``add_dummy_prefix`` off, so no ``▁`` is prepended to any chunk; spaces are kept as they are).
  ``<s>`` is prepended when ``add_bos_token`` (default), ``</s>`` appended when ``add_eos_token``.
- decode: special tokens (named + ``additional_special_tokens``) inside the sentencepiece vocab are
  glued to the text with one space before a run of them; added tokens past the sentencepiece vocab are
  joined with spaces (``spaces_between_special_tokens``); the transformers ``clean_up_tokenization``
  rules always run on the sentencepiece part, as in the official ``convert_tokens_to_string``.

The split on added tokens, the 4.37 decode loop and the official save format are shared with the Llama
tokenizer in :mod:`xtuner_vl.model.sp_tokenizer_base`. Nothing here imports or executes code from a
checkpoint directory.
"""

from __future__ import annotations

import os
from typing import Any

from transformers.tokenization_utils_base import AddedToken

from xtuner_vl.model.sp_tokenizer_base import SentencePieceTokenizerBase

__all__ = ["OFFICIAL_AUTO_MAP", "InternLM2Tokenizer"]

# What the official tokenizer_config.json points at; written back on save so that the official remote
# code (lmdeploy, vLLM, transformers with trust_remote_code) still loads a directory we saved.
OFFICIAL_AUTO_MAP = {
    "AutoTokenizer": [
        "tokenization_internlm2.InternLM2Tokenizer",
        "tokenization_internlm2_fast.InternLM2TokenizerFast",
    ]
}


class InternLM2Tokenizer(SentencePieceTokenizerBase):
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
        self._init_sentencepiece(vocab_file, sp_model_kwargs, add_bos_token, add_eos_token)
        self.decode_with_prefix_space = decode_with_prefix_space
        super().__init__(
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    @property
    def bos_token_id(self) -> int | None:
        """The official class reads BOS/EOS ids from the sentencepiece model, not from the vocab."""
        return self.sp_model.bos_id()

    @property
    def eos_token_id(self) -> int | None:
        return self.sp_model.eos_id()

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

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

    def official_config(self) -> dict[str, Any]:
        """The tokenizer_config.json content in the official (transformers 4.37) layout, with the official
        ``auto_map`` so that the official remote code still loads a directory we saved."""
        config = self.common_config()
        config.update(
            auto_map=OFFICIAL_AUTO_MAP,
            decode_with_prefix_space=self.decode_with_prefix_space,
            tokenizer_class="InternLM2Tokenizer",
        )
        if self.padding_side != "right":
            config["padding_side"] = self.padding_side
        return config
