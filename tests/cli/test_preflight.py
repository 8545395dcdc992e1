"""The launcher's preflight: a bad setup is one line per problem and exit 2, before torchrun starts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from xtuner_vl.recipes import preflight as preflight_module
from xtuner_vl.recipes.config import find_config
from xtuner_vl.recipes.preflight import preflight
from xtuner_vl.tiny.data import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]
CONFIG = "tiny_internvl2_lora"
_RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    return make_synthetic_dataset(tmp_path_factory.mktemp("preflight-data"), num_samples=4, seed=1)


def _options(model: Path, data: tuple[Path, Path], **extra) -> dict:
    return {
        "model.path": str(model),
        "train_dataset.data_paths": [str(data[0])],
        "train_dataset.image_folders": [str(data[1])],
        **extra,
    }


def test_missing_model_dir_stops_the_launcher_in_one_line(tmp_path, data):
    missing = tmp_path / "no-such-model"
    env = {k: v for k, v in os.environ.items() if k not in _RANK_ENV}
    env.update(NPROC_PER_NODE="2", OMP_NUM_THREADS="1")
    args = [str(find_config(CONFIG)), "--work-dir", str(tmp_path / "run"), "--cfg-options"]
    args += [f"model.path={missing}", f"train_dataset.data_paths=['{data[0]}']"]
    args += [f"train_dataset.image_folders=['{data[1]}']"]
    proc = subprocess.run(
        [sys.executable, "-m", "xtuner_vl.cli.main", "train", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    errors = [line for line in out.splitlines() if line.startswith("xtuner-vl train: error: ")]
    assert len(errors) == 1 and str(missing) in errors[0], out
    assert "Traceback" not in out and "ChildFailedError" not in out and "launching:" not in out, out


def test_a_good_setup_passes(tiny_ckpt, data, tmp_path):
    work = tmp_path / "new" / "run"
    assert preflight(CONFIG, str(work), _options(tiny_ckpt("internvl2-2b"), data)) == []
    assert work.is_dir()


def test_unknown_config_name(tmp_path):
    (problem,) = preflight("tiny_internvl2_lorra", str(tmp_path), None)
    assert "tiny_internvl2_lorra" in problem and "tiny_internvl2_lora" in problem


def test_missing_data_file_and_image_folder(tiny_ckpt, data, tmp_path):
    options = _options(tiny_ckpt("internvl2-2b"), data)
    options["train_dataset.data_paths"] = [str(data[0]), str(tmp_path / "gone.jsonl")]
    options["train_dataset.image_folders"] = [None, str(tmp_path / "gone-images")]
    options["train_dataset.repeat_times"] = [1.0, 1.0]
    problems = preflight(CONFIG, str(tmp_path / "run"), options)
    assert len(problems) == 2
    assert "gone.jsonl" in problems[0] and "gone-images" in problems[1]


def test_model_dir_without_tokenizer(tiny_ckpt, data, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_ckpt("internvl2-2b"), model)
    (model / "tokenizer.model").unlink()
    (problem,) = preflight(CONFIG, str(tmp_path / "run"), _options(model, data))
    assert str(model) in problem and "tokenizer" in problem


def test_unwritable_work_dir(tiny_ckpt, data, tmp_path):
    # A path under a regular file cannot be created, even by root (who ignores permission bits).
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    (problem,) = preflight(CONFIG, str(blocker / "run"), _options(tiny_ckpt("internvl2-2b"), data))
    assert str(blocker / "run") in problem and "cannot be created" in problem


def test_too_little_free_space(tiny_ckpt, data, tmp_path, monkeypatch):
    model = tiny_ckpt("internvl2-2b")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight_module.shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
    # Full fine-tuning: at least the weight files.
    (problem,) = preflight(CONFIG, str(tmp_path / "run"), _options(model, data, **{"model.lora": None}))
    weights = (model / "model.safetensors").stat().st_size
    assert "1000 B free" in problem and f"{weights / 1024:.1f} KiB" in problem and "weight files" in problem
    # LoRA: a small fixed amount, still more than 1000 bytes.
    (problem,) = preflight(CONFIG, str(tmp_path / "run"), _options(model, data))
    assert "LoRA" in problem


def test_preflight_reads_the_config_without_importing_torch():
    """The launcher checks before torchrun starts: the model section is built through the registry (MMEngine's
    registry imports torch for its logger) without the model stack: no transformers, peft or DeepSpeed."""
    code = (
        "import sys; from xtuner_vl.recipes.preflight import preflight; from xtuner_vl.recipes.model_wrapper import "
        "build_model_wrapper; build_model_wrapper({'path': 'x', 'lora': {'llm_rank': 8}}); "
        "print(sorted(m for m in ('peft', 'transformers', 'deepspeed', 'bitsandbytes') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
