"""Chat templates and conversation tokenization against prompts written by hand from the official templates
(OpenGVLab/InternVL internvl_chat/internvl/conversation.py): input ids equal the whole-prompt tokenization,
labels train each answer and its closing separator only."""

from __future__ import annotations

from pathlib import Path

import pytest

from xtuner_vl.dataset.conversation import (
    ConversationError,
    ensure_image_placeholder,
    expand_image_tokens,
    tokenize_conversation,
)
from xtuner_vl.dataset.templates import TEMPLATE_NAMES, get_template
from xtuner_vl.model.tokenizer import load_tokenizer
from xtuner_vl.structures import IGNORE_INDEX
from xtuner_vl.tiny.tokenizers import write_tiny_tokenizer

SYS2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
SYS25 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
CHATML = ("<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>")
PHI3 = ("<|system|>\n", "<|user|>\n", "<|assistant|>\n", "<|end|>")
# (template, tokenizer family): the official pairings (InternVL2-2B, -1B, -40B, -4B; InternVL2.5 8B / 1B).
PAIRS = [
    ("internlm2-chat", "internlm2"),
    ("Hermes-2", "qwen2"),
    ("Hermes-2", "llama"),
    ("phi3-chat", "phi3"),
    ("internvl2_5", "internlm2"),
    ("internvl2_5", "qwen2"),
]
# Families whose text after a special token tokenizes exactly as it does on its own (no dummy prefix space).
INDEPENDENT = {"internlm2", "qwen2", "llama"}
CASES = {
    "multi_turn": (
        [
            ("<image>\nWhat is in the image?", "A cat sits on the mat."),
            ("What colour is it?", "It is red.\nVery red."),
            ("图片里有什么?", "一只猫。"),
        ],
        [512],
    ),
    "multi_image": (
        [
            ("Image-1: <image>\nImage-2: <image>\nCompare them.", "The first one is a cat."),
            ("And this one? <image>", "A dog."),
        ],
        [256, 512, 768],
    ),
    "text_only": ([("What is 2 plus 3?", "5."), ("And 4 plus 4?", "8.")], []),
}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("conversation_tokenizers")
    out = {}
    for family in ("internlm2", "phi3", "qwen2", "llama"):
        write_tiny_tokenizer(family, root / family)
        out[family] = load_tokenizer(Path(root / family))
    return out


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _bos(tok) -> list[int]:
    return [tok.bos_token_id] if tok("a")["input_ids"] != _encode(tok, "a") else []


def _with_images(pairs: list[tuple[str, str]], counts: list[int]) -> list[tuple[str, str]]:
    """Each <image>, left to right over the questions, written out as <img> <IMG_CONTEXT> x n </img>."""
    remaining, out = list(counts), []
    for question, answer in pairs:
        while "<image>" in question:
            question = question.replace("<image>", "<img>" + "<IMG_CONTEXT>" * remaining.pop(0) + "</img>", 1)
        out.append((question, answer))
    assert not remaining
    return out


def _expected_blocks(template: str, pairs: list[tuple[str, str]], system: str) -> list[list[tuple[str, bool]]]:
    """Hand-written prompt as tokenization blocks of (text, trained) segments."""
    sys_, user, assistant, end = PHI3 if template == "phi3-chat" else CHATML
    if template == "internvl2_5":  # one block per message, each closed by "<|im_end|>\n"; "\n" not trained
        blocks = [[(sys_ + system + end + "\n", False)]]
        for q, a in pairs:
            blocks += [[(user + q + end + "\n", False)], [(assistant, False), (a + end, True), ("\n", False)]]
        return blocks
    segments = [(sys_ + system + end, False)]
    for q, a in pairs:
        segments += [(user + q + end + assistant, False), (a + end, True)]
    return [segments]


def _conversation(pairs: list[tuple[str, str]]) -> list[dict]:
    return [turn for q, a in pairs for turn in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]


