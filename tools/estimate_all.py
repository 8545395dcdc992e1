"""Regenerate docs/estimate_table.md: ``xtuner-vl estimate`` of every shipped config on 8 GPUs.

Each config is estimated with its own DeepSpeed preset (``runtime.deepspeed``). The tiny CPU configs get a
tiny checkpoint written to a temporary directory (their ``model_path`` is made by the demo). Usage::

    python tools/estimate_all.py [--gpus 8] [--out docs/estimate_table.md]
"""

from __future__ import annotations

import argparse
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


def render(gpus: int, tiny_dir: Path) -> str:
    """The whole markdown file."""
    estimates = []
    for name in list_configs():
        options = {"model.path": str(tiny_dir)} if name.startswith("tiny") else None
        estimates.append(estimate(name, gpus=gpus, cfg_options=options))
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
        text = format_estimate(e).replace(str(tiny_dir), TINY_PLACEHOLDER)
        lines += ["", f"### {e.config}", "", "```text", text, "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "docs" / "estimate_table.md"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_tiny("internvl2-2b", Path(tmp) / "internvl2-2b")
        text = render(args.gpus, tiny)
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
