"""Peak host memory per rank of a two-rank ZeRO-3 load: partitioned while reading vs the whole model first.

The input is generated into a temporary directory under /tmp (deleted at the end): an official-format
InternVL2-2B-shaped directory (``make_tiny("internvl2-2b")``'s config.json, tokenizer and files) whose LLM is
widened: InternLM2 with hidden 2048, 24 layers, FFN 16384, 16 heads / 8 KV heads, vocabulary 92553 (~3.1B
parameters, ~6.2 GB in bf16; the ViT stays tiny). It is written tensor by tensor in 1 GB shards, the format
``save_official`` writes (sharded safetensors + index), from slices of one random pool.

Both runs are the training code path on two ranks (gloo, CPU, one process per rank started by this script),
for the official LoRA method (LoRA r16 on the LLM, ViT frozen, mlp1 trained) in bf16, with the zero3 preset:

- **old**: ``settings.build(cpu)``: every rank loads the whole model (``load_internvl``), then
  ``DeepSpeedBackend`` (``deepspeed.initialize``) partitions it, as training did before partitioned loading;
- **new**: ``settings.build(cpu, ds_config)``: each parameter is partitioned as rank 0 reads
  it (``xtuner_vl/engine/zero3_load.py``), then the same ``DeepSpeedBackend``.

Each rank reports from its own ``/proc/self/status``: ``VmRSS`` once imports and the process group are up
(before loading), and ``VmHWM`` (the kernel's exact high-water mark of its resident set) after the load and
after ``deepspeed.initialize``. Both runs gather two weights at the end and compare their sums (both did the
same work). Run: ``python benchmarks/bench_load.py`` (``--help`` for the knobs; needs the checkpoint size on
/tmp and, for the old path, about 2 x (checkpoint + 1.5 GB) of free RAM).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
PROBES = ("language_model.output.weight", "language_model.model.tok_embeddings.weight", "mlp1.1.weight")


def status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


# ------------------------------------------------------------------------------------------ the input
def write_checkpoint(out: Path, llm: dict, shard_size: str, seed: int) -> int:
    """The tiny release's files with a widened LLM config, weights written tensor by tensor; returns bytes."""
    from xtuner_vl.tiny.checkpoints import make_tiny
    from xtuner_vl.tiny.widened import write_widened_checkpoint

    return write_widened_checkpoint(make_tiny("internvl2-2b", out.parent / "tiny"), out, llm, shard_size, seed)


# ------------------------------------------------------------------------------------------- one rank
def rank_main(path: str, mode: str, out: str) -> None:
    """One rank of a run (RANK, WORLD_SIZE... in the environment): load, initialize DeepSpeed, report."""
    from xtuner_vl.engine.deepspeed_backend import DeepSpeedBackend, import_deepspeed
    from xtuner_vl.engine.deepspeed_config import complete_deepspeed_config, load_deepspeed_config
    from xtuner_vl.engine.dist import barrier, init_distributed
    from xtuner_vl.engine.param_groups import param_groups
    from xtuner_vl.engine.seed import seed_everything
    from xtuner_vl.model import read_config
    from xtuner_vl.recipes.model_wrapper import InternVLChat

    d = init_distributed("cpu")
    deepspeed = import_deepspeed(d.device)
    deepspeed.init_distributed(dist_backend="gloo")
    s = InternVLChat(
        path=path, dtype="bf16", gradient_checkpointing=True, freeze=dict(vit=True), lora=dict(llm_rank=16)
    )
    hidden = read_config(path).llm_config["hidden_size"]
    ds = complete_deepspeed_config(load_deepspeed_config("zero3"), 1, 1, d.world_size, 1.0, True, hidden)
    seed_everything(0)
    barrier()
    report = {"rank": d.rank, "imports": status_bytes("VmRSS")}
    t0 = time.perf_counter()
    model = s.build(d.device, ds if mode == "new" else None)
    barrier()
    report.update(load_s=time.perf_counter() - t0, load_peak=status_bytes("VmHWM"))
    optimizer = torch.optim.AdamW(param_groups(model, 1e-5, 0.0))
    backend = DeepSpeedBackend(model, optimizer, ds, d)
    barrier()
    report.update(init_s=time.perf_counter() - t0, peak=status_bytes("VmHWM"), steady=status_bytes("VmRSS"))
    params = dict(backend.module.named_parameters())
    for key in PROBES:
        name = key if key in params else key.replace("language_model.", "language_model.base_model.model.", 1)  # peft
        p = params[name]
        with deepspeed.zero.GatheredParameters([p]):
            report[key] = float(p.data.float().sum())
    Path(out).write_text(json.dumps(report))
    barrier()
    sys.stdout.flush()
    os._exit(0)  # gloo's ZeRO-3 teardown may abort the interpreter after the work (recipes/train.py)


