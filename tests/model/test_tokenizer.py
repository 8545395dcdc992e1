"""Tokenizers of the official InternVL families: tiny on-disk copies, loading without remote code, and our
InternLM2 / Llama sentencepiece tokenizers against the official transformers 4.37 slow algorithms."""

import json
import re
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import Tokenizer

from xtuner_vl.model.internlm2_tokenizer import OFFICIAL_AUTO_MAP, InternLM2Tokenizer
from xtuner_vl.model.llama_sp_tokenizer import LlamaSentencePieceTokenizer
from xtuner_vl.model.tokenizer import img_context_token_id, load_tokenizer
from xtuner_vl.tiny.tokenizers import IMAGE_TOKENS, INTERNLM2_CHAT_TOKENS, PHI3_TOKENS, write_tiny_tokenizer

FAMILIES = ("internlm2", "phi3", "qwen2", "llama")
FILES = {
    "internlm2": {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"},
    "phi3": {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "added_tokens.json"},
    "qwen2": {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json"},
    "llama": {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"},
}
CLASSES = {"internlm2": "InternLM2Tokenizer", "phi3": "LlamaTokenizer", "qwen2": "Qwen2Tokenizer",
           "llama": "LlamaTokenizer"}
BOS = {"internlm2": "<s>", "phi3": "<s>", "qwen2": None, "llama": None}
CHAT_MARKERS = {
    "internlm2": ("<|im_start|>", "<|im_end|>"),
    "phi3": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    "qwen2": ("<|im_start|>", "<|im_end|>"),
    "llama": ("<|im_start|>", "<|im_end|>"),
}
SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
    "是一个有用无害的人工智能助手。"
)
TRICKY = [
    "", " ", "  ", "\n", "\n\n", "hello", " hello", "hello ", "  hello  world  ",
    "Hello world.\nSecond line\n",
    "<IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT>", "<img><IMG_CONTEXT></img>\nDescribe the image.",
    f"<|im_start|>system\n{SYSTEM}<|im_end|><|im_start|>user\n<img><IMG_CONTEXT></img>\nWhat?<|im_end|>"
    "<|im_start|>assistant\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n A cat. <|im_end|>", " <|im_end|> ",
    "<|im_end|>\n", "text<s>more</s> <unk>end", "<s> leading bos",
    "a<box>[[1, 2, 3, 4]]</box> b <ref>cat</ref>", "<quad></quad>",
    "<|plugin|><|interpreter|><|action_start|><|action_end|>", "<|im_start|", "<<img>>", "<IMG_CONTEXT",
    "数字 12345 and 678.9", "emoji 🐉 and ü é ñ", "tab\tsep", "▁underline ▁x", "trailing space ",
    "Hello, world! It's a test; isn't it? (yes) [no] {maybe}",
]
LLAMA_TRICKY = [
    *TRICKY, "<|system|>", "<|system|>\nYou are Phi-3.<|end|>\n<|user|>\n<img><IMG_CONTEXT></img>\nWhat?<|end|>\n"
    "<|assistant|>\n", "<|user|>\nhi<|end|><|assistant|>\n A cat. <|end|>", "<|user|>  spaced", "x <|user|> y",
    "<img>x", " <img>", "▁<img>", "▁<|user|>", "▁", " ▁", "▁▁x", "   leading three", "\n<|end|>\n",
    "<|startoftext|>hi<|endoftext|>", " <|endoftext|> a", "<|im_start|>user\n hi<|im_end|>", "</s>\n x",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int]]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {family: (root / family, write_tiny_tokenizer(family, root / family)) for family in FAMILIES}


def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def _reference_internlm2_ids(directory: Path, text: str) -> list[int]:
    """The official algorithm, computed directly: split on the added tokens of tokenizer_config.json
    (longest first), sentencepiece-encode each remaining chunk on its own, prepend BOS."""
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = {entry["content"]: int(i) for i, entry in config["added_tokens_decoder"].items()}
    pattern = "(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")"
    sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    ids = [sp.bos_id()]
    for chunk in re.split(pattern, text):
        if chunk:
            ids.extend([added[chunk]] if chunk in added else sp.encode(chunk))
    return ids


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_files_class_and_size(tiny: dict, family: str) -> None:
    directory, vocab_size = tiny[family]
    assert {p.name for p in directory.iterdir()} == FILES[family]
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == CLASSES[family]
    assert 300 <= vocab_size <= 1200
    tokenizer = load_tokenizer(directory)
    assert len(tokenizer) == vocab_size
    assert max(tokenizer.get_vocab().values()) == vocab_size - 1
    if family == "internlm2":
        assert isinstance(tokenizer, InternLM2Tokenizer)
        assert config["auto_map"] == OFFICIAL_AUTO_MAP
    assert isinstance(tokenizer, LlamaSentencePieceTokenizer) == (CLASSES[family] == "LlamaTokenizer")


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_is_deterministic(tiny: dict, family: str, tmp_path: Path) -> None:
    assert write_tiny_tokenizer(family, tmp_path) == tiny[family][1]
    for file in tiny[family][0].iterdir():
        assert (tmp_path / file.name).read_bytes() == file.read_bytes(), file.name


