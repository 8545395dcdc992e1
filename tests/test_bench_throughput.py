"""benchmarks/bench_throughput.py runs end to end (tiny model, CPU): a check of the script, no timing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_throughput_tiny_runs():
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_throughput.py", "--tiny", "--steps", "2", "--warmup", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(r"^(unpacked|packed)\s+(\d+)\s+\d+\s+([\d.]+)\s+[\d.]+\s+"
                                                            r"[\d.]+\s+([\d.e+-]+)", proc.stdout, re.M)}
    assert set(rows) == {"unpacked", "packed"}, proc.stdout
    assert float(rows["packed"][1]) == 1.0 > float(rows["unpacked"][1])  # packed rows carry no padding
    assert all(float(r[0]) > 0 and float(r[2]) > 0 for r in rows.values())  # tokens/s, TFLOP/s
    assert "RATIO train_tokens_per_s packed/unpacked" in proc.stdout
