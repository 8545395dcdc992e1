"""Regenerate docs/estimate_table.md: ``xtuner-vl estimate`` of every shipped config on 8 GPUs.

Each config is estimated with its own DeepSpeed preset (``runtime.deepspeed``). The tiny CPU configs get a
tiny checkpoint written to a temporary directory (their ``model_path`` is made by the demo). Usage::

    python tools/estimate_all.py [--gpus 8] [--out docs/estimate_table.md] [--only SUBSTRING ...]

All configs take several minutes on CPU. ``--only SUBSTRING`` (repeatable) estimates just the configs whose name
contains one of the substrings and rewrites their table row and report in place in the existing ``--out`` file,
leaving every other line byte-identical; a matching config the file does not list yet needs a full run.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from xtuner_vl.engine.memory_estimate import GiB
from xtuner_vl.recipes.config import list_configs
from xtuner_vl.recipes.estimate import Estimate, estimate
from xtuner_vl.recipes.estimate_report import format_estimate
from xtuner_vl.tiny.checkpoints import make_tiny

__all__ = ["main", "render"]

REPO = Path(__file__).resolve().parents[1]
TINY_PLACEHOLDER = "<tiny internvl2-2b checkpoint>"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def _row(e: Estimate) -> str:
    total = e.counts[-1]
    state = dict(e.states)[e.selected]
    ckpt = f"{e.total(state, True) / GiB:.1f}" if state is not None else "n/a"
    no_ckpt = f"{e.total(state, False) / GiB:.1f}" if state is not None else "n/a"
    load = f"{state.load / GiB:.1f}" if state is not None else "n/a"
    return (
        f"| {e.config} | {_count(total.total)} | {_count(total.trainable)} | {e.selected.label} "
        f"| {e.workload.micro_batch} | {ckpt} | {no_ckpt} | {load} |"
    )


def _estimate(name: str, gpus: int, tiny_dir: Path) -> Estimate:
    options = {"model.path": str(tiny_dir)} if name.startswith("tiny") else None
    return estimate(name, gpus=gpus, cfg_options=options)


def _report(e: Estimate, tiny_dir: Path) -> list[str]:
    """The ``### config`` section of ``e``, blank line before it included."""
    text = format_estimate(e).replace(str(tiny_dir), TINY_PLACEHOLDER)
    return ["", f"### {e.config}", "", "```text", text, "```"]


def render(gpus: int, tiny_dir: Path) -> str:
    """The whole markdown file."""
    estimates = [_estimate(name, gpus, tiny_dir) for name in list_configs()]
    lines = [
        "# Estimated parameters and per-GPU memory of the shipped configs",
        "",
        "Regenerate with `python tools/estimate_all.py` (runs on CPU in a few minutes, most of them peft wrapping "
        "the experts of the MoE LoRA configs; no weights needed).",
        "",
        f"Every config at `--gpus {gpus}` with its own DeepSpeed preset and micro-batch, from `xtuner-vl estimate`:",
        "GiB per GPU for the marked backend, with and without gradient checkpointing (the configs turn it on).",
        "Model states, activations and the loss's logits buffer; not CUDA context, communication buckets or",
        "allocator fragmentation (leave a few GiB). The formulas and their assumptions are in the notes of",
        "each report and in `xtuner_vl/engine/memory_estimate.py`. Load GiB: the peak per GPU while the checkpoint",
        "is read, before training (ZeRO-3 partitions each weight as it is read; QLoRA quantizes each LLM linear",
        "as it is read; otherwise every GPU loads the whole model).",
        "",
        "| config | params | trainable | backend | micro-batch | GiB + ckpt | GiB no ckpt | load GiB |",
        "|---|---|---|---|---|---|---|---|",
        *(_row(e) for e in estimates),
        "",
        "## Reports",
    ]
    for e in estimates:
        lines += _report(e, tiny_dir)
    return "\n".join(lines) + "\n"


def update(text: str, gpus: int, tiny_dir: Path, names: list[str]) -> str:
    """``text`` (a file ``render`` wrote at ``gpus``) with the table rows and reports of ``names`` recomputed; every
    other line unchanged."""
    found = re.search(r"^Every config at `--gpus (\d+)`", text, re.M)
    if found is None or int(found.group(1)) != gpus:
        raise SystemExit(f"--only: the file was not rendered at --gpus {gpus}; rerun without --only")
    lines = text.split("\n")
    for name in names:
        e = _estimate(name, gpus, tiny_dir)
        rows = [i for i, line in enumerate(lines) if line.startswith(f"| {name} |")]
        if len(rows) != 1 or f"### {name}" not in lines:
            raise SystemExit(f"--only: {name} is not in the file yet; rerun without --only")
        lines[rows[0]] = _row(e)
        start = lines.index(f"### {name}") - 1  # the blank line _report starts with
        end = lines.index("```", start + 4) + 1  # the fence closing the report (format_estimate has none)
        lines[start:end] = "\n".join(_report(e, tiny_dir)).split("\n")
        print(f"updated {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "docs" / "estimate_table.md"))
    parser.add_argument(
        "--only",
        action="append",
        metavar="SUBSTRING",
        help="recompute only the configs whose name contains SUBSTRING (repeatable) and rewrite their table row and "
        "report in place in the existing --out file, every other line unchanged",
    )
    args = parser.parse_args(argv)
    names = [n for n in list_configs() if any(o in n for o in args.only)] if args.only else None
    if names == []:
        parser.error(f"--only {' '.join(args.only)}: no shipped config matches")
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_tiny("internvl2-2b", Path(tmp) / "internvl2-2b")
        if names is None:
            text = render(args.gpus, tiny)
        else:
            text = update(Path(args.out).read_text(encoding="utf-8"), args.gpus, tiny, names)
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
