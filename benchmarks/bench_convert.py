"""Peak memory of ``xtuner-vl convert`` (LoRA run -> merged official format) vs a naive whole-model merge.

The inputs are generated into a temporary directory under /tmp (deleted at the end):

- **Base release**: an official-format InternVL2-2B-shaped directory (``make_tiny("internvl2-2b")``'s
  config.json, tokenizer and files) whose LLM is full size: InternLM2 with hidden 2048, 24 layers, FFN
  5632, 16 heads / 8 KV heads, vocabulary 92553 (~1.5B parameters, ~3 GB in bf16; the ViT stays tiny).
  Written tensor by tensor through ``ShardWriter`` into ``--shard-size`` shards, so the generator holds
  one tensor at a time; the values are slices of one random pool (their values do not matter here).
- **LoRA training checkpoint** for it, laid out exactly as the trainer writes it: a real one-step
  ``xtuner-vl train`` of ``xtuner_vl/configs/tiny/tiny_internvl2_lora.py`` on the tiny model gives the work dir
  (dumped config, ``checkpoints/step-*/`` with ``meta.json``, ``COMPLETE``, ``torch_backend.pt``,
  ``trainer_state_rank0.pt``); then its config is re-dumped with the big base and ``--lora-rank``, and
  ``torch_backend.pt`` is rewritten by the trainer's own ``TorchBackend.save`` from the run's trainable
  model (built by ``expected_trainable_model``: freezing + peft LoRA on the meta device, trainable
  weights then given fp32 values) and an AdamW over ``param_groups`` that took one step.
  ``meta.json`` keeps every field but ``model_path``, which names the big base.

**Ours**: ``xtuner-vl convert CONFIG WORK_DIR OUT --max-shard-size S`` (streams the base tensor by tensor,
merges each LoRA pair in fp32, writes shards). **Naive baseline**, in a subprocess of this script:
``load_internvl`` (bf16, the whole model in memory) -> ``apply_lora`` with the run's settings -> load the
checkpoint's trainable weights -> peft ``merge_and_unload`` (``merge_lora``) -> ``save_official`` with the
same ``--max-shard-size``. Both outputs must have the base's keys and shapes, and the merged weights of
both must agree (a check that both did the same work).

Memory: each run is a child process whose ``/proc/<pid>/status`` is polled every 10 ms: ``VmHWM``, the
kernel's high-water mark of the child's resident set (exact and monotonic, so polling only misses growth
in the last 10 ms before exit), and the peaks of ``RssAnon`` (anonymous memory: the real demand) and
``RssFile`` (file pages mapped in: shared libraries and safetensors shards, reclaimable page cache); these
two are sampled, so a spike shorter than 10 ms can be missed. ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` (or
``os.wait4``'s) is not used: at ``exec`` Linux folds the high-water mark of the memory the child ran in
before (the parent's: Python spawns with ``vfork``) into the child's, so every child of this multi-GB
process would report at least the parent's peak (a ``/bin/true`` child of a 1.5 GB parent reports 1.4 GB).

Run: ``python benchmarks/bench_convert.py`` (``--help`` for the knobs; needs ~3 x the checkpoint size on
/tmp and about 2 x it in free RAM for the baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors import safe_open

from xtuner_vl.adapters import apply_lora
from xtuner_vl.adapters.lora import merge_lora
from xtuner_vl.checkpoint import materialize, read_trained_checkpoint
from xtuner_vl.engine.deepspeed_config import CONFIG_ROOT
from xtuner_vl.engine.dist import DistInfo
from xtuner_vl.engine.param_groups import param_groups
from xtuner_vl.engine.torch_backend import TorchBackend
from xtuner_vl.model import load_internvl, save_official
from xtuner_vl.model.weights import weight_files
from xtuner_vl.recipes.config import load_config
from xtuner_vl.recipes.convert import expected_trainable_model
from xtuner_vl.recipes.model_wrapper import build_model_wrapper
from xtuner_vl.recipes.settings import OptimSettings, parse_section
from xtuner_vl.tiny.checkpoints import make_tiny
from xtuner_vl.tiny.data import make_synthetic_dataset
from xtuner_vl.tiny.widened import write_widened_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = CONFIG_ROOT / "tiny" / "tiny_internvl2_lora.py"
GB = 1e9


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "xtuner_vl.cli.main", *args]


# ------------------------------------------------------------------------------------------ the inputs
def write_base(tiny: Path, out: Path, llm: dict, shard_size: str, seed: int) -> None:
    """The tiny release's files with a full-size LLM config, weights written shard by shard."""
    write_widened_checkpoint(tiny, out, llm, shard_size, seed)


