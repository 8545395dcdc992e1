"""The ``internvl3_5_gpt_oss`` (harmony) template and the tiny ``gpt_oss`` tokenizer against the official code.

``data/gpt_oss_golden.json`` holds what OpenGVLab/InternVL's ``internvl_chat_gpt_oss`` code gives on the tiny
tokenizer (see tools/golden_gpt_oss_template.py): ``preprocess_internvl3_5_gpt_oss`` (dataset.py) as it is, the same
function with the commented end-token rule in place of its stale ``i``, and the prompts of
``InternVLChatModel.chat`` (modeling_internvl_chat.py). We match the commented rule everywhere; where the stale
variable changes the official result, the only difference is ``<|end|>`` and ``<|return|>`` trading places.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from xtuner_vl.dataset import InternVLDataset
from xtuner_vl.dataset.conversation import tokenize_conversation
from xtuner_vl.dataset.templates import get_template
from xtuner_vl.model.tokenizer import load_tokenizer
from xtuner_vl.recipes.chat import ChatSession, image_placeholders, stop_token_ids
from xtuner_vl.structures import IGNORE_INDEX
from xtuner_vl.tiny.tokenizers import GPT_OSS_TOKENS, IMAGE_TOKENS, write_tiny_tokenizer

GOLDEN = json.loads((Path(__file__).parent / "data" / "gpt_oss_golden.json").read_text(encoding="utf-8"))
CASES = GOLDEN["cases"]
TEMPLATE = "internvl3_5_gpt_oss"
HEADER = "<|channel|>final<|message|>"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpt_oss_tokenizer")
    write_tiny_tokenizer("gpt_oss", out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir: Path):
    return load_tokenizer(tok_dir)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_tiny_tokenizer_is_the_golden_one(tok_dir):
    """The golden data was made on these exact files."""
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tok_dir.iterdir())}
    assert files == GOLDEN["tokenizer_files_sha256"]


def test_tiny_tokenizer_layout(tok, tok_dir):
    """gpt-oss-20b's layout (https://huggingface.co/openai/gpt-oss-20b tokenizer_config.json): 21 special tokens
    right after the BPE vocab, then InternVL's 9 image tokens; BOS / EOS / PAD; nothing added around a text."""
    config = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "auto_map" not in config
    first = tok.convert_tokens_to_ids(GPT_OSS_TOKENS[0])
    names = GPT_OSS_TOKENS + IMAGE_TOKENS
    assert tok.convert_tokens_to_ids(list(names)) == list(range(first, first + len(names)))
    assert first + len(names) == len(tok)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|startoftext|>", "<|return|>", "<|endoftext|>")
    assert tok("Hello world.")["input_ids"] == _ids(tok, "Hello world.")
    for token in names:
        assert _ids(tok, f"a{token}b")[1:-1] == [tok.convert_tokens_to_ids(token)]


def test_template_table():
    t = get_template(TEMPLATE)
    assert t.system_message == (
        "You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: 2024-06\n"
        "Current date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. Channel must be included for every "
        "message."
    )
    assert get_template(TEMPLATE, version="internvl1_5").system_message == t.system_message
    assert (t.system_template, t.roles) == (
        "<|start|>system<|message|>{system_message}",
        ("<|start|>user<|message|>", "<|start|>assistant" + HEADER),
    )
    assert (t.sep, t.trained_sep, t.last_sep, t.trained_header) == ("<|end|>", "<|end|>", "<|return|>", HEADER)


@pytest.mark.parametrize("case", list(CASES))
def test_ids_and_labels_match_official(tok, case):
    """Equal to the official preprocess with the commented end-token rule; equal to the official one as it is
    wherever its stale variable does not change the result."""
    c = CASES[case]
    ids, labels = tokenize_conversation(c["conversations"], tok, TEMPLATE, c["num_image_tokens"])
    ids, labels = ids.tolist(), labels.tolist()
    assert (ids, labels) == (c["intended"]["input_ids"], c["intended"]["labels"])
    end, ret = tok.convert_tokens_to_ids(["<|end|>", "<|return|>"])
    assert ids[-1] == ret and ids.count(ret) == 1  # <|return|> closes the last answer only
    if not c["bug_changes_result"]:
        assert c["official"] == c["intended"]


