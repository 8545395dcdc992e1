"""The ``internvl2_5`` template on conversations that open with gpt turns, against ids and labels derived here
from the rules of the official ``preprocess_internvl2_5`` (OpenGVLab/InternVL
``internvl_chat/internvl/train/dataset.py``, same in ``internvl_chat_gpt_oss/internvl/train/dataset.py``):
every turn becomes its own ChatML block, tokenized on its own; a gpt block is trained but for its
``<|im_start|>assistant\\n`` header and its closing ``\\n``. The other templates' preprocess functions drop a
leading gpt turn."""

from __future__ import annotations

from pathlib import Path

import pytest

from xtuner_vl.dataset.conversation import tokenize_conversation
from xtuner_vl.dataset.templates import get_template
from xtuner_vl.model.tokenizer import load_tokenizer
from xtuner_vl.structures import IGNORE_INDEX, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from xtuner_vl.tiny.tokenizers import write_tiny_tokenizer

SYS25 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("internvl2_5_tokenizers")
    out = {}
    for family in ("qwen2", "internlm2", "phi3"):
        write_tiny_tokenizer(family, root / family)
        out[family] = load_tokenizer(Path(root / family))
    return out


def official_ids_and_labels(tok, turns: list[dict], image_tokens: list[int]) -> tuple[list[int], list[int]]:
    """``preprocess_internvl2_5``'s rules, written out: one block per turn (the default system block unless
    the first turn is a system turn), ``<image>`` expanded in human turns, each block tokenized with the
    tokenizer's own special tokens; with a BOS-adding tokenizer the BOS text opens the first block and each
    block's first id (the added BOS) is cut; gpt blocks train all but the header and the last id."""
    system = turns[0]["value"] if turns[0]["from"] == "system" else SYS25
    turns = turns[1:] if turns[0]["from"] == "system" else turns
    counts = iter(image_tokens)
    batches, roles = [f"<|im_start|>system\n{system}<|im_end|>\n"], ["system"]
    for turn in turns:
        value = turn["value"]
        if turn["from"] == "human":
            while "<image>" in value:
                image = IMG_START_TOKEN + IMG_CONTEXT_TOKEN * next(counts) + IMG_END_TOKEN
                value = value.replace("<image>", image, 1)
        role = "user" if turn["from"] == "human" else "assistant"
        batches.append(f"<|im_start|>{role}\n{value}<|im_end|>\n")
        roles.append(turn["from"])
    add_bos = tok("a")["input_ids"] != tok("a", add_special_tokens=False)["input_ids"]
    if add_bos:
        batches[0] = tok.bos_token + batches[0]
    blocks = [tok(b)["input_ids"][1:] if add_bos else tok(b)["input_ids"] for b in batches]
    header = len(tok("<|im_start|>assistant\n")["input_ids"]) - (1 if add_bos else 0)
    ids, labels = [], []
    for role, block in zip(roles, blocks, strict=True):
        ids += block
        if role == "gpt":
            labels += [IGNORE_INDEX] * header + block[header:-1] + [IGNORE_INDEX]
        else:
            labels += [IGNORE_INDEX] * len(block)
    return ids, labels


def _turn(role: str, value: str) -> dict:
    return {"from": role, "value": value}


LEADING = {
    "one_leading_answer": [
        _turn("gpt", "Hello! Ask me about the picture."),
        _turn("human", "<image>\nWhat is it?"),
        _turn("gpt", "A cat."),
    ],
    "two_leading_answers": [
        _turn("gpt", "Hi."),
        _turn("gpt", "I see an image."),
        _turn("human", "Colour?"),
        _turn("gpt", "Red.\nVery red."),
    ],
    "system_then_answer": [
        _turn("system", "Be brief."),
        _turn("gpt", "Ready."),
        _turn("human", "2+3?"),
        _turn("gpt", "5"),
    ],
    "only_an_answer": [_turn("gpt", "A caption with no question.")],
}


@pytest.mark.parametrize("family", ["qwen2", "internlm2"])  # InternVL2.5-1B / 3 / 3.5 and InternVL2.5-2B / 8B
@pytest.mark.parametrize("case", list(LEADING))
def test_leading_gpt_turns_are_trained_as_official(tokenizers, family, case):
    tok, turns = tokenizers[family], LEADING[case]
    images = [256] * sum(t["value"].count("<image>") for t in turns)
    want_ids, want_labels = official_ids_and_labels(tok, turns, images)
    ids, labels = tokenize_conversation(turns, tok, "internvl2_5", images)
    assert ids.tolist() == want_ids
    assert labels.tolist() == want_labels
    leading = next(t["value"] for t in turns if t["from"] == "gpt")
    assert tok.decode([i for i in labels.tolist() if i != IGNORE_INDEX]).startswith(leading + "<|im_end|>")


def test_without_leading_answer_unchanged(tokenizers):
    """The rule-derived ids also hold for an ordinary conversation (the derivation itself is right)."""
    tok = tokenizers["qwen2"]
    turns = LEADING["one_leading_answer"][1:]
    ids, labels = tokenize_conversation(turns, tok, "internvl2_5", [256])
    assert (ids.tolist(), labels.tolist()) == official_ids_and_labels(tok, turns, [256])


@pytest.mark.parametrize(
    ("template", "family"), [("internlm2-chat", "internlm2"), ("Hermes-2", "qwen2"), ("phi3-chat", "phi3")]
)
def test_other_templates_drop_a_leading_gpt_turn(tokenizers, template, family):
    tok = tokenizers[family]
    assert not get_template(template).keeps_leading_answers
    conv = [_turn("human", "What is 2 plus 3?"), _turn("gpt", "5.")]
    plain = tokenize_conversation(conv, tok, template)
    dropped = tokenize_conversation([_turn("gpt", "Hi!"), *conv], tok, template)
    assert all((a == b).all() for a, b in zip(plain, dropped, strict=True))


def test_thinking_system_preset():
    """``system_message="internvl3_5_thinking"`` names the InternVL3.5 R1 system prompt; any other text is kept."""
    from xtuner_vl.dataset.templates import THINKING_SYSTEM_PROMPT, get_template

    assert get_template("internvl2_5", "internvl3_5_thinking").system_message == THINKING_SYSTEM_PROMPT
    assert get_template("internvl2_5", "Be brief.").system_message == "Be brief."
