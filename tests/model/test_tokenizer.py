"""Tokenizers of the official InternVL families: tiny on-disk copies, loading without remote code, and ids equal
to the official transformers 4.37 slow tokenizers (golden ids in data/golden_token_ids.json)."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from xtuner_vl.model.sentencepiece_fast import (
    NonLegacyLlamaTokenizerFast,
    build_sentencepiece_tokenizer,
    tokenizer_json_for_release,
)
from xtuner_vl.model.tokenizer import img_context_token_id, load_tokenizer
from xtuner_vl.tiny.tokenizers import IMAGE_TOKENS, INTERNLM2_CHAT_TOKENS, PHI3_TOKENS, write_tiny_tokenizer

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_token_ids.json").read_text(encoding="utf-8"))
REGENERATE = "regenerate with tools/golden_token_ids.py (see its docstring)"
FAMILIES = ("internlm2", "phi3", "qwen2", "llama")
FILES = {
    "internlm2": {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"},
    "phi3": {
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
    },
    "qwen2": {
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
    },
    "llama": {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"},
}
CLASSES = {
    "internlm2": "InternLM2Tokenizer",
    "phi3": "LlamaTokenizer",
    "qwen2": "Qwen2Tokenizer",
    "llama": "LlamaTokenizer",
}
BOS = {"internlm2": "<s>", "phi3": "<s>", "qwen2": None, "llama": None}
CHAT_MARKERS = {
    "internlm2": ("<|im_start|>", "<|im_end|>"),
    "phi3": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    "qwen2": ("<|im_start|>", "<|im_end|>"),
    "llama": ("<|im_start|>", "<|im_end|>"),
}
SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
TEXTS = GOLDEN["texts"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int]]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {family: (root / family, write_tiny_tokenizer(family, root / family)) for family in FAMILIES}


def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


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
        assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_internlm2.InternLM2Tokenizer"
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert isinstance(tokenizer, NonLegacyLlamaTokenizerFast) == (family == "phi3")  # legacy: false


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
        tail = proto.pieces[n - len(INTERNLM2_CHAT_TOKENS) :]
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


def _variant_dir(tiny: dict, variant: str, root: Path) -> Path:
    entry = GOLDEN["variants"][variant]
    directory = tiny[entry["family"]][0]
    if not entry["config_overrides"]:
        return directory
    target = root / variant
    shutil.copytree(directory, target)
    config = json.loads((target / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update(entry["config_overrides"])
    (target / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return target


@pytest.mark.parametrize("variant", sorted(GOLDEN["variants"]))
def test_tiny_dirs_are_the_golden_ones(tiny: dict, variant: str) -> None:
    entry = GOLDEN["variants"][variant]
    directory = tiny[entry["family"]][0]
    hashes = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}
    assert hashes == entry["files_sha256"], f"the tiny {entry['family']} tokenizer changed: {REGENERATE}"


@pytest.mark.parametrize("variant", sorted(GOLDEN["variants"]))
def test_ids_equal_the_official_slow_tokenizers(tiny: dict, tmp_path: Path, variant: str) -> None:
    tokenizer = load_tokenizer(_variant_dir(tiny, variant, tmp_path))
    rows = GOLDEN["variants"][variant]["encodings"]
    for text, row in zip(TEXTS, rows, strict=True):
        assert tokenizer(text)["input_ids"] == row["ids"], (variant, text)
        assert tokenizer.encode(text, add_special_tokens=False) == row["ids_no_special"], (variant, text)
    assert tokenizer(TEXTS)["input_ids"] == [row["ids"] for row in rows]  # the batch path too
    ids = tokenizer.encode(TEXTS[-1], add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids(tokenizer.tokenize(TEXTS[-1])) == ids


@pytest.mark.parametrize("variant", sorted(GOLDEN["variants"]))
def test_decode_without_special_tokens_reads_the_text(tiny: dict, tmp_path: Path, variant: str) -> None:
    # The 4.37 slow decoders add spaces around special and added tokens; ours follows the fast pipeline. With
    # skip_special_tokens (how answers are read) both give the text back on plain text.
    tokenizer = load_tokenizer(_variant_dir(tiny, variant, tmp_path))
    for text, row in zip(TEXTS, GOLDEN["variants"][variant]["encodings"], strict=True):
        if "<" not in text and "▁" not in text and text.strip() == text and text:
            assert tokenizer.decode(row["ids"], skip_special_tokens=True) == row["decode_skip_special"], text


def test_batch_padding_and_tensors(tiny: dict) -> None:
    tokenizer = load_tokenizer(tiny["internlm2"][0])
    batch = tokenizer(["hello world", "<IMG_CONTEXT>"], padding=True, return_tensors="pt")
    single = tokenizer("hello world")["input_ids"]
    assert batch["input_ids"].shape == (2, len(single))
    assert batch["input_ids"][0].tolist() == single
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * (len(single) - 2)
    assert batch["input_ids"][1, 2:].eq(tokenizer.pad_token_id).all()


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
        start,
        *sp.encode("user\nhi"),
        end,
    ]


def test_non_legacy_text_step(tiny: dict) -> None:
    phi3 = load_tokenizer(tiny["phi3"][0])  # legacy: false
    system = phi3.convert_tokens_to_ids(["▁", "<|system|>"])
    assert phi3.encode("<|system|>\nhi", add_special_tokens=False)[:2] == system  # <|system|> is not special
    assert phi3("<img>x")["input_ids"][:2] == [1, phi3.convert_tokens_to_ids("<img>")]  # <img> is: no "▁"
    assert phi3.official_text("<img>a▁b") == "<img>a b"
    with pytest.raises(NotImplementedError, match="tokenizer files"):
        phi3.save_pretrained("unused")
    with pytest.raises(ValueError, match="non-legacy"):
        tokenizer_json_for_release(phi3)


def test_release_tokenizer_json_is_the_pipeline(tiny: dict) -> None:
    tokenizer = load_tokenizer(tiny["internlm2"][0])
    text = tokenizer_json_for_release(tokenizer)
    data = json.loads(text)
    assert all(isinstance(m, str) and m.count(" ") == 1 for m in data["model"]["merges"])  # tokenizers < 0.20
    assert "ignore_merges" not in data["model"]
    fast = Tokenizer.from_str(text)
    for t in TEXTS:
        assert fast.encode(t).ids == tokenizer(t)["input_ids"]


def test_unsupported_sentencepiece_models_are_refused(tiny: dict, tmp_path: Path) -> None:
    directory = _copy_dir(tiny["internlm2"][0], tmp_path / "ckpt")
    proto = sp_pb2.ModelProto.FromString((directory / "tokenizer.model").read_bytes())
    proto.normalizer_spec.remove_extra_whitespaces = True
    (directory / "tokenizer.model").write_bytes(proto.SerializeToString())
    with pytest.raises(ValueError, match="whitespace folding"):
        build_sentencepiece_tokenizer(directory)
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"]["1"]["single_word"] = True
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (directory / "tokenizer.model").write_bytes((tiny["internlm2"][0] / "tokenizer.model").read_bytes())
    with pytest.raises(ValueError, match="single_word"):
        load_tokenizer(directory)


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
        for text in [*texts, *TEXTS]:
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
    assert tokenizer("hi")["input_ids"] == load_tokenizer(tiny["internlm2"][0])("hi")["input_ids"]
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
