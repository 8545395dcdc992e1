"""benchmarks/gpu_check.py --cpu-smoke: the GPU check script runs end to end on CPU (CI has no GPU).

The smoke run covers what the GPU run does with tiny models: packed attention against unpacked, one-process
``xtuner-vl train`` with DeepSpeed ZeRO-2 / ZeRO-3 and QLoRA, and bench_throughput's padded and packed step.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    rows = {r["check"]: r for r in result["checks"]}
    assert all(r["ok"] for r in rows.values()) and len(rows) == 6, rows.keys()
    assert rows["zero3 load"]["load_peak_gib"] > 0
    assert float(rows["packed attention [sdpa]"]["rel_diff"]) < 1e-5
    trained = [r for name, r in rows.items() if name.startswith("train ")]
    assert {"train lora zero2 packed", "train full zero3 packed", "train qlora (no deepspeed)"} <= rows.keys()
    assert all(len(r["losses"]) == 3 for r in trained)
    layouts = rows["throughput 2B LoRA (tiny)"]["layouts"]
    assert layouts["packed"]["real_fraction"] == 1.0 > layouts["unpacked"]["real_fraction"]  # no padding when packed
    assert all(r["tokens_per_s"] > 0 and r["tflops"] > 0 for r in layouts.values())