@pytest.mark.parametrize("family", FAMILIES)
def test_special_token_ids(tiny: dict, family: str) -> None:
    directory, vocab_size = tiny[family]
    tokenizer = load_tokenizer(directory)
    image_ids = tokenizer.convert_tokens_to_ids(list(IMAGE_TOKENS))
    first = vocab_size - len(IMAGE_TOKENS)
    assert image_ids == list(range(first, vocab_size))  # appended last, in InternVL's order
    assert img_context_token_id(tokenizer) == first + 2
    if family == "internlm2":
        proto = sp_pb2.ModelProto.FromString((directory / "tokenizer.model").read_bytes())
        n = len(proto.pieces)
        assert n == first
        tail = proto.pieces[n - len(INTERNLM2_CHAT_TOKENS):]
        assert [p.piece for p in tail] == list(INTERNLM2_CHAT_TOKENS)
        assert all(p.type == sp_pb2.ModelProto.SentencePiece.USER_DEFINED for p in tail)
        assert tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"]) == [n - 2, n - 1]
        assert not proto.normalizer_spec.add_dummy_prefix
        assert not proto.normalizer_spec.remove_extra_whitespaces
        assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
        assert tokenizer.pad_token_id == 2
    elif family == "phi3":
        names = [name for name, _ in PHI3_TOKENS]
        assert tokenizer.convert_tokens_to_ids(names) == list(range(first - len(names), first))
        assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    elif family == "qwen2":
        ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        assert ids == list(range(first - 3, first))
        assert tokenizer.bos_token is None and tokenizer.eos_token == "<|im_end|>"
    else:
        assert tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|im_start|>", "<|im_end|>"]) == [1, 6, 7]
        assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize("family", FAMILIES)
def test_image_context_and_chat_markers_are_single_tokens(tiny: dict, family: str) -> None:
    tokenizer = load_tokenizer(tiny[family][0])
    ctx = img_context_token_id(tokenizer)
    assert tokenizer.encode("<IMG_CONTEXT>" * 3, add_special_tokens=False) == [ctx] * 3
    img, end = tokenizer.convert_tokens_to_ids(["<img>", "</img>"])
    wrapped = tokenizer.encode("<img>" + "<IMG_CONTEXT>" * 3 + "</img>", add_special_tokens=False)
    assert wrapped == [img, ctx, ctx, ctx, end]
    for marker in CHAT_MARKERS[family]:
        marker_id = tokenizer.convert_tokens_to_ids(marker)
        assert marker_id != tokenizer.unk_token_id
        # Phi-3 (legacy: false): 4.37 keeps the text's leading "▁" before an added token that is not special.
        prefix = [tokenizer.convert_tokens_to_ids("▁")] if family == "phi3" else []
        assert tokenizer.encode(marker, add_special_tokens=False) == prefix + [marker_id]
        assert tokenizer.encode(f"hi{marker}there", add_special_tokens=False).count(marker_id) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_bos_behaviour(tiny: dict, family: str) -> None:
    tokenizer = load_tokenizer(tiny[family][0])
    with_special = tokenizer("Describe the image.")["input_ids"]
    without = tokenizer("Describe the image.", add_special_tokens=False)["input_ids"]
    if BOS[family] is None:
        assert with_special == without
    else:
        assert with_special == [tokenizer.convert_tokens_to_ids(BOS[family])] + without


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_round_trip(tiny: dict, family: str) -> None:
    tokenizer = load_tokenizer(tiny[family][0])
    for text in ("Hello world.\nSecond line", SYSTEM, "数字 12345 and (678.9)!", "a  b   c"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    ids = tokenizer("<img><IMG_CONTEXT></img>\nWhat is it?")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "What is it?"


@pytest.mark.parametrize("text", TRICKY)
def test_internlm2_matches_official_algorithm(tiny: dict, text: str) -> None:
    directory = tiny["internlm2"][0]
    tokenizer = load_tokenizer(directory)
    expected = _reference_internlm2_ids(directory, text)
    assert tokenizer(text)["input_ids"] == expected
    assert tokenizer.encode(text, add_special_tokens=False) == expected[1:]


def test_internlm2_decode_matches_official_outputs(tiny: dict) -> None:
    # Outputs of the official InternLM2Tokenizer (transformers 4.37.2) on this tiny directory, quirks
    # included: a space before a run of in-vocab special tokens, added tokens past the vocab joined by spaces.
    tokenizer = load_tokenizer(tiny["internlm2"][0])
    cases = {
        "hello": (" <s>hello", "hello"),
        "<img><IMG_CONTEXT></img>\nDescribe the image.": (
            " <s> <img> <IMG_CONTEXT> </img> \nDescribe the image.", "\nDescribe the image."),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n A cat. <|im_end|>": (
            " <s><|im_start|> user\nhi<|im_end|> \n<|im_start|> assistant\n A cat. <|im_end|>",
            "user\nhi\nassistant\n A cat. "),
        "text<s>more</s> <unk>end": (" <s> text<s> more</s>  <unk>end", "textmore end"),
        "a<box>[[1, 2, 3, 4]]</box> b <ref>cat</ref>": (
            " <s>a <box> [[1, 2, 3, 4]] </box>  b  <ref> cat </ref>", "a[[1, 2, 3, 4]] b cat"),
    }
    for text, (plain, skipped) in cases.items():
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == plain
        assert tokenizer.decode(ids, skip_special_tokens=True) == skipped


