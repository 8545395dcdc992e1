"""CLI plumbing: list-cfg / copy-cfg, torchrun relaunch, DeepSpeed json completion, lr schedule."""

from __future__ import annotations

import math

import pytest

from xtuner_vl.cli.launch import needs_torchrun, torchrun_command
from xtuner_vl.cli.main import main
from xtuner_vl.engine.deepspeed_config import complete_deepspeed_config, load_deepspeed_config
from xtuner_vl.engine.optimizer import offloads_optimizer
from xtuner_vl.engine.schedule import lr_at, warmup_steps_for
from xtuner_vl.recipes.config import load_config


def test_list_and_copy_cfg(capsys, tmp_path):
    assert main(["list-cfg", "-p", "internlm2_5_8b"]) == 0
    names = capsys.readouterr().out.split()
    assert names == sorted(
        f"internvl_v2{v}_internlm2_5_8b_{method}" for v in ("", "_5") for method in ("full", "lora", "qlora")
    )
    for name in ("internvl_v2_qwen2_1b_lora", "internvl_v2_qwen2_1b_qlora", "internvl_v3_5_qwen3_8b_full"):
        assert main(["copy-cfg", name, str(tmp_path / "mine")]) == 0
        copy = tmp_path / "mine" / f"{name}.py"
        text = copy.read_text()
        assert "_base_" not in text and load_config(str(copy)).to_dict() == load_config(name).to_dict()
        # One self-contained file, top to bottom: the model first, the runtime last, the official citation kept.
        order = [text.index(f"\n{key} = ") for key in ("model_path", "model", "train_dataset", "optim", "runtime")]
        release = load_config(name).model_path
        assert order == sorted(order) and f"fine-tune of OpenGVLab/{release} " in text.splitlines()[0]
        # The leaf's own model_path drives model.path (the first thing a user edits).
        copy.write_text(copy.read_text().replace(f"model_path = '{release}'", "model_path = '/data/my-1b'"))
        assert load_config(str(copy)).model.path == "/data/my-1b"


def test_ranks_share_the_node_cores_without_torchruns_banner():
    from xtuner_vl.cli.launch import omp_threads_per_rank

    assert omp_threads_per_rank({"NPROC_PER_NODE": "8"}, cpus=128) == "16"
    assert omp_threads_per_rank({"NPROC_PER_NODE": "2"}, cpus=2) == "1"
    assert omp_threads_per_rank({"NPROC_PER_NODE": "4"}, cpus=2) == "1"  # never 0
    assert omp_threads_per_rank({}, cpus=6) == "6"


def test_torchrun_relaunch_rules():
    assert not needs_torchrun({})
    assert needs_torchrun({"NPROC_PER_NODE": "8"})
    assert needs_torchrun({"NNODES": "2"})
    assert not needs_torchrun({"NPROC_PER_NODE": "8", "LOCAL_RANK": "0"})  # already under torchrun
    assert not needs_torchrun({"NNODES": "2", "SLURM_PROCID": "3"})  # srun
    cmd = torchrun_command(
        ["train", "cfg.py"],
        {"NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "8", "ADDR": "10.1.1.1", "PORT": "1234"},
    )
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nnodes=2", "--node_rank=1", "--nproc_per_node=8", "--master_addr=10.1.1.1", "--master_port=1234"} <= set(
        cmd
    )
    assert cmd[-4:] == ["-m", "xtuner_vl.cli.main", "train", "cfg.py"]


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero2_offload", "zero3_offload", "deepspeed_zero2"])
def test_deepspeed_presets_complete(name):
    cfg = complete_deepspeed_config(
        load_deepspeed_config(name),
        micro_batch_size=4,
        grad_accum=4,
        world_size=8,
        max_grad_norm=1.0,
        bf16=True,
        hidden_size=4096,
    )
    assert cfg["train_batch_size"] == 128 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 1.0 and cfg["bf16"]["enabled"] is True
    assert "auto" not in repr(cfg)
    # Offloaded presets train with DeepSpeed's CPU Adam, so DeepSpeed's check for it stays on.
    assert offloads_optimizer(cfg) == ("offload" in name) and "zero_force_ds_cpu_optimizer" not in cfg


def test_deepspeed_json_contradicting_the_config_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}')
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=2"):
        complete_deepspeed_config(load_deepspeed_config(str(path)), 4, 1, 1, 1.0, False, 64)
    with pytest.raises(FileNotFoundError, match="preset"):
        load_deepspeed_config("zero4")


def test_lr_schedule_warmup_and_cosine():
    total, warm = 100, warmup_steps_for(100, 0.03)
    assert warm == 3
    assert lr_at(0, 1.0, total, warm) == 0.0
    assert lr_at(2, 1.0, total, warm) == pytest.approx(2 / 3)
    assert lr_at(3, 1.0, total, warm) == 1.0
    mid = 3 + (total - 3) // 2
    assert lr_at(mid, 1.0, total, warm) == pytest.approx(0.5 * (1 + math.cos(math.pi * (mid - 3) / 97)))
    assert lr_at(total, 1.0, total, warm) == pytest.approx(0.0)
    assert lr_at(total, 1.0, total, warm, min_lr_ratio=0.1) == pytest.approx(0.1)
