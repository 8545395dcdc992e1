"""Golden token ids of the official slow tokenizers (transformers 4.37.2), for tests/model/data/.

The official InternVL fine-tuning code pins transformers 4.37.2 and loads tokenizers with ``use_fast=False``
(internvl_chat/internvl/train/internvl_chat_finetune.py in OpenGVLab/InternVL). This script records the ids
those slow tokenizers give on the tiny tokenizer directories of ``xtuner_vl.tiny.tokenizers``, so that
tests/model/test_tokenizer.py can compare ``load_tokenizer`` with them without transformers 4.37.

Two steps, two virtual environments (the second never imports xtuner_vl):

1. with xtuner-vl's environment, write the tiny directories::

       python tools/golden_token_ids.py write-dirs /tmp/golden_dirs

2. with a throwaway transformers 4.37.2 environment (``pip install transformers==4.37.2 sentencepiece protobuf
   tokenizers==0.15.2``) and the official InternLM2 tokenizer file (``tokenization_internlm2.py`` from
   internvl_chat/internvl/model/internlm2/ in OpenGVLab/InternVL, or from any InternLM2-based release)::

       /tmp/tf437/bin/python tools/golden_token_ids.py golden /tmp/golden_dirs \\
           --internlm2-code /tmp/official/tokenization_internlm2.py --out tests/model/data/golden_token_ids.json

The output holds the texts, for every variant its family, its ``tokenizer_config.json`` overrides, the
sha256 of every file the tiny writer wrote, and per text the ids with and without special tokens plus the
4.37 decode of the ids (with and without ``skip_special_tokens``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

FAMILIES = ("internlm2", "phi3", "qwen2", "llama")
# variant -> (family written by the tiny writer, tokenizer_config.json fields changed afterwards)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "internlm2": ("internlm2", {}),
    "phi3": ("phi3", {}),  # legacy: false, as InternVL2-4B / Mini-InternVL-Chat-4B-V1-5 ship it
    "phi3_legacy": ("phi3", {"legacy": True}),
    "llama": ("llama", {}),  # Yi (InternVL2-40B): legacy, no dummy prefix
    "qwen2": ("qwen2", {}),
}

SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
IMAGE = "<img>" + "<IMG_CONTEXT>" * 4 + "</img>"
TEXTS = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n",
    "hello",
    " hello",
    "hello ",
    "  hello  world  ",
    "Hello world.\nSecond line\n",
    "<IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT>",
    "<img><IMG_CONTEXT></img>\nDescribe the image.",
    f"<|im_start|>system\n{SYSTEM}<|im_end|><|im_start|>user\n<img><IMG_CONTEXT></img>\nWhat?<|im_end|>"
    "<|im_start|>assistant\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n A cat. <|im_end|>",
    " <|im_end|> ",
    "<|im_end|>\n",
    "text<s>more</s> <unk>end",
    "<s> leading bos",
    "a<box>[[1, 2, 3, 4]]</box> b <ref>cat</ref>",
    "<quad></quad>",
    "<|plugin|><|interpreter|><|action_start|><|action_end|>",
    "<|im_start|",
    "<<img>>",
    "<IMG_CONTEXT",
    "数字 12345 and 678.9",
    "emoji 🐉 and ü é ñ",
    "tab\tsep",
    "▁underline ▁x",
    "trailing space ",
    "Hello, world! It's a test; isn't it? (yes) [no] {maybe}",
    # Phi-3 / Yi markers and the quirks of the non-legacy Llama algorithm
    "<|system|>",
    "<|system|>\nYou are Phi-3.<|end|>\n<|user|>\n<img><IMG_CONTEXT></img>\nWhat?<|end|>\n<|assistant|>\n",
    "<|user|>\nhi<|end|><|assistant|>\n A cat. <|end|>",
    "<|user|>  spaced",
    "x <|user|> y",
    "<img>x",
    " <img>",
    "▁<img>",
    "▁<|user|>",
    "▁",
    " ▁",
    "▁▁x",
    "   leading three",
    "\n<|end|>\n",
    "<|startoftext|>hi<|endoftext|>",
    " <|endoftext|> a",
    "<|im_start|>user\n hi<|im_end|>",
    "</s>\n x",
    # CJK, emoji, characters only byte fallback can encode, control and unusual whitespace
    "中文：书生·万象，英文名是InternVL。日本語のテキスト、한국어 텍스트.",
    "全角ＡＢＣ１２３　全角空格",
    "🐉🐲👩‍👩‍👧‍👦🇨🇳 ✅",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∮ ⅷ ﬁ Å Å",
    "zero\u200bwidth\u00a0nbsp\u3000ideographic",
    "\r\nwindows\r\nlines\r\n",
    "\t\t tabs \t",
    "form\x0cfeed\x0bvt",
    "sep\x1cfs\x1dgs",
    "a" * 40 + " " * 17 + "b",
    "trailing newlines\n\n\n",
    "     ",
    "\n \n \n",
    # added tokens next to spaces, newlines, ▁ literals and each other
    "  <|im_end|>  x",
    "<|im_end|> ▁x",
    "x▁<|im_end|>▁",
    "<|user|> ▁hi",
    "<|user|>▁hi",
    "hi ▁<|end|>",
    "<|end|>\t\nx",
    "<s><s> </s></s>",
    " <s>",
    "▁<s>",
    "▁ <s>",
    "<unk>",
    "x<unk>y",
    "<|user|><|user|>",
    "<|im_start|><|im_start|>▁",
    "<IMG_CONTEXT> <IMG_CONTEXT>\n<IMG_CONTEXT>",
    "<img> x </img>",
    "<|reserved_3|>",
    "x<|reserved_3|>y",
    " <|reserved_4|> ",
    "<|im_sep|>a<|reserved_5|>",
    "▁▁▁",
    "▁ ▁ ▁",
    "a▁b",
    "▁hello▁world▁",
    "<0x41> byte piece text",
    "<|endoftext|>",
    "<|end|>",
    # the InternVL prompt templates (internlm2-chat, phi3-chat, Hermes-2, internvl2_5) with image tokens
    f"<|im_start|>system\n{SYSTEM}<|im_end|><|im_start|>user\nImage-1: {IMAGE}\nImage-2: {IMAGE}\n"
    "Compare them.<|im_end|><|im_start|>assistant\nThe first is red; the second, blue.<|im_end|>"
    "<|im_start|>user\nWhy?<|im_end|><|im_start|>assistant\n",
    f"<|system|>\n{SYSTEM}<|end|><|user|>\n{IMAGE}\nWhat is in the image?<|end|><|assistant|>\n"
    "A cat on a mat.<|end|><|user|>\nFrame-1: <img><IMG_CONTEXT></img>\n 多少只？<|end|><|assistant|>\n",
    f"<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n{IMAGE}\n"
    "Please describe the picture in detail.<|im_end|><|im_start|>assistant\n",
    "<|im_start|>system\n你是书生·万象，英文名是InternVL。<|im_end|>\n<|im_start|>user\n"
    f"{IMAGE}\n<ref>the dog</ref><box>[[12, 34, 560, 780]]</box>?<|im_end|>\n<|im_start|>assistant\n",
]


def _file_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def write_dirs(out: Path) -> None:
    """Write one tiny directory per family (xtuner-vl's environment)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when not installed
    from xtuner_vl.tiny.tokenizers import write_tiny_tokenizer

    for family in FAMILIES:
        if (out / family).exists():
            shutil.rmtree(out / family)
        write_tiny_tokenizer(family, out / family)
    print(f"wrote {', '.join(FAMILIES)} under {out}")


def _variant_dir(dirs: Path, variant: str, work: Path) -> Path:
    family, overrides = VARIANTS[variant]
    if not overrides:
        return dirs / family
    target = work / variant
    shutil.copytree(dirs / family, target)
    config_file = target / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.update(overrides)
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return target


def _load_official(directory: Path, internlm2_code: Path) -> Any:
    """The tokenizer the official code builds: ``AutoTokenizer.from_pretrained(path, use_fast=False)``, where
    InternLM2's class comes from the release's own tokenization_internlm2.py."""
    import transformers

    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    if config["tokenizer_class"] == "InternLM2Tokenizer":
        spec = importlib.util.spec_from_file_location("tokenization_internlm2", internlm2_code)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.InternLM2Tokenizer.from_pretrained(str(directory))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), use_fast=False)
    assert not tokenizer.is_fast, type(tokenizer)
    return tokenizer


