"""The README's first command: `xtuner-vl demo` runs end to end and the loss falls."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "xtuner_vl.cli.main", "demo", "--work-dir", str(tmp_path),
                           "--steps", "12"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "check-data: 96 records checked, 0 problems" in proc.stdout
    assert (tmp_path / "train" / "loss_curve.png").is_file()
    assert (tmp_path / "train" / "checkpoints" / "step-00000012" / "COMPLETE").is_file()
    assert "[4/4] merged official-format model" in proc.stdout and "chat: What colour" in proc.stdout
    assert (tmp_path / "official" / "config.json").is_file() and (tmp_path / "official" / "model.safetensors").is_file()