def tiny_lora_run(tiny: Path, tmp: Path) -> Path:
    """A one-step ``xtuner-vl train`` LoRA run of the tiny model; returns its work dir."""
    data, images = make_synthetic_dataset(tmp / "tiny-data", num_samples=8, seed=0)
    work = tmp / "tiny-run"
    options = [
        f"model.path={tiny}",
        f"train_dataset.data_paths=['{data}']",
        f"train_dataset.image_folders=['{images}']",
        "schedule.max_steps=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XTUNER_VL_CACHE": str(tmp / "cache")}
    proc = subprocess.run(
        cli("train", str(TINY_CONFIG), "--work-dir", str(work), "--cfg-options", *options),
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"tiny training run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return work


def _fill_trainable(model: torch.nn.Module, seed: int) -> None:
    """Real fp32 values for the trainable (meta) parameters: LoRA A ~ kaiming-like, B and the rest small."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in list(model.named_parameters()):
        if not p.requires_grad:
            continue
        scale = p.shape[-1] ** -0.5 if "lora_A" in name else 0.01
        value = torch.nn.Parameter(torch.randn(p.shape, generator=gen) * scale)
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, value)


def transplant(tiny_work: Path, base: Path, out: Path, lora_rank: int, seed: int) -> Path:
    """The tiny run's work dir, re-pointed at ``base``, with the big run's trainable weights and optimizer."""
    shutil.copytree(tiny_work, out)
    (dumped,) = out.glob("*.py")
    cfg = load_config(str(dumped), {"model.path": str(base), "model.lora.llm_rank": lora_rank})
    cfg.dump(str(dumped))
    (step,) = (out / "checkpoints").glob("step-*")
    meta = json.loads((step / "meta.json").read_text())
    meta["model_path"] = str(base)
    (step / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")  # as CheckpointDir.commit
    model = expected_trainable_model(build_model_wrapper(cfg.get("model")))
    _fill_trainable(model, seed)
    optim = parse_section(OptimSettings, cfg.get("optim"), "optim")
    optimizer = torch.optim.AdamW(param_groups(model, optim.lr, optim.weight_decay, optim.lr_mult), lr=optim.lr)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 1e-3)
    optimizer.step()  # AdamW state (step, exp_avg, exp_avg_sq) as after a real step
    dist_info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    TorchBackend(model, optimizer, dist_info, optim.max_grad_norm, bf16=False).save(step)
    return out


def check_layout(tiny_work: Path, big_work: Path) -> None:
    """The transplanted checkpoint has the tiny run's files, checkpoint keys and optimizer structure."""
    (a,), (b,) = (sorted((w / "checkpoints").glob("step-*")) for w in (tiny_work, big_work))
    files = [sorted(p.name for p in d.iterdir()) for d in (a, b)]
    states = [torch.load(d / "torch_backend.pt", map_location="cpu", weights_only=True, mmap=True) for d in (a, b)]
    metas = [json.loads((d / "meta.json").read_text()) for d in (a, b)]
    if files[0] != files[1] or states[0].keys() != states[1].keys() or metas[0].keys() != metas[1].keys():
        raise SystemExit(f"transplanted checkpoint differs from the trainer's layout: {files}")
    groups = [len(s["optimizer"]["param_groups"]) for s in states]
    names = [sorted(k.split("layers.")[0] for k in s["model"]) for s in states]
    if groups[0] != groups[1] or set(names[0]) != set(names[1]):
        raise SystemExit(f"trainable weights or optimizer groups differ: {groups}")


# -------------------------------------------------------------------------------------------- baseline
def naive_merge(config: str, ckpt: str, out: str, max_shard_size: str) -> None:
    """The whole-model way: load, wrap with LoRA, load the trained weights, merge_and_unload, save."""
    s = build_model_wrapper(load_config(config).get("model"))
    model = load_internvl(s.path, dtype=torch.bfloat16)
    apply_lora(model, s.lora.llm_rank, s.lora.vit_rank, s.lora.alpha, s.lora.dropout, s.lora.llm_targets)
    trained = {k: materialize(v) for k, v in read_trained_checkpoint(ckpt).state.items()}
    result = model.load_state_dict(trained, strict=False)
    if result.unexpected_keys:
        raise SystemExit(f"naive merge: unexpected keys {result.unexpected_keys[:3]}")
    merge_lora(model)
    save_official(model, out, source_dir=s.path, dtype=torch.bfloat16, max_shard_size=max_shard_size)


# ------------------------------------------------------------------------------------------- measuring
def _poll(pid: int, peaks: dict[str, int], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return
        for line in text.splitlines():
            key = line.split(":", 1)[0]
            if key in peaks:
                peaks[key] = max(peaks[key], int(line.split()[1]) * 1024)
        stop.wait(0.01)


def measure(cmd: list[str], log: Path) -> dict[str, float]:
    """Run ``cmd``; wall seconds, peak RSS (``VmHWM``) and peaks of anonymous and file-backed RSS, in GB."""
    peaks = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    with open(log, "w") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        stop = threading.Event()
        poller = threading.Thread(target=_poll, args=(proc.pid, peaks, stop), daemon=True)
        poller.start()
        code = proc.wait()
        wall = time.perf_counter() - t0
        stop.set()
        poller.join()
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({code}):\n{log.read_text()[-3000:]}")
    return {"s": wall, "rss": peaks["VmHWM"] / GB, "anon": peaks["RssAnon"] / GB, "file": peaks["RssFile"] / GB}


def read_key(model_dir: Path, key: str) -> torch.Tensor:
    for file in weight_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            if key in f.keys():
                return f.get_tensor(key)
    raise KeyError(f"{key} not in {model_dir}")


def check_outputs(base: Path, ours: Path, naive: Path) -> float:
    """Same keys and shapes as the base; merged weights of ours and naive agree. Returns max |diff|."""
    shapes = {}
    for d in (base, ours, naive):
        with_shapes = {}
        for file in weight_files(d):
            with safe_open(str(file), framework="pt") as f:
                with_shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        shapes[d] = with_shapes
    if not shapes[base] == shapes[ours] == shapes[naive]:
        raise SystemExit("outputs do not have the base's keys and shapes")
    diff = 0.0
    keys = [k for k in shapes[base] if k.endswith("attention.wqkv.weight")][:1]
    keys += [k for k in shapes[base] if k.endswith("feed_forward.w2.weight")][-1:] + ["mlp1.1.weight"]
    for key in keys:
        if key not in shapes[base]:
            continue
        a, b, w = read_key(ours, key).float(), read_key(naive, key).float(), read_key(base, key).float()
        if torch.equal(a, w):
            raise SystemExit(f"{key}: convert left the base weight unchanged")
        diff = max(diff, float((a - b).abs().max()))
        if not torch.allclose(a, b, rtol=1e-2, atol=1e-3):
            raise SystemExit(f"{key}: ours and naive merged weights differ by {float((a - b).abs().max())}")
    return diff


def shard_sizes(model_dir: Path) -> list[int]:
    return [f.stat().st_size for f in weight_files(model_dir)]


def print_report(runs: dict[str, dict[str, float]], base: Path, ckpt_pt: Path, adapters: float, diff: float) -> None:
    sizes = shard_sizes(base)
    total, largest = sum(sizes) / GB, max(sizes) / GB
    floor = runs["imports only"]["rss"]
    print(
        f"\nbase checkpoint {total:.2f} GB in {len(sizes)} shards (largest {largest:.2f} GB); training checkpoint "
        f"torch_backend.pt {ckpt_pt.stat().st_size / GB:.3f} GB (trainable weights {adapters:.3f} GB fp32)"
    )
    print(f"merged weights, ours vs naive: max |difference| {diff:.2e} (bf16)")
    header = (
        f"{'run':<18} {'wall s':>6} {'peak RSS GB':>11} {'anon GB':>7} {'file GB':>7} {'> imports':>9} "
        f"{'/ ckpt':>6} {'/ shard':>7}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for name, r in runs.items():
        print(
            f"{name:<18} {r['s']:>6.1f} {r['rss']:>11.2f} {r['anon']:>7.2f} {r['file']:>7.2f} "
            f"{r['rss'] - floor:>9.2f} {r['rss'] / total:>6.2f} {r['rss'] / largest:>7.2f}"
        )
    print("-" * len(header))
    print(
        "peak RSS: VmHWM; anon / file: peaks of RssAnon / RssFile (/proc/<pid>/status every 10 ms); "
        "> imports: peak RSS above the imports-only run"
    )
    ours, naive = runs["xtuner-vl convert"], runs["naive merge"]
    print(
        f"RATIO convert_peak_rss naive/ours = {naive['rss'] / ours['rss']:.2f}x (ours {ours['rss']:.2f} GB = "
        f"{ours['rss'] / largest:.2f} x largest shard, {ours['rss'] / total:.2f} x checkpoint, naive "
        f"{naive['rss']:.2f} GB; above the {floor:.2f} GB of imports: ours {ours['rss'] - floor:.2f} GB, naive "
        f"{naive['rss'] - floor:.2f} GB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048, help="LLM hidden size")
    parser.add_argument("--layers", type=int, default=24, help="LLM layers")
    parser.add_argument("--intermediate", type=int, default=5632, help="LLM FFN size")
    parser.add_argument("--vocab", type=int, default=92553, help="LLM vocabulary (InternVL2-2B: 92553)")
    parser.add_argument("--shard-size", default="1GB", help="largest shard of the generated base checkpoint")
    parser.add_argument("--max-shard-size", default="5GB", help="convert --max-shard-size (its default: 5GB)")
    parser.add_argument("--lora-rank", type=int, default=16, help="model.lora.llm_rank of the run (official LoRA: 16)")
    parser.add_argument("--tmp", default="/tmp", help="where the temporary directory goes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated weights")
    parser.add_argument("--naive", nargs=4, metavar=("CONFIG", "CKPT", "OUT", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive:  # the baseline, run by this script in a child process
        naive_merge(*args.naive)
        return
    llm = {
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "intermediate_size": args.intermediate,
        "vocab_size": args.vocab,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
    }
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="bench_convert-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        tiny = make_tiny("internvl2-2b", tmp / "tiny")
        tiny_work = tiny_lora_run(tiny, tmp)
        t1 = time.perf_counter()
        base = tmp / "base"
        write_base(tiny, base, llm, args.shard_size, args.seed)
        t2 = time.perf_counter()
        work = transplant(tiny_work, base, tmp / "run", args.lora_rank, args.seed)
        check_layout(tiny_work, work)
        print(
            f"generated (not measured): tiny LoRA run {t1 - t0:.1f} s, base {t2 - t1:.1f} s, "
            f"LoRA checkpoint {time.perf_counter() - t2:.1f} s; layout checked against the tiny run's"
        )
        (config,) = work.glob("*.py")
        (step,) = (work / "checkpoints").glob("step-*")
        state = read_trained_checkpoint(work).state
        adapters = sum(v.numel() * v.element_size() for v in state.values()) / GB
        runs = {
            "imports only": measure(
                [sys.executable, "-c", "import xtuner_vl.cli.main, xtuner_vl.recipes.convert"], tmp / "imports.log"
            ),
            "xtuner-vl convert": measure(
                cli("convert", str(config), str(work), str(tmp / "ours"), "--max-shard-size", args.max_shard_size),
                tmp / "ours.log",
            ),
            "naive merge": measure(
                [sys.executable, __file__, "--naive", str(config), str(work), str(tmp / "naive"), args.max_shard_size],
                tmp / "naive.log",
            ),
        }
        diff = check_outputs(base, tmp / "ours", tmp / "naive")
        print(
            f"output (--max-shard-size {args.max_shard_size}): ours {len(shard_sizes(tmp / 'ours'))} shard(s), "
            f"naive {len(shard_sizes(tmp / 'naive'))}"
        )
        print_report(runs, base, step / "torch_backend.pt", adapters, diff)


if __name__ == "__main__":
    main()