def _trained_runs(ids: list[int], labels: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _decoded(tok, ids: list[int]) -> str:
    text = tok.decode(ids, spaces_between_special_tokens=False, clean_up_tokenization_spaces=False)
    return text[1:] if text.startswith(" ") else text  # sentencepiece decoders add a space after a special token


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("template", "family"), PAIRS)
def test_golden_ids_and_labels(tokenizers, template, family, case):
    tok = tokenizers[family]
    pairs, counts = CASES[case]
    system = SYS25 if template == "internvl2_5" else SYS2
    blocks = _expected_blocks(template, _with_images(pairs, counts), system)
    ids, labels = tokenize_conversation(_conversation(pairs), tok, template, counts)
    ids, labels = ids.tolist(), labels.tolist()

    # input ids: the whole joined prompt tokenized once (per message block for internvl2_5), after BOS
    expected_ids = _bos(tok) + [i for block in blocks for i in _encode(tok, "".join(t for t, _ in block))]
    assert ids == expected_ids
    assert len(labels) == len(ids)
    context_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert ids.count(context_id) == sum(counts)
    assert all(label == IGNORE_INDEX for i, label in zip(ids, labels, strict=True) if i == context_id)
    if family in INDEPENDENT:  # labels segment by segment, each segment tokenized on its own
        expected_labels = [IGNORE_INDEX] * len(_bos(tok))
        for text, trained in (segment for block in blocks for segment in block):
            seg = _encode(tok, text)
            expected_labels += seg if trained else [IGNORE_INDEX] * len(seg)
        assert labels == expected_labels
    # every trained span decodes to its answer + closing separator and follows the assistant header
    runs = _trained_runs(ids, labels)
    end = PHI3[3] if template == "phi3-chat" else CHATML[3]
    assert [_decoded(tok, ids[b:e]) for b, e in runs] == [a + end for _, a in pairs]
    assert all(labels[b:e] == ids[b:e] for b, e in runs)
    assert all(ids[e - 1] == tok.convert_tokens_to_ids(end) for _, e in runs)
    header = (PHI3 if template == "phi3-chat" else CHATML)[2].rstrip("\n")  # Phi-3's header eats its "\n"
    assert all(_decoded(tok, ids[:b]).rstrip("\n").endswith(header) for b, _ in runs)


def test_internvl2_5_closing_newline_untrained(tokenizers):
    tok = tokenizers["qwen2"]
    ids, labels = tokenize_conversation(_conversation([("hi", "hello")]), tok, "internvl2_5", 0)
    newline, im_end = _encode(tok, "\n"), tok.convert_tokens_to_ids("<|im_end|>")
    assert ids.tolist()[-2:] == [im_end] + newline
    assert labels.tolist()[-2:] == [im_end, IGNORE_INDEX]


def test_internvl2_5_tokenizes_each_message_block(tokenizers):
    """preprocess_internvl2_5 tokenizes every message block on its own (BOS written as text before the first);
    Phi-3's tokenizer starts a text with a space piece, so that differs from tokenizing the joined prompt."""
    tok = tokenizers["phi3"]
    blocks = [
        CHATML[0] + SYS25 + CHATML[3] + "\n",
        CHATML[1] + "q" + CHATML[3] + "\n",
        CHATML[2] + "a" + CHATML[3] + "\n",
    ]
    ids, labels = tokenize_conversation(_conversation([("q", "a")]), tok, "internvl2_5")
    expected = _encode(tok, "<s>" + blocks[0]) + _encode(tok, blocks[1]) + _encode(tok, blocks[2])
    assert ids.tolist() == expected != _encode(tok, "<s>" + "".join(blocks))
    [(begin, end)] = _trained_runs(ids.tolist(), labels.tolist())
    assert _decoded(tok, ids.tolist()[begin:end]) == "a<|im_end|>"


def test_template_object_name_and_int_count_agree(tokenizers):
    tok = tokenizers["internlm2"]
    conv = _conversation([("<image>\nWhat?", "A cat.")])
    by_name = tokenize_conversation(conv, tok, "internlm2-chat", 256)
    by_object = tokenize_conversation(conv, tok, get_template("internlm2-chat"), [256])
    assert all((a == b).all() for a, b in zip(by_name, by_object, strict=True))


def test_system_message_versions_and_override(tokenizers):
    v15 = {
        "internlm2-chat": "You are an AI assistant whose name is InternLM (书生·浦语).",
        "Hermes-2": "Answer the questions.",
        "phi3-chat": "You are an AI assistant whose name is Phi-3.",
    }
    for name, message in v15.items():
        assert get_template(name, version="internvl1_5").system_message == message
        assert get_template(name).system_message == SYS2
    assert get_template("internvl2_5").system_message == SYS25
    assert get_template("Hermes-2", system_message="Be brief.").system_message == "Be brief."
    tok = tokenizers["internlm2"]
    template = get_template("internlm2-chat", version="internvl1_5")
    ids, _ = tokenize_conversation(_conversation([("q", "a")]), tok, template)
    head = _bos(tok) + _encode(tok, CHATML[0] + v15["internlm2-chat"] + CHATML[3])
    assert ids.tolist()[: len(head)] == head


