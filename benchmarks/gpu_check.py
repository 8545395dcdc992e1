"""The one short check of the GPU path: run it once on a lent GPU and record its table.

``python benchmarks/gpu_check.py`` (one GPU, from a fresh checkout, nothing downloaded, under 6 minutes on
an H100) checks and measures, printing a table and writing JSON (``--out``):

1. **Packed attention.** For every variable-length back-end that runs here (flash-attn 2 if it imports,
   torch's ``varlen_attn``): packed rows of several samples (three rows, the last one an overflow row)
   give each sample the logits it gets unpacked; the same rows without their boundaries must not.
2. **Training steps in bf16** through ``xtuner-vl train`` as one plain process (one-process DeepSpeed):
   LoRA and full fine-tuning on ZeRO-2 and ZeRO-3, packed, and QLoRA (bitsandbytes 4-bit on CUDA). Each
   must finish with finite losses; the table shows the losses and peak memory.
3. **ZeRO-3 load**: peak GPU memory while a checkpoint loads into partitioned parameters, against the
   size of its weights.
4. **Throughput** of an InternVL2-2B-shaped LoRA step (random weights built on the GPU), packed and
   padded: tokens/s, TFLOP/s, MFU, peak memory (``bench_throughput.py``).

``--cpu-smoke`` runs the same checks on CPU with tiny models (fp32, SDPA, the stand-in-free paths):
what CI runs, so the script stays runnable; it measures nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from xtuner_vl.dataset import InternVLDataset, collate_samples
from xtuner_vl.dataset.packing import pack_rows
from xtuner_vl.engine.deepspeed_config import CONFIG_ROOT
from xtuner_vl.model import load_internvl, load_tokenizer
from xtuner_vl.model.attention import flash_attn_import_error
from xtuner_vl.model.tokenizer import img_context_token_id
from xtuner_vl.tiny.checkpoints import make_tiny
from xtuner_vl.tiny.data import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
TINY = CONFIG_ROOT / "tiny"


class Check:
    """Runs named checks, each timed and caught, and keeps one result row per check."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        try:
            row = {"check": name, "ok": True, **fn()}
        except Exception as e:  # a failed check is reported, the others still run
            row = {"check": name, "ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        self.rows.append(row)
        status = "ok" if row["ok"] else "FAIL"
        hidden = ("check", "ok", "trace", "seconds", "layouts")
        details = ", ".join(f"{k}={v}" for k, v in row.items() if k not in hidden)
        print(f"{status:<4} {name:<34} {row['seconds']:>6.1f}s  {details}", flush=True)


def attention_backends(cpu: bool) -> list[str]:
    if cpu:
        return ["sdpa"]
    return (["flash_attention_2"] if flash_attn_import_error() is None else []) + ["torch_varlen"]


def packed_attention(ckpt: Path, data: tuple[Path, Path], backend: str, device: torch.device) -> dict[str, Any]:
    """Per-sample logits of packed rows against the same samples unpacked, and without boundaries."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    tokenizer = load_tokenizer(ckpt)
    ds = InternVLDataset(
        data_paths=[str(data[0])],
        tokenizer=tokenizer,
        image_folders=[str(data[1])],
        model_path=ckpt,
        max_dynamic_patch=2,
    )
    samples = [ds[i] for i in range(6)]
    model = load_internvl(ckpt, dtype=dtype, attn_implementation=backend, device=device)
    collate = dict(img_context_token_id=img_context_token_id(tokenizer), pixel_dtype=dtype)
    packed = collate_samples(pack_rows(samples, pack_length=1100, max_tiles=8), **collate).batch
    unpacked = collate_samples(samples, **collate).batch

    @torch.no_grad()
    def per_sample(b, boundaries: bool = True) -> list[torch.Tensor]:
        b = b.to(device)
        logits = model(
            b.pixel_values,
            b.input_ids,
            attention_mask=None if b.packed else b.attention_mask,
            position_ids=b.position_ids,
            image_flags=b.image_flags,
            use_cache=False,
            cu_seqlens=b.cu_seqlens if boundaries else None,
            max_seqlen=b.max_seqlen,
        ).logits.float()
        flat, bounds = logits.reshape(-1, logits.shape[-1]), b.cu_seqlens.tolist()
        real = b.attention_mask.reshape(-1).bool()
        return [flat[x:y] for x, y in zip(bounds, bounds[1:], strict=False) if real[x]]

    ref = per_sample(unpacked)
    scale = max(r.abs().max().item() for r in ref)

    def worst(got: list[torch.Tensor]) -> float:
        return max((g - r).abs().max().item() for g, r in zip(got, ref, strict=True)) / scale

    diff, dropped = worst(per_sample(packed)), worst(per_sample(packed, boundaries=False))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    if backend == "sdpa":  # the block mask comes from the restarting position ids, not the boundaries
        dropped = float("nan")
    elif not dropped > 10 * max(diff, tolerance / 10):
        raise AssertionError(f"dropping the boundaries changed too little ({dropped:.2e}): the check cannot fail")
    if not diff <= tolerance:
        raise AssertionError(f"packed logits differ from unpacked by {diff:.2e} of their scale (> {tolerance})")
    return {
        "rows": packed.input_ids.shape[0],
        "samples": 6,
        "rel_diff": f"{diff:.1e}",
        "rel_diff_without_boundaries": f"{dropped:.1e}",
    }


def train_run(
    ckpt: Path, data: tuple[Path, Path], work: Path, config: str, deepspeed: str | None, extra: list[str], cpu: bool
) -> dict[str, Any]:
    """``xtuner-vl train`` as one plain process; finite losses required."""
    args = [sys.executable, "-m", "xtuner_vl.cli.main", "train", str(TINY / config), "--work-dir", str(work)]
    args += ["--deepspeed", deepspeed] if deepspeed else []
    args += [
        "--cfg-options",
        f"model.path={ckpt}",
        f"train_dataset.data_paths=['{data[0]}']",
        f"train_dataset.image_folders=['{data[1]}']",
        "schedule.max_steps=3",
        "runtime.save_steps=1000",
        f"model.dtype={'fp32' if cpu else 'bf16'}",
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC_PER_NODE", "NNODES", "RANK", "WORLD_SIZE")}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip().splitlines()[-1]}")
    records = [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]  # evaluation records have none
    if len(losses) != 3 or not all(math.isfinite(x) for x in losses):
        raise AssertionError(f"losses {losses}")
    peak = max(r.get("peak_mem_gib", float("nan")) for r in records)
    return {"losses": [round(x, 4) for x in losses], "peak_gib": None if math.isnan(peak) else round(peak, 2)}


def zero3_load_child(path: str, out: str) -> None:
    """(child process) One-process ZeRO-3 load of ``path`` as ``xtuner-vl train`` does it; peak memory to ``out``."""
    import resource

    from xtuner_vl.engine.deepspeed_config import complete_deepspeed_config, load_deepspeed_config
    from xtuner_vl.engine.dist import init_distributed
    from xtuner_vl.model import read_config
    from xtuner_vl.recipes.model_wrapper import InternVLChat

    d = init_distributed()
    cuda = d.device.type == "cuda"
    hidden = read_config(path).llm_config["hidden_size"]
    ds = complete_deepspeed_config(load_deepspeed_config("zero3"), 1, 1, 1, 1.0, cuda, hidden)
    s = InternVLChat(path=path, dtype="bf16" if cuda else "fp32", lora=dict(llm_rank=16))
    before = torch.cuda.memory_allocated(d.device) if cuda else 0
    s.build(d.device, ds)
    if cuda:
        peak = torch.cuda.max_memory_allocated(d.device) - before
    else:  # the process's peak RSS: a smoke figure only
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(out).write_text(json.dumps({"peak_bytes": peak}))


def zero3_load(tmp: Path, ckpt: Path | None, cpu: bool) -> dict[str, Any]:
    """Peak device memory of a one-process ZeRO-3 load against the checkpoint's weight bytes."""
    if ckpt is None:  # an InternVL2-2B-like checkpoint with a narrower LLM, written from the CPU (about 2.5 GB)
        sys.path.insert(0, str(REPO / "benchmarks"))
        from bench_load import write_checkpoint

        ckpt = tmp / "load-ckpt"
        write_checkpoint(ckpt, {"hidden_size": 2048, "num_hidden_layers": 8, "intermediate_size": 8192}, "1GB", 0)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    out = tmp / "zero3_load.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NPROC_PER_NODE")}
    args = [sys.executable, str(Path(__file__).resolve()), "--zero3-load-child", str(ckpt), str(out)]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip().splitlines()[-1]}")
    peak = json.loads(out.read_text())["peak_bytes"]
    what = "peak RSS (smoke)" if cpu else "peak GPU memory"
    return {
        "checkpoint_gib": round(size / 2**30, 2),
        "load_peak_gib": round(peak / 2**30, 2),
        "measured": what,
        "peak_over_checkpoint": round(peak / size, 2),
    }