@pytest.mark.parametrize("case", [name for name, c in CASES.items() if c["bug_changes_result"]])
def test_deviation_is_only_the_end_token(tok, case):
    """Where the official stale ``i`` changes the result, it only swaps ``<|end|>`` and ``<|return|>`` (both
    trained); a text-only sample makes it raise (``i`` unbound), so the official dataset skips the sample."""
    c = CASES[case]
    ids, labels = (t.tolist() for t in tokenize_conversation(c["conversations"], tok, TEMPLATE, c["num_image_tokens"]))
    official = c["official"]
    if not c["num_image_tokens"]:
        assert official["error"].startswith("UnboundLocalError")
        return
    off_ids, off_labels = official["input_ids"], official["labels"]
    assert len(off_ids) == len(ids) and len(off_labels) == len(labels)
    changed = [k for k, (a, b) in enumerate(zip(off_ids, ids, strict=True)) if a != b]
    assert changed
    end, ret = tok.convert_tokens_to_ids(["<|end|>", "<|return|>"])
    for k in changed:
        assert {off_ids[k], ids[k]} == {end, ret}
        assert (off_labels[k], labels[k]) == (off_ids[k], ids[k])
    assert [lab for k, lab in enumerate(labels) if k not in changed] == [
        lab for k, lab in enumerate(off_labels) if k not in changed
    ]


def test_trained_tokens(tok):
    """``<|start|>assistant`` is masked; the channel header, the answer and its end token are trained."""
    c = CASES["multi_turn"]
    _, labels = tokenize_conversation(c["conversations"], tok, TEMPLATE, c["num_image_tokens"])
    trained = tok.decode([t for t in labels.tolist() if t != IGNORE_INDEX])
    assert trained == f"{HEADER}A red car in the street.<|end|>{HEADER}Blue, with two clouds.<|return|>"


def test_dataset_samples_match_official(tok, tmp_path):
    """InternVLDataset on a single-image and a text-only record (1 tile of ``num_image_token`` tokens)."""
    from PIL import Image

    Image.new("RGB", (28, 28), (200, 30, 30)).save(tmp_path / "a.png")
    names = ["single_image", "text_only"]
    records = [{"image": "a.png", "conversations": CASES["single_image"]["conversations"]}]
    records.append({"conversations": CASES["text_only"]["conversations"]})
    (tmp_path / "data.json").write_text(json.dumps(records), encoding="utf-8")
    ds = InternVLDataset(
        [str(tmp_path / "data.json")],
        tok,
        image_folders=[str(tmp_path)],
        template=TEMPLATE,
        image_size=28,
        num_image_token=CASES["single_image"]["num_image_tokens"][0],
        max_dynamic_patch=1,
        strict=True,
    )
    for i, name in enumerate(names):
        sample = ds[i]
        want = CASES[name]["intended"]
        assert (sample.input_ids.tolist(), sample.labels.tolist()) == (want["input_ids"], want["labels"])


def test_chat_prompt_and_stop_tokens(tok):
    """The official chat() prompt plus the ``final`` channel header we pre-fill; the official history answer (the
    reply up to ``<|return|>``, channel header included) equals ours behind that header; stops at its EOS first."""
    chat = GOLDEN["chat"]
    template = get_template(TEMPLATE)
    counts = [chat["num_image_token"] * chat["num_patches"]]
    session = ChatSession(None, tok, template, None, image_placeholders(1), counts)
    header = _ids(tok, HEADER)
    stops = stop_token_ids(tok, template)
    assert stops == tok.convert_tokens_to_ids(["<|return|>", "<|end|>"])
    for turn in chat["turns"]:
        prompt = session.prompt(session.question_text(turn["question"]))
        assert tok(prompt)["input_ids"] == turn["input_ids"] + header
        assert turn["eos_token_id"] == stops[0]
        assert turn["response"].startswith(HEADER)
        session.history.append((session.question_text(turn["question"]), turn["response"][len(HEADER) :]))