def test_template_table(tokenizers):
    assert set(TEMPLATE_NAMES) == {"internlm2-chat", "Hermes-2", "phi3-chat", "internvl2_5", "internvl3_5_gpt_oss"}
    for name in ("internlm2-chat", "Hermes-2", "internvl2_5"):
        t = get_template(name)
        assert (t.system_template, t.roles) == ("<|im_start|>system\n{system_message}", CHATML[1:3])
    phi3 = get_template("phi3-chat")
    assert (phi3.system_template, phi3.roles, phi3.sep) == ("<|system|>\n{system_message}", PHI3[1:3], "<|end|>")
    assert [get_template(n).sep for n in ("internlm2-chat", "Hermes-2", "internvl2_5")] == [
        "<|im_end|>",
        "<|im_end|>",
        "<|im_end|>\n",
    ]
    with pytest.raises(ValueError, match="known templates: internlm2-chat, Hermes-2, phi3-chat, internvl2_5"):
        get_template("vicuna_v1.1")
    with pytest.raises(ValueError, match="unknown release version"):
        get_template("Hermes-2", version="internvl3")


def test_system_turn_replaces_system_message(tokenizers):
    tok = tokenizers["qwen2"]
    conv = [{"from": "system", "value": "Be brief."}, *_conversation([("q", "a")])]
    for name in ("Hermes-2", "internvl2_5"):
        with_turn = tokenize_conversation(conv, tok, name)
        with_message = tokenize_conversation(conv[1:], tok, get_template(name, system_message="Be brief."))
        assert all((a == b).all() for a, b in zip(with_turn, with_message, strict=True))


def test_leading_gpt_turns_dropped(tokenizers):
    tok = tokenizers["internlm2"]
    conv = _conversation([("q", "a")])
    plain = tokenize_conversation(conv, tok, "internlm2-chat")
    dropped = tokenize_conversation([{"from": "gpt", "value": "Hi!"}, *conv], tok, "internlm2-chat")
    assert all((a == b).all() for a, b in zip(plain, dropped, strict=True))


def test_values_stripped_for_internlm2_chat_only(tokenizers):
    tok = tokenizers["qwen2"]
    spaced, tight = _conversation([("  q \n", "\n a  ")]), _conversation([("q", "a")])
    same = [tokenize_conversation(c, tok, "internlm2-chat")[0].tolist() for c in (spaced, tight)]
    assert same[0] == same[1]
    kept = [tokenize_conversation(c, tok, "Hermes-2")[0].tolist() for c in (spaced, tight)]
    assert kept[0] != kept[1]


def test_merged_newline_at_answer_start_is_not_trained(tokenizers):
    """Qwen2 merges the header's "\\n" with an answer's leading "\\n" into one token; like the official code,
    that token stays untrained and the rest of the answer is trained."""
    tok = tokenizers["qwen2"]
    ids, labels = tokenize_conversation(_conversation([("q", "\nA cat.")]), tok, "Hermes-2")
    ids, labels = ids.tolist(), labels.tolist()
    assert ids == _encode(
        tok, CHATML[0] + SYS2 + CHATML[3] + CHATML[1] + "q" + CHATML[3] + CHATML[2] + "\nA cat." + CHATML[3]
    )
    [(begin, end)] = _trained_runs(ids, labels)
    assert _decoded(tok, ids[begin:end]) == "A cat.<|im_end|>"
    assert _decoded(tok, ids[begin - 1 : begin]) == "\n\n"


def test_empty_answer_trains_nothing_like_official(tokenizers):
    tok = tokenizers["internlm2"]
    ids, labels = tokenize_conversation(_conversation([("q1", ""), ("q2", "a2")]), tok, "internlm2-chat")
    ids, labels = ids.tolist(), labels.tolist()
    prompt = (
        CHATML[0]
        + SYS2
        + CHATML[3]
        + CHATML[1]
        + "q1"
        + CHATML[3]
        + CHATML[2]
        + CHATML[1]
        + "q2"
        + CHATML[3]
        + CHATML[2]
        + "a2"
        + CHATML[3]
    )  # an empty message is a bare role header, without separator
    assert ids == _bos(tok) + _encode(tok, prompt)
    assert [_decoded(tok, ids[b:e]) for b, e in _trained_runs(ids, labels)] == ["a2<|im_end|>"]
    with pytest.raises(ConversationError, match="no trained token"):
        tokenize_conversation(_conversation([("q1", " ")]), tok, "internlm2-chat")