def throughput(out_json: Path, cpu: bool) -> dict[str, Any]:
    """bench_throughput.py: the InternVL2-2B-shaped LoRA step, padded and packed."""
    args = [sys.executable, "benchmarks/bench_throughput.py", "--json", str(out_json)]
    args += ["--tiny", "--steps", "1", "--warmup", "1"] if cpu else ["--steps", "8", "--warmup", "3"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=400)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip().splitlines()[-1]}")
    result = json.loads(out_json.read_text())
    row = {"attention": result["attention"]}
    for layout, r in result["layouts"].items():
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        row[layout] = f"{r['tokens_per_s']:.0f} tok/s, {r['tflops']:.3g} TFLOP/s, MFU {mfu}, peak {r['peak_gib']} GiB"
    row["layouts"] = result["layouts"]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on CPU: checks the script (CI)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON results")
    parser.add_argument("--zero3-load-child", nargs=2, metavar=("CKPT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.zero3_load_child:
        zero3_load_child(*args.zero3_load_child)
        return 0
    cpu = args.cpu_smoke
    if not cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --cpu-smoke to check the script on CPU")
    device = torch.device("cpu" if cpu else "cuda")
    name = "CPU (smoke)" if cpu else torch.cuda.get_device_name(device)
    fa = flash_attn_import_error()
    print(f"device {name}; torch {torch.__version__}; flash-attn {'imports' if fa is None else 'unavailable: ' + fa}")
    check = Check()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = make_tiny("internvl2-2b", tmp / "tiny")
        data = make_synthetic_dataset(tmp / "data", num_samples=24, seed=1)
        for backend in attention_backends(cpu):
            check.run(f"packed attention [{backend}]", lambda b=backend: packed_attention(ckpt, data, b, device))
        pack = ["dataloader.pack=True", "dataloader.pack_length=2048", "train_dataset.max_length=2048"]
        runs = [
            ("lora zero2 packed", "tiny_internvl2_lora.py", "zero2", pack),
            ("full zero3 packed", "tiny_internvl2_full.py", "zero3", pack),
            ("qlora (no deepspeed)", "tiny_internvl2_qlora.py", None, []),
        ]
        if not cpu:
            runs[1:1] = [
                ("lora zero3 packed", "tiny_internvl2_lora.py", "zero3", pack),
                ("full zero2", "tiny_internvl2_full.py", "zero2", []),
            ]
        for label, config, ds, extra in runs:
            work = tmp / label.replace(" ", "_").replace("(", "").replace(")", "")
            check.run(f"train {label}", lambda c=config, d=ds, e=extra, w=work: train_run(ckpt, data, w, c, d, e, cpu))
        check.run("zero3 load", lambda: zero3_load(tmp, ckpt if cpu else None, cpu))
        check.run("throughput 2B LoRA" + (" (tiny)" if cpu else ""), lambda: throughput(tmp / "throughput.json", cpu))
    failed = [r["check"] for r in check.rows if not r["ok"]]
    args.out.write_text(
        json.dumps(
            {"device": name, "torch": torch.__version__, "flash_attn": fa or "imports", "checks": check.rows},
            indent=2,
            default=str,
        )
    )
    print(f"{len(check.rows) - len(failed)} passed, {len(failed)} failed; results in {args.out}")
    for r in check.rows:
        if not r["ok"]:
            print(f"--- {r['check']}\n{r['trace']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