def test_internlm2_batch_padding_and_tensors(tiny: dict) -> None:
    tokenizer = load_tokenizer(tiny["internlm2"][0])
    batch = tokenizer(["hello world", "<IMG_CONTEXT>"], padding=True, return_tensors="pt")
    single = tokenizer("hello world")["input_ids"]
    assert batch["input_ids"].shape == (2, len(single))
    assert batch["input_ids"][0].tolist() == single
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * (len(single) - 2)
    assert batch["input_ids"][1, 2:].eq(tokenizer.pad_token_id).all()


def test_internlm2_save_pretrained_keeps_official_format(tiny: dict, tmp_path: Path) -> None:
    directory = tiny["internlm2"][0]
    tokenizer = load_tokenizer(directory)
    tokenizer.save_pretrained(tmp_path)
    for name in FILES["internlm2"]:  # byte for byte what the official release layout holds
        assert (tmp_path / name).read_bytes() == (directory / name).read_bytes(), name
    reloaded = load_tokenizer(tmp_path)
    for text in TRICKY:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_llama_sentencepiece_dir_follows_its_model(tiny: dict) -> None:
    # Yi-style tokenizer.model without dummy prefix, slow LlamaTokenizer legacy semantics in 4.37: each chunk
    # between added tokens is plain sentencepiece; transformers 5 alone would prepend a space.
    directory = tiny["llama"][0]
    tokenizer = load_tokenizer(directory)
    sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    for text in ("hello world", " two  spaces", "x\n\ny", SYSTEM):
        assert tokenizer.encode(text, add_special_tokens=False) == sp.encode(text)
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False) == [
        start, *sp.encode("user\nhi"), end]