def run_ranks(path: Path, mode: str, tmp: Path, world: int = 2) -> list[dict]:
    """Start the ``world`` rank processes of one run and collect their reports."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs, outs = [], []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        out = tmp / f"{mode}-rank{rank}.json"
        log = open(tmp / f"{mode}-rank{rank}.log", "w")  # noqa: SIM115 - closed below, after the run
        cmd = [sys.executable, __file__, "--rank", str(path), mode, str(out)]
        procs.append((subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), log))
        outs.append(out)
    for proc, log in procs:
        code = proc.wait()
        log.close()
        if code != 0:
            raise SystemExit(f"{mode} run failed ({code}):\n{Path(log.name).read_text()[-4000:]}")
    return [json.loads(o.read_text()) for o in outs]


# ------------------------------------------------------------------------------------------- reporting
def print_report(runs: dict[str, list[dict]], size: int, largest: int) -> None:
    header = (
        f"{'run':<5} {'rank':>4} {'load s':>6} {'imports GB':>10} {'load peak GB':>12} {'peak GB':>8} "
        f"{'steady GB':>9} {'/ ckpt':>6} {'> imports':>9} {'/ ckpt':>6}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for mode, reports in runs.items():
        for r in reports:
            above = r["peak"] - r["imports"]
            print(
                f"{mode:<5} {r['rank']:>4} {r['load_s']:>6.1f} {r['imports'] / GB:>10.2f} {r['load_peak'] / GB:>12.2f} "
                f"{r['peak'] / GB:>8.2f} {r['steady'] / GB:>9.2f} {r['peak'] / size:>6.2f} {above / GB:>9.2f} "
                f"{above / size:>6.2f}"
            )
    print("-" * len(header))
    print(
        "imports: VmRSS with imports and the process group up, before loading; load peak / peak: VmHWM after the "
        "load / after deepspeed.initialize; steady: VmRSS then; / ckpt: peak over the checkpoint size; > imports: "
        f"peak minus imports. Checkpoint {size / GB:.2f} GB, largest tensor {largest / GB:.2f} GB."
    )
    old, new = (max(r["peak"] for r in runs[m]) for m in ("old", "new"))
    old_above, new_above = (max(r["peak"] - r["imports"] for r in runs[m]) for m in ("old", "new"))
    print(
        f"RATIO zero3_load_peak_rss new/old = {new / old:.2f} (largest rank: new {new / GB:.2f} GB = "
        f"{new / size:.2f} x checkpoint, old {old / GB:.2f} GB = {old / size:.2f} x; above imports: new "
        f"{new_above / size:.2f} x checkpoint, old {old_above / size:.2f} x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048, help="LLM hidden size")
    parser.add_argument("--layers", type=int, default=24, help="LLM layers")
    parser.add_argument("--intermediate", type=int, default=16384, help="LLM FFN size")
    parser.add_argument("--vocab", type=int, default=92553, help="LLM vocabulary (InternVL2-2B: 92553)")
    parser.add_argument("--shard-size", default="1GB", help="largest shard of the generated checkpoint")
    parser.add_argument("--tmp", default="/tmp", help="where the temporary directory goes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated weights")
    parser.add_argument("--rank", nargs=3, metavar=("PATH", "MODE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:  # one rank of a run, started by this script
        rank_main(*args.rank)
        return
    llm = {
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "intermediate_size": args.intermediate,
        "vocab_size": args.vocab,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
    }
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="bench_load-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        size = write_checkpoint(tmp / "model", llm, args.shard_size, args.seed)
        largest = 2 * max(args.vocab * args.hidden, args.intermediate * args.hidden)
        print(f"generated (not measured): {size / GB:.2f} GB checkpoint in {time.perf_counter() - t0:.1f} s")
        runs = {mode: run_ranks(tmp / "model", mode, tmp) for mode in ("old", "new")}
        for key in PROBES:
            sums = {r[key] for reports in runs.values() for r in reports}
            if len(sums) != 1:
                raise SystemExit(f"{key}: the runs loaded different weights ({sums})")
        print(f"same weights in both runs and on every rank (gathered sums of {', '.join(PROBES)})")
        print_report(runs, size, largest)


if __name__ == "__main__":
    main()