class _MergingTokenizer:
    """Character-level stub that makes ``merge`` a single token (a token straddling a label boundary)."""

    def __init__(self, merge: str) -> None:
        self.merge = merge

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids, i = [], 0
        while i < len(text):
            if self.merge and text.startswith(self.merge, i):
                ids, i = ids + [0], i + len(self.merge)
            else:
                ids, i = ids + [ord(text[i])], i + 1
        return {"input_ids": ids}


def test_boundary_inside_token_raises():
    conv = _conversation([("q", "The answer is long enough here.")])
    ids, labels = tokenize_conversation(conv, _MergingTokenizer("\nThe"), "Hermes-2")
    ids, labels = ids.tolist(), labels.tolist()
    assert [label for label in labels if label != IGNORE_INDEX] == [
        ord(c) for c in " answer is long enough here.<|im_end|>"
    ]
    assert ids.count(0) == 1 and labels[ids.index(0)] == IGNORE_INDEX  # the straddling "\nThe" is not trained
    with pytest.raises(ConversationError, match="labels cannot be placed exactly"):
        tokenize_conversation(conv, _MergingTokenizer("\nThe answer is long enough"), "Hermes-2")


def test_expand_image_tokens():
    assert expand_image_tokens("a<image>b<image>", [2, 1]) == (
        "a<img><IMG_CONTEXT><IMG_CONTEXT></img>b<img><IMG_CONTEXT></img>"
    )
    assert expand_image_tokens("no image", []) == "no image"
    with pytest.raises(ConversationError, match="2 <image> placeholder"):
        expand_image_tokens("<image><image>", [256])
    with pytest.raises(ConversationError, match="positive ints"):
        expand_image_tokens("<image>", [0])


def test_ensure_image_placeholder():
    conv = [{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "What?"}, {"from": "gpt", "value": "A."}]
    out = ensure_image_placeholder(conv, 1)
    assert out[1]["value"] == "<image>\nWhat?" and conv[1]["value"] == "What?"  # input left unchanged
    assert ensure_image_placeholder(conv, 2) == conv and ensure_image_placeholder(conv, 0) == conv
    later = [*conv, {"from": "human", "value": "And <image>?"}, {"from": "gpt", "value": "B."}]
    assert ensure_image_placeholder(later, 1) == later


ERRORS = [
    ([], 0, "empty conversation"),
    ([{"from": "user", "value": "q"}, {"from": "gpt", "value": "a"}], 0, "unknown role 'user'"),
    ([{"from": "human", "value": 3}], 0, "str 'value'"),
    ([*_conversation([("q", "a")]), {"from": "system", "value": "s"}], 0, "only the first turn"),
    ([{"from": "human", "value": "q"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], 0, "alternate"),
    ([{"from": "human", "value": "q"}], 0, "no assistant answer"),
    ([{"from": "gpt", "value": "a"}], 0, "no human turn"),
    ([{"from": "system", "value": "s"}], 0, "no human turn"),
    (_conversation([("q <IMG_CONTEXT>", "a")]), 0, "reserved image token <IMG_CONTEXT>"),
    (_conversation([("q", "a <img>")]), 0, "reserved image token <img>"),
    (_conversation([("q </img>", "a")]), 0, "reserved image token </img>"),
    (_conversation([("q", "a <image>")]), 0, r"\(gpt\) holds <image>"),
    (_conversation([("<image> q", "a")]), 0, "1 <image> placeholder.* but 0 image token count"),
    (_conversation([("q", "a")]), 256, "0 <image> placeholder.* but 1 image token count"),
    (_conversation([("<image> q", "a")]), [256, 256], "but 2 image token count"),
]


@pytest.mark.parametrize(("conv", "counts", "message"), ERRORS)
def test_errors(tokenizers, conv, counts, message):
    with pytest.raises(ConversationError, match=message):
        tokenize_conversation(conv, tokenizers["internlm2"], "internlm2-chat", counts)


def test_conversation_error_is_value_error():
    assert issubclass(ConversationError, ValueError)
