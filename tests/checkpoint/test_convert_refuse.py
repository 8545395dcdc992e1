"""A checkpoint that does not belong to the config or the base is refused, naming both; nothing is written."""

from __future__ import annotations

import pytest

from tests.checkpoint.conftest import CONFIGS, dumped_config
from tests.engine.conftest import run_cli
from xtuner_vl.checkpoint import CheckpointError
from xtuner_vl.recipes.convert import convert


def test_other_base_is_refused_naming_both(trained_run, train_assets, tiny_ckpt, tmp_path):
    work = trained_run("lora")
    other = tiny_ckpt("internvl2-1b")
    out = tmp_path / "out"
    proc = run_cli(
        ["convert", str(dumped_config(work)), str(work), str(out), "--cfg-options", f"model.path={other}"], check=False
    )
    assert proc.returncode != 0
    assert "xtuner-vl convert: error: checkpoint" in proc.stderr and "meta.json" in proc.stderr
    assert str(other) in proc.stderr and str(train_assets["model"]) in proc.stderr
    assert not out.exists()


def test_trust_base_still_checks_names_and_shapes(trained_run, tiny_ckpt, tmp_path):
    work = trained_run("lora")
    other = tiny_ckpt("internvl2-1b")  # Qwen2 LLM: other trainable names
    with pytest.raises(CheckpointError, match=f"does not match config .* on base {other}"):
        convert(
            str(dumped_config(work)),
            str(work),
            str(tmp_path / "o"),
            cfg_options={"model.path": str(other)},
            trust_base=True,
        )


def test_config_of_another_method_is_refused(trained_run, train_assets, tmp_path):
    work = trained_run("lora")
    with pytest.raises(CheckpointError, match=r"is a lora run .* trains full"):
        options = {"model.path": str(train_assets["model"])}
        convert(str(CONFIGS["full"]), str(work), str(tmp_path / "o"), cfg_options=options)


def test_other_lora_rank_is_refused(trained_run, tmp_path):
    work = trained_run("lora")
    with pytest.raises(CheckpointError, match=r"of another shape"):
        convert(str(dumped_config(work)), str(work), str(tmp_path / "o"), cfg_options={"model.lora.llm_rank": 4})
    assert not (tmp_path / "o").exists()


def test_not_a_checkpoint_is_refused(trained_run, tmp_path):
    work = trained_run("lora")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        convert(str(dumped_config(work)), str(tmp_path), str(tmp_path / "o"))
