"""Converted official directories are served as trained: any loader's tokenizer gives the training ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from xtuner_vl.checkpoint.delta import TrainedDelta
from xtuner_vl.checkpoint.official import export_official
from xtuner_vl.dataset.templates import get_template
from xtuner_vl.model import load_tokenizer

GOLDEN_TEXTS = json.loads(
    (Path(__file__).parents[1] / "model" / "data" / "golden_token_ids.json").read_text(encoding="utf-8")
)["texts"]
# The remote-code files of an InternLM2 release; here they fail loudly if anything imports them.
_TRAP = "raise RuntimeError('checkpoint code executed')\n"
_REMOTE = ("tokenization_internlm2.py", "tokenization_internlm2_fast.py")


def _chat_prompt(template_name: str) -> str:
    """A two-turn prompt of the official template with one image of two tiles, as training builds it."""
    t = get_template(template_name)
    image = "<img>" + "<IMG_CONTEXT>" * 512 + "</img>"
    turns = [
        (t.roles[0], f"{image}\nWhat is shown here?"),
        (t.roles[1], "A cat on a mat."),
        (t.roles[0], "多少只？ Count them."),
        (t.roles[1], " Two."),
    ]
    return t.system_template.format(system_message=t.system_message) + t.sep + "".join(r + m + t.sep for r, m in turns)


def _converted(tiny_ckpt, family: str, tmp_path: Path) -> tuple[Path, Path]:
    base = tmp_path / "base"
    shutil.copytree(tiny_ckpt(family), base)
    for name in _REMOTE:
        (base / name).write_text(_TRAP)
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    out = tmp_path / "out"
    export_official(TrainedDelta(), base, out, config, progress=False)
    return base, out


@pytest.mark.parametrize("family", ["internvl2-2b", "internvl2-40b"])
def test_converted_sentencepiece_dir_loads_with_the_training_ids(tiny_ckpt, tmp_path: Path, family: str) -> None:
    base, out = _converted(tiny_ckpt, family, tmp_path)
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "AutoTokenizer" not in config.get("auto_map", {})
    assert (out / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    trained = load_tokenizer(base)
    template = json.loads((base / "config.json").read_text(encoding="utf-8"))["template"]
    texts = [*GOLDEN_TEXTS, _chat_prompt(template)]
    loaders = {
        "load_tokenizer": load_tokenizer(out),
        "AutoTokenizer": AutoTokenizer.from_pretrained(str(out)),
        "AutoTokenizer(trust_remote_code)": AutoTokenizer.from_pretrained(str(out), trust_remote_code=True),
    }
    for name, tokenizer in loaders.items():
        assert len(tokenizer) == len(trained), name
        for text in texts:
            assert tokenizer(text)["input_ids"] == trained(text)["input_ids"], (name, text[:80])
            assert tokenizer.encode(text, add_special_tokens=False) == trained.encode(text, add_special_tokens=False)
        ids = tokenizer(texts[-1])["input_ids"]
        assert ids.count(tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")) == 512, name


@pytest.mark.parametrize("family", ["internvl2-4b", "internvl2-1b"])
def test_phi3_and_qwen2_tokenizer_files_are_copied(tiny_ckpt, tmp_path: Path, family: str) -> None:
    # Phi-3 (legacy: false) needs a text step tokenizer.json cannot hold; Qwen2's files already give the ids.
    base, out = _converted(tiny_ckpt, family, tmp_path)
    for name in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    trained, reloaded = load_tokenizer(base), load_tokenizer(out)
    prompt = _chat_prompt(json.loads((base / "config.json").read_text(encoding="utf-8"))["template"])
    assert reloaded(prompt)["input_ids"] == trained(prompt)["input_ids"]
