"""What verified checkpoints cost: a checkpoint save (``torch.save`` of a state dict, fsync'd) with and without
the SHA-256 manifest the trainer writes (each rank hashes its share of the files right after writing them,
while they are in the page cache).

Run: ``python benchmarks/bench_checkpoint_hash.py [--gib 2] [--files 4]``. Prints the hash throughput and
``RATIO save_with_manifest/save``. Per rank the cost is its share of the checkpoint's bytes over the hash
throughput (ranks hash in parallel).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from xtuner_vl.engine.checkpoint_dir import checkpoint_files, hash_files


def save(directory: Path, files: int, numel: int) -> float:
    t0 = time.perf_counter()
    for i in range(files):
        path = directory / f"part-{i}.pt"
        torch.save({"w": torch.randn(numel)}, path)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=2.0, help="checkpoint size")
    parser.add_argument("--files", type=int, default=4, help="files it is split into")
    args = parser.parse_args()
    numel = int(args.gib * 2**30 / 4 / args.files)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        directory = Path(tmp)
        written = save(directory, args.files, numel)
        t0 = time.perf_counter()
        manifest = hash_files(directory, checkpoint_files(directory))
        hashed = time.perf_counter() - t0
        size = sum(v[0] for v in manifest.values())
    print(
        f"checkpoint {size / 2**30:.2f} GiB in {args.files} files: save {written:.2f} s, manifest {hashed:.2f} s "
        f"({size / 2**30 / hashed:.2f} GiB/s SHA-256 on one core)"
    )
    print(f"RATIO save_with_manifest/save = {(written + hashed) / written:.3f}x (one rank, all files)")


if __name__ == "__main__":
    main()