def _reference_llama_ids(directory: Path, text: str, add_special_tokens: bool = True) -> list[int]:
    """transformers 4.37.2 slow ``LlamaTokenizer``, computed directly with sentencepiece.

    Non-legacy: the model runs without dummy prefix; the text gets a leading "▁" (its own "▁" become
    spaces), dropped again when a special token follows; a chunk starting with a space is encoded after
    "<unk>", whose pieces are cut off. Legacy: every chunk is plain sentencepiece. Chunks are what lies
    between the added tokens (longest first), with the ``rstrip`` / ``lstrip`` flags applied."""
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    legacy = config.get("legacy") is not False
    proto = sp_pb2.ModelProto.FromString((directory / "tokenizer.model").read_bytes())
    proto.normalizer_spec.add_dummy_prefix &= legacy
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    added = {e["content"]: (int(i), e) for i, e in config["added_tokens_decoder"].items()}
    specials = {config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if config.get(k)}
    specials |= set(config["additional_special_tokens"])
    if not legacy and text:
        text = "▁" + text.replace("▁", " ")
    chunks = re.split("(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")", text)
    for i in range(1, len(chunks), 2):  # odd positions hold the added tokens
        entry = added[chunks[i]][1]
        if entry["rstrip"]:
            chunks[i + 1] = chunks[i + 1].lstrip()
        if entry["lstrip"]:
            chunks[i - 1] = chunks[i - 1].rstrip()
    pieces: list[tuple[bool, str]] = []  # (is an added token, piece)
    for i, chunk in enumerate(chunks):
        if i % 2:
            pieces.append((True, chunk))
        elif chunk and not legacy and chunk.startswith((" ", "▁")):
            cut = len(sp.encode("<unk>"))
            pieces += [(False, p) for p in sp.encode("<unk>" + chunk, out_type=str)[cut:]]
        elif chunk:
            pieces += [(False, p) for p in sp.encode(chunk, out_type=str)]
    if not legacy and len(pieces) > 1 and pieces[0] == (False, "▁") and pieces[1][1] in specials:
        pieces = pieces[1:]
    ids = [added[p][0] if is_added else sp.piece_to_id(p) for is_added, p in pieces]
    if add_special_tokens:
        ids = [added[config["bos_token"]][0]] * config["add_bos_token"] + ids
        ids += [added[config["eos_token"]][0]] * config["add_eos_token"]
    return ids


