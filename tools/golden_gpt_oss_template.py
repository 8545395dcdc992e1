"""Golden ids and labels of the official ``internvl3_5_gpt_oss`` template, for tests/dataset/data/gpt_oss_golden.json.

Runs the official code of OpenGVLab/InternVL (``internvl_chat_gpt_oss/internvl/train/dataset.py``
``preprocess_internvl3_5_gpt_oss`` and ``internvl_chat_gpt_oss/internvl/model/internvl_chat/modeling_internvl_chat.py``
``InternVLChatModel.chat``) on the tiny ``gpt_oss`` tokenizer of ``xtuner_vl.tiny.tokenizers``, so that
tests/dataset/test_gpt_oss_template.py can compare xtuner-vl's conversation pipeline with it without the official
code. Two steps, two virtual environments (the second never imports xtuner_vl):

1. with xtuner-vl's environment, write the tiny tokenizer::

       python tools/golden_gpt_oss_template.py write-tokenizer /tmp/goss_tok

2. with the official stack (transformers 4.55.4, tokenizers 0.21, torch, torchvision) and a checkout of
   OpenGVLab/InternVL (any directory holding ``internvl_chat_gpt_oss/internvl``)::

       /tmp/official455/venv/bin/python tools/golden_gpt_oss_template.py golden /tmp/goss_tok \\
           --official /tmp/InternVL --commit <sha> --out tests/dataset/data/gpt_oss_golden.json

The official modules are imported from the checkout without their package ``__init__`` files; the video and
image readers ``dataset.py`` imports at module level (cv2, imageio, decord, the s3 client) are stubbed when
missing, since the preprocess function never uses them.

The official preprocess picks ``<|return|>`` or ``<|end|>`` after an answer with ``i == len(conversations) - 1``,
where ``i`` is left over from its ``<image>`` expansion loop (unbound for text-only samples). Per case the output
holds the ids and labels of the official function as it is (or the error it raises), and of the same function with
only that condition replaced by the rule its comment states ("'<|return|>' if last message else '<|end|>'"), which
xtuner-vl implements.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import inspect
import json
import re
import shutil
import sys
import types
from pathlib import Path
from typing import Any

IMAGE_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
TEMPLATE = "internvl3_5_gpt_oss"
STALE_RULE = "i == len(conversations) - 1"
INTENDED_RULE = "conversation is conversations[-1]"  # the turn being written is the last message


def _turn(role: str, value: str) -> dict[str, str]:
    return {"from": role, "value": value}


# name -> (conversations, <IMG_CONTEXT> count per image; [] = a text-only sample)
CASES: dict[str, tuple[list[dict[str, str]], list[int]]] = {
    "two_images_single_turn": (
        [_turn("human", "Image-1: <image>\nImage-2: <image>\nCompare them."), _turn("gpt", "The left one is red.")],
        [3, 2],
    ),
    "system_turn": (
        [_turn("system", "Be brief."), _turn("human", "<image>\n<image>\nWhat is 2+3?"), _turn("gpt", "5")],
        [2, 1],
    ),
    "cjk_and_special_characters": (
        [
            _turn("human", '<image>\n<image>\n中文：这是什么？ <b>tags</b> & "quotes" 🐉\t tab\n\n'),
            _turn("gpt", "书生·万象 says: 🐱 <|not_a_token|> ü é\n  - [[12, 34, 560, 780]]"),
        ],
        [1, 1],
    ),
    "empty_answer": ([_turn("human", "<image>\n<image>\nSay nothing."), _turn("gpt", "")], [1, 2]),
    "single_image": ([_turn("human", "<image>\nWhat is in the image?"), _turn("gpt", "A cat on a mat.")], [4]),
    "multi_turn": (
        [
            _turn("human", "<image>\nDescribe the picture."),
            _turn("gpt", "A red car in the street."),
            _turn("human", "And the sky?"),
            _turn("gpt", "Blue, with two clouds."),
        ],
        [2],
    ),
    "multi_turn_four_images": (
        [
            _turn("human", "<image><image><image><image>\nHow many?"),
            _turn("gpt", "Four."),
            _turn("human", "Which is brightest?"),
            _turn("gpt", "The third."),
        ],
        [1, 1, 1, 1],
    ),
    "leading_gpt_turn": (
        [
            _turn("gpt", "Hello! Ask me about the image."),
            _turn("human", "<image>\nWhat is it?"),
            _turn("gpt", "A dog."),
        ],
        [2],
    ),
    "text_only": ([_turn("human", "What is 2 plus 3?"), _turn("gpt", "It is 5.")], []),
}
# The chat prompt: the official chat() asked twice, the second time with the first turn's history.
CHAT_QUESTIONS = ("What is in the image?", "And its colour?")
CHAT_RESPONSES = ("<|channel|>final<|message|>A cat.<|return|>", "<|channel|>final<|message|>Grey.<|return|>")
CHAT_PATCHES = 2
CHAT_IMAGE_TOKENS = 2  # num_image_token of the fake model


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_tokenizer(out: Path) -> None:
    """Write the tiny gpt_oss tokenizer directory (xtuner-vl's environment)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when not installed
    from xtuner_vl.tiny.tokenizers import write_tiny_tokenizer

    if out.exists():
        shutil.rmtree(out)
    print(f"wrote gpt_oss ({write_tiny_tokenizer('gpt_oss', out)} tokens) to {out}")


def _package(name: str, path: Path | None) -> None:
    module = types.ModuleType(name)
    module.__path__ = [str(path)] if path is not None else []
    sys.modules[name] = module


def _import_official(root: Path) -> tuple[Any, Any]:
    """The official ``internvl.train.dataset`` and ``internvl.model.internvl_chat.modeling_internvl_chat``."""
    base = root / "internvl_chat_gpt_oss" / "internvl"
    if not (base / "train" / "dataset.py").is_file():
        sys.exit(f"{root} holds no internvl_chat_gpt_oss/internvl/train/dataset.py")
    for name in ("cv2", "imageio", "decord"):
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
    sys.modules["decord"].__dict__.setdefault("VideoReader", None)
    _package("internvl", base)
    _package("internvl.model", base / "model")
    _package("internvl.model.internvl_chat", base / "model" / "internvl_chat")
    _package("internvl.train", base / "train")
    _package("internvl.utils", None)
    s3 = types.ModuleType("internvl.utils.s3_fileio")
    s3.Client = None
    sys.modules["internvl.utils.s3_fileio"] = s3
    dataset = importlib.import_module("internvl.train.dataset")
    modeling = importlib.import_module("internvl.model.internvl_chat.modeling_internvl_chat")
    return dataset, modeling


def _intended_preprocess(dataset: Any) -> Any:
    """``preprocess_internvl3_5_gpt_oss`` with only its end-token condition replaced by the commented rule."""
    source = inspect.getsource(dataset.preprocess_internvl3_5_gpt_oss)
    if source.count(STALE_RULE) != 1:
        sys.exit(f"the official preprocess no longer holds {STALE_RULE!r} once; re-check the deviation")
    namespace = dict(vars(dataset))
    exec(compile(source.replace(STALE_RULE, INTENDED_RULE), dataset.__file__, "exec"), namespace)  # noqa: S102
    return namespace["preprocess_internvl3_5_gpt_oss"]


def _run(preprocess: Any, tokenizer: Any, turns: list[dict[str, str]], counts: list[int]) -> dict[str, Any]:
    """The preprocess call of the official dataset (multi_modal_get_item, multi-image or pure-text item)."""
    kwargs = {"text_only": True} if not counts else {"num_image": len(counts)}
    try:
        ret = preprocess(TEMPLATE, [copy.deepcopy(turns)], tokenizer, counts or [256], ds_name="golden", **kwargs)
    except Exception as err:  # noqa: BLE001 - the official dataset catches it and loads another sample
        return {"error": f"{type(err).__name__}: {err}"}
    return {"input_ids": ret["input_ids"][0].tolist(), "labels": ret["labels"][0].tolist()}


def _chat_prompts(modeling: Any, tokenizer: Any) -> list[dict[str, Any]]:
    """Run the official ``InternVLChatModel.chat`` on a stand-in model whose ``generate`` records its input and
    answers with a canned harmony reply."""
    import torch

    conv = modeling.get_conv_template(TEMPLATE)
    seen: list[dict[str, Any]] = []

    def generate(pixel_values: Any, input_ids: Any, attention_mask: Any, **config: Any) -> Any:
        seen.append({"input_ids": input_ids[0].tolist(), "eos_token_id": config["eos_token_id"]})
        reply = CHAT_RESPONSES[len(seen) - 1]
        return torch.tensor([tokenizer(reply, add_special_tokens=False).input_ids])

    model = types.SimpleNamespace(
        template=TEMPLATE,
        system_message=conv.system_message,
        num_image_token=CHAT_IMAGE_TOKENS,
        device="cpu",
        generate=generate,
    )
    pixels = torch.zeros(CHAT_PATCHES, 3, 2, 2)
    history = None
    records = []
    for question in CHAT_QUESTIONS:
        response, history = modeling.InternVLChatModel.chat(
            model, tokenizer, pixels, question, {"max_new_tokens": 8}, history=history, return_history=True
        )
        records.append({"question": question, "response": response, **seen[-1]})
    return records


def golden(tokenizer_dir: Path, official: Path, commit: str, out: Path) -> None:
    """Run the official preprocess and chat prompt on :data:`CASES` (official environment)."""
    import tokenizers
    import transformers

    dataset, modeling = _import_official(official)
    # As internvl_chat_finetune.py loads it; the image tokens are already in the tiny directory.
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(tokenizer_dir), add_eos_token=False, trust_remote_code=True, use_fast=False
    )
    if tokenizer.add_tokens(IMAGE_TOKENS, special_tokens=True) != 0:
        sys.exit(f"{tokenizer_dir} lacks InternVL's image tokens; write it with write-tokenizer")
    intended = _intended_preprocess(dataset)
    cases = {}
    for name, (turns, counts) in CASES.items():
        as_is = _run(dataset.preprocess_internvl3_5_gpt_oss, tokenizer, turns, counts)
        rule = _run(intended, tokenizer, turns, counts)
        if "error" in rule:
            sys.exit(f"{name}: the preprocess with the intended rule failed: {rule['error']}")
        cases[name] = {
            "conversations": turns,
            "num_image_tokens": counts,
            "official": as_is,
            "intended": rule,
            "bug_changes_result": as_is != rule,
        }
        print(f"{name}: {len(rule['input_ids'])} tokens, official end token {'differs' if as_is != rule else 'same'}")
    official_files = {
        p: _sha256(official / p)
        for p in (
            "internvl_chat_gpt_oss/internvl/train/dataset.py",
            "internvl_chat_gpt_oss/internvl/model/internvl_chat/conversation.py",
            "internvl_chat_gpt_oss/internvl/model/internvl_chat/modeling_internvl_chat.py",
        )
    }
    result = {
        "generator": "tools/golden_gpt_oss_template.py",
        "official": {"repo": "OpenGVLab/InternVL", "commit": commit, "files_sha256": official_files},
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "tokenizer_files_sha256": {p.name: _sha256(p) for p in sorted(tokenizer_dir.iterdir()) if p.is_file()},
        "stale_rule": STALE_RULE,
        "intended_rule": INTENDED_RULE,
        "cases": cases,
        "chat": {
            "num_image_token": CHAT_IMAGE_TOKENS,
            "num_patches": CHAT_PATCHES,
            "turns": _chat_prompts(modeling, tokenizer),
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1, ensure_ascii=False)
    # one line per id list (JSON strings hold no raw newline): short, and diffs show which case changed
    text = re.sub(r"\[\n[-\d,\s]+\]", lambda m: json.dumps(json.loads(m.group()), separators=(",", ":")), text)
    out.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases and {len(CHAT_QUESTIONS)} chat prompts to {out}")


def main(argv: list[str] | None = None) -> None:
    """Command line: ``write-tokenizer OUT`` or ``golden TOKENIZER_DIR --official ROOT --commit SHA --out JSON``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("write-tokenizer", help="write the tiny gpt_oss tokenizer (xtuner-vl environment)")
    p.add_argument("out", type=Path)
    p = sub.add_parser("golden", help="run the official code (transformers 4.55 environment)")
    p.add_argument("tokenizer_dir", type=Path, help="the directory given to write-tokenizer")
    p.add_argument("--official", type=Path, required=True, help="an OpenGVLab/InternVL checkout")
    p.add_argument("--commit", default="unknown", help="the checkout's commit, recorded in the output")
    p.add_argument("--out", type=Path, default=Path("tests/dataset/data/gpt_oss_golden.json"))
    args = parser.parse_args(argv)
    if args.step == "write-tokenizer":
        write_tokenizer(args.out)
    else:
        golden(args.tokenizer_dir, args.official, args.commit, args.out)


if __name__ == "__main__":
    main()
