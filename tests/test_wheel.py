"""A released wheel works: built from this tree, installed into a fresh venv (no dependencies reinstalled: the
venv sees this environment's packages), its commands find the shipped configs and DeepSpeed presets from another
directory, as from a source checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from xtuner_vl.recipes.config import list_configs

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_install_runs_list_copy_and_estimate_from_another_directory(tmp_path):
    dist, venv, elsewhere = tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(REPO)],
        cwd=tmp_path,
    )
    wheel = next(dist.glob("xtuner_vl-*.whl"))
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path
        ).stdout.strip()
    )
    # The new venv sees this environment's packages (torch, transformers, ...) after its own, by a plain path
    # entry: this environment's editable xtuner-vl hook is not run there, so only the wheel provides xtuner_vl.
    (site / "parent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)], cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    where = _run([str(python), "-c", "import xtuner_vl; print(xtuner_vl.__file__)"], elsewhere, env).stdout
    assert where.startswith(str(site)), where  # the wheel's copy, not the source tree
    cli = [str(venv / "bin" / "xtuner-vl")]
    names = _run([*cli, "list-cfg"], elsewhere, env).stdout.split()
    assert names == list_configs() and "tiny_internvl2_lora" in names  # every config of the source tree
    copied = _run([*cli, "copy-cfg", "internvl_v2_internlm2_2b_lora", "mine"], elsewhere, env)
    assert (elsewhere / "mine" / "internvl_v2_internlm2_2b_lora.py").is_file(), copied.stdout
    assert "_base_" not in (elsewhere / "mine" / "internvl_v2_internlm2_2b_lora.py").read_text()  # self-contained
    # The copy estimates (one command: each start costs seconds of imports), with the DeepSpeed preset named by its
    # xtuner alias and found in the wheel.
    mine = str(elsewhere / "mine" / "internvl_v2_internlm2_2b_lora.py")
    report = _run([*cli, "estimate", mine, "--deepspeed", "deepspeed_zero2"], elsewhere, env)
    assert "* ZeRO-2" in report.stdout and "GiB" in report.stdout  # the preset alias resolved and marked