@pytest.mark.parametrize("legacy", (None, True, False))
@pytest.mark.parametrize("family", ("phi3", "llama"))
def test_llama_family_matches_official_algorithm(tiny: dict, tmp_path: Path, family: str, legacy: bool | None) -> None:
    directory = tiny[family][0]
    if legacy is not None:  # the other legacy setting on the same model (None: as released)
        directory = _copy_dir(directory, tmp_path / "dir")
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
        config["legacy"] = legacy
        (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tokenizer = load_tokenizer(directory)
    assert tokenizer.legacy == json.loads((directory / "tokenizer_config.json").read_text())["legacy"]
    for text in LLAMA_TRICKY:
        assert tokenizer(text)["input_ids"] == _reference_llama_ids(directory, text), text
        assert tokenizer.encode(text, add_special_tokens=False) == _reference_llama_ids(directory, text, False)


def test_llama_family_official_quirks(tiny: dict) -> None:
    # Outputs of transformers 4.37.2's slow LlamaTokenizer on these tiny directories.
    phi3 = load_tokenizer(tiny["phi3"][0])  # legacy: false
    assert phi3.tokenize("<|system|>\nhi")[:2] == ["▁", "<|system|>"]  # <|system|> is no special token
    assert phi3("<|system|>")["input_ids"] == [1, phi3.convert_tokens_to_ids("▁"), 646]
    assert phi3("<img>x")["input_ids"][:2] == [1, 651]  # <img> is: the "▁" is dropped
    assert phi3.tokenize("  hello") == ["▁▁", "▁hello"]
    cases = {
        "hello": ("<s> hello", "hello"),
        "<|system|>": ("<s>  <|system|>", "<|system|>"),
        "<|user|>\nhi<|end|><|assistant|>\n A cat. <|end|>": (
            "<s>  <|user|> hi <|end|> <|assistant|> A cat.  <|end|>",
            "<|user|> hi <|end|> <|assistant|> A cat.  <|end|>",
        ),
        "text<s>more</s> <unk>end": ("<s> text<s>more </s> <unk>end", "textmore </s> end"),
        "▁underline ▁x": ("<s>  underline  x", " underline  x"),
    }
    for text, (plain, skipped) in cases.items():
        ids = phi3(text)["input_ids"]
        assert (phi3.decode(ids), phi3.decode(ids, skip_special_tokens=True)) == (plain, skipped), text
    yi = load_tokenizer(tiny["llama"][0])  # legacy, no dummy prefix
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n A cat. <|im_end|>"
    ids = yi(text)["input_ids"]
    assert yi.decode(ids) == "<|im_start|>  user\nhi<|im_end|>\n <|im_start|>  assistant\n A cat. <|im_end|>"
    assert yi.decode(ids, skip_special_tokens=True) == "<|im_start|> user\nhi\n <|im_start|> assistant\n A cat. "
    assert yi.decode(yi("  hello  world  ")["input_ids"]) == " hello  world  "


@pytest.mark.parametrize("family", ("phi3", "llama"))
def test_llama_family_save_pretrained_round_trip(tiny: dict, tmp_path: Path, family: str) -> None:
    directory = tiny[family][0]
    tokenizer = load_tokenizer(directory)
    tokenizer.save_pretrained(tmp_path / "out")
    for name in FILES[family]:  # byte for byte, tokenizer.json (phi3) copied through
        assert (tmp_path / "out" / name).read_bytes() == (directory / name).read_bytes(), name
    reloaded = load_tokenizer(tmp_path / "out")
    for text in LLAMA_TRICKY:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    # LlamaTokenizerFast and add_bos_token survive (transformers 5 drops the latter next to a tokenizer.json);
    # a tokenizer.json that no longer matches the added tokens is not written.
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update(tokenizer_class="LlamaTokenizerFast", add_bos_token=not config["add_bos_token"])
    edited = _copy_dir(directory, tmp_path / "edited")
    (edited / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tokenizer = load_tokenizer(edited)
    assert tokenizer.add_bos_token == config["add_bos_token"]
    tokenizer.add_tokens(["<new_token>"])
    tokenizer.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert (saved["tokenizer_class"], saved["add_bos_token"]) == ("LlamaTokenizerFast", config["add_bos_token"])
    assert not (tmp_path / "again" / "tokenizer.json").exists()
    assert load_tokenizer(tmp_path / "again").encode("a<new_token>", add_special_tokens=False)[-1] == len(tokenizer) - 1


@pytest.mark.parametrize("family", ("phi3", "qwen2"))
def test_tokenizer_json_matches_vocab_files(tiny: dict, family: str) -> None:
    directory = tiny[family][0]
    fast = Tokenizer.from_file(str(directory / "tokenizer.json"))
    data = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    assert all(isinstance(m, str) for m in data["model"]["merges"])  # readable by tokenizers < 0.19
    texts = ["Hello world.\nSecond line", SYSTEM, "数字 12345 and (678.9)!", " lead", "tab\tsep 🐉"]
    if family == "phi3":  # the legacy Llama tokenizer.json == sentencepiece with its dummy prefix
        sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
        for text in texts:
            assert fast.encode(text, add_special_tokens=False).ids == sp.encode(text)
    else:  # what transformers 5 builds from vocab.json / merges.txt == the tokenizer.json
        tokenizer = load_tokenizer(directory)
        for text in [*texts, *TRICKY]:
            assert tokenizer.encode(text) == fast.encode(text).ids


_TRAP = (
    "from pathlib import Path\n"
    "Path(__file__).with_name('EXECUTED').write_text('x')\n"
    "raise RuntimeError('remote code executed')\n"
)


@pytest.mark.parametrize("drop_class", (False, True))
def test_remote_code_is_never_executed(tiny: dict, tmp_path: Path, drop_class: bool) -> None:
    directory = _copy_dir(tiny["internlm2"][0], tmp_path / "ckpt")
    for name in ("tokenization_internlm2.py", "tokenization_internlm2_fast.py", "__init__.py"):
        (directory / name).write_text(_TRAP)
    if drop_class:  # only the auto_map says InternLM2
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
        del config["tokenizer_class"]
        (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tokenizer = load_tokenizer(directory)
    assert isinstance(tokenizer, InternLM2Tokenizer)
    assert tokenizer("hi")["input_ids"] == _reference_internlm2_ids(directory, "hi")
    assert not (directory / "EXECUTED").exists()


def test_unknown_remote_tokenizer_is_refused(tiny: dict, tmp_path: Path) -> None:
    directory = _copy_dir(tiny["internlm2"][0], tmp_path / "ckpt")
    (directory / "tokenization_custom.py").write_text(_TRAP)
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["tokenizer_class"] = "CustomTokenizer"
    config["auto_map"] = {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match="remote-code tokenizer"):
        load_tokenizer(directory)
    assert not (directory / "EXECUTED").exists()


def test_missing_files_are_named(tiny: dict, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)
    directory = _copy_dir(tiny["internlm2"][0], tmp_path / "ckpt")
    (directory / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_tokenizer(directory)


def test_img_context_token_id_requires_the_token(tiny: dict, tmp_path: Path) -> None:
    directory = _copy_dir(tiny["internlm2"][0], tmp_path / "bare")
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {
        i: t for i, t in config["added_tokens_decoder"].items() if t["content"] not in IMAGE_TOKENS
    }
    specials = config["additional_special_tokens"]
    config["additional_special_tokens"] = [t for t in specials if t not in IMAGE_TOKENS]
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (directory / "added_tokens.json").unlink()
    tokenizer = load_tokenizer(directory)
    with pytest.raises(ValueError, match="<IMG_CONTEXT>"):
        img_context_token_id(tokenizer)