def golden(dirs: Path, internlm2_code: Path, out: Path) -> None:
    """Tokenize :data:`TEXTS` with the official slow tokenizers (transformers 4.37.2 environment)."""
    import tempfile

    import transformers

    if transformers.__version__ != "4.37.2":
        sys.exit(f"run this step with transformers 4.37.2, found {transformers.__version__}")
    result: dict[str, Any] = {
        "generator": "tools/golden_token_ids.py",
        "transformers": transformers.__version__,
        "texts": TEXTS,
        "variants": {},
    }
    with tempfile.TemporaryDirectory() as work:
        for variant, (family, overrides) in VARIANTS.items():
            tokenizer = _load_official(_variant_dir(dirs, variant, Path(work)), internlm2_code)
            rows = []
            for text in TEXTS:
                ids = tokenizer(text)["input_ids"]
                rows.append(
                    {
                        "ids": ids,
                        "ids_no_special": tokenizer(text, add_special_tokens=False)["input_ids"],
                        "decode": tokenizer.decode(ids),
                        "decode_skip_special": tokenizer.decode(ids, skip_special_tokens=True),
                    }
                )
            result["variants"][variant] = {
                "family": family,
                "config_overrides": overrides,
                "class": type(tokenizer).__name__,
                "files_sha256": _file_hashes(dirs / family),
                "encodings": rows,
            }
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1, ensure_ascii=False)
    # one line per id list (JSON strings hold no raw newline): short, and diffs show which texts changed
    text = re.sub(r"\[\n[\d,\s]+\]", lambda m: json.dumps(json.loads(m.group()), separators=(",", ":")), text)
    out.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {len(TEXTS)} texts x {len(VARIANTS)} variants to {out}")


def main(argv: list[str] | None = None) -> None:
    """Command line: ``write-dirs OUT`` or ``golden DIRS --internlm2-code FILE --out JSON``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("write-dirs", help="write the tiny tokenizer directories (xtuner-vl environment)")
    p.add_argument("out", type=Path)
    p = sub.add_parser("golden", help="tokenize with transformers 4.37.2 slow tokenizers")
    p.add_argument("dirs", type=Path, help="the directory given to write-dirs")
    p.add_argument("--internlm2-code", type=Path, required=True, help="the official tokenization_internlm2.py")
    p.add_argument("--out", type=Path, default=Path("tests/model/data/golden_token_ids.json"))
    args = parser.parse_args(argv)
    if args.step == "write-dirs":
        write_dirs(args.out)
    else:
        golden(args.dirs, args.internlm2_code, args.out)


if __name__ == "__main__":
    main()
