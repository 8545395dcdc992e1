"""Distributed set-up: one plain process as rank 0 of 1 (DeepSpeed without a launcher), the process-group
timeout, DeepSpeed's CPU Adam for offloaded optimizers, QLoRA refused on ZeRO-3, per-rank training seeds."""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.engine.conftest import cli_args, logged_losses, run_cli
from xtuner_vl.dataset.samplers import DistributedRandomSampler
from xtuner_vl.engine import deepspeed_backend
from xtuner_vl.engine.deepspeed_config import CONFIG_ROOT
from xtuner_vl.engine.dist import (
    DistInfo,
    fill_single_process_env,
    init_distributed,
)
from xtuner_vl.engine.optimizer import build_optimizer, offload_cpu_threads, offloads_optimizer
from xtuner_vl.engine.seed import rank_seed, seed_everything
from xtuner_vl.recipes.settings import RuntimeSettings

CPU = torch.device("cpu")


# -- rendezvous environment and timeout -------------------------------------------------------------------
def test_a_lone_process_is_described_as_rank_0_of_1_and_a_launchers_env_is_kept():
    env: dict[str, str] = {}
    assert fill_single_process_env(env)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
    }
    with socket.socket() as s:  # the port was free: it can be bound again
        s.bind(("127.0.0.1", int(env["MASTER_PORT"])))
    chosen = {"MASTER_PORT": "29777"}
    fill_single_process_env(chosen)
    assert chosen["MASTER_PORT"] == "29777" and chosen["RANK"] == "0"  # what the user set stays
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}
    assert not fill_single_process_env(torchrun) and torchrun == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}
    with pytest.raises(RuntimeError, match="MPI launcher"):  # would otherwise train N unrelated copies
        fill_single_process_env({"OMPI_COMM_WORLD_SIZE": "4"})


def test_the_process_group_gets_the_timeout(monkeypatch, lone_process):
    seen = {}
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    # Alone: no group of ours (DeepSpeed builds one from the filled environment), the timeout is carried.
    d = init_distributed("cpu", timeout_minutes=7)
    assert d.timeout == timedelta(minutes=7) and (d.rank, d.world_size) == (0, 1) and not seen
    assert os.environ["WORLD_SIZE"] == "1" and "MASTER_PORT" in os.environ
    # Two ranks (as torchrun describes them): gloo with the timeout; device_id only for CUDA.
    monkeypatch.setenv("WORLD_SIZE", "2")
    init_distributed("cpu", timeout_minutes=7)
    assert seen == {"backend": "gloo", "timeout": timedelta(minutes=7)}
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setenv("LOCAL_RANK", "1")
    init_distributed("cuda", timeout_minutes=7)
    assert seen == {"backend": "nccl", "timeout": timedelta(minutes=7), "device_id": torch.device("cuda", 1)}
    assert RuntimeSettings().dist_timeout_minutes >= 60  # a 26B ZeRO-3 checkpoint save fits (settings.py)

    calls = {}

    class Stop(Exception):
        pass

    def initialize(**_):
        raise Stop

    fake = SimpleNamespace(init_distributed=lambda **kw: calls.update(kw), initialize=initialize)
    monkeypatch.setattr(deepspeed_backend, "import_deepspeed", lambda device: fake)
    with pytest.raises(Stop):
        deepspeed_backend.DeepSpeedBackend(None, None, {}, DistInfo(0, 1, 0, CPU, timedelta(minutes=7)))
    assert calls == {"dist_backend": "gloo", "timeout": timedelta(minutes=7)}


def test_the_process_group_is_destroyed_at_the_end_of_a_run(monkeypatch, lone_process):
    from xtuner_vl.recipes.train import exit_after_distributed_run

    fill_single_process_env()
    dist.init_process_group("gloo", rank=0, world_size=1)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")  # gloo itself ends with os._exit (ZeRO-3 teardown)
    exit_after_distributed_run()
    assert not dist.is_initialized()


# -- seeds --------------------------------------------------------------------------------------------------
def test_ranks_draw_their_own_dropout_masks_from_the_same_data_order():
    masks, shards = [], []
    for rank in (0, 1):  # what train.py does on each of two ranks once the model and optimizer are built
        seed_everything(rank_seed(42, rank))
        masks.append(F.dropout(torch.ones(256), p=0.5) == 0)
        shards.append(list(DistributedRandomSampler(64, rank, 2, seed=42)))
    assert not torch.equal(masks[0], masks[1])
    # One global order, split between the ranks, the same as under any other global RNG state.
    seed_everything(0)
    assert shards == [list(DistributedRandomSampler(64, rank, 2, seed=42)) for rank in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(64))
    seed_everything(rank_seed(42, 1))
    assert torch.equal(F.dropout(torch.ones(256), p=0.5) == 0, masks[1])  # reproducible per rank
    assert len({rank_seed(42, r) for r in range(64)} | {rank_seed(43, r) for r in range(64)}) == 128


# -- offloaded optimizer ------------------------------------------------------------------------------------
def test_offload_threads_replace_torchruns_blanket_one_but_keep_a_users_choice():
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "8", "OMP_NUM_THREADS": "1"}
    assert offload_cpu_threads(torchrun, cores=96) == 12
    assert offload_cpu_threads({**torchrun, "OMP_NUM_THREADS": "6"}, cores=96) is None
    assert offload_cpu_threads({"OMP_NUM_THREADS": "1"}, cores=96) is None  # a plain process: the user's 1
    assert offload_cpu_threads({}, cores=96) == 96
    assert offload_cpu_threads({"SLURM_CPUS_PER_TASK": "10"}, cores=96) == 10
    assert offload_cpu_threads({**torchrun, "LOCAL_WORLD_SIZE": "16"}, cores=8) == 1


def test_offloaded_optimizer_is_deepspeeds_cpu_adam_with_the_groups_settings(monkeypatch):
    """Builds (first time: JIT-compiles, ~1 min on 2 cores, then cached in the torch extensions dir) and
    steps DeepSpeed's CPU Adam; without offload torch's AdamW."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    w, b = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(4))
    groups = lambda: [{"params": [w], "weight_decay": 0.1, "lr_scale": 1.0}, {"params": [b], "weight_decay": 0.0}]  # noqa: E731
    assert type(build_optimizer(groups(), 1e-3, (0.9, 0.95), 1e-6, CPU, {"zero_optimization": {"stage": 2}})) is (
        torch.optim.AdamW
    )
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert offloads_optimizer(offload)
    opt = build_optimizer(groups(), 1e-3, (0.9, 0.95), 1e-6, CPU, offload)
    assert type(opt).__name__ == "DeepSpeedCPUAdam" and opt.adam_w_mode
    assert [(g["lr"], g["betas"], g["eps"], g["weight_decay"]) for g in opt.param_groups] == [
        (1e-3, (0.9, 0.95), 1e-6, 0.1),
        (1e-3, (0.9, 0.95), 1e-6, 0.0),
    ]
    assert opt.param_groups[0]["lr_scale"] == 1.0  # the trainer's per-group lr scale survives
    # One step equals torch's AdamW (decoupled weight decay) on the same groups.
    ref_w, ref_b = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(4))
    ref = torch.optim.AdamW(
        [{"params": [ref_w], "weight_decay": 0.1}, {"params": [ref_b], "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.95),
        eps=1e-6,
    )
    for p, q in ((w, ref_w), (b, ref_b)):
        p.grad = q.grad = torch.linspace(-1, 1, p.numel()).reshape(p.shape)
    opt.step()
    ref.step()
    torch.testing.assert_close(w.detach(), ref_w.detach())
    torch.testing.assert_close(b.detach(), ref_b.detach())


# -- refusals -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["zero3", "zero3_offload"])
def test_qlora_on_zero3_is_refused_before_anything_is_loaded(lone_process, preset):
    from xtuner_vl.recipes.train import train

    config = str(CONFIG_ROOT / "tiny" / "tiny_internvl2_qlora.py")
    # The model path does not exist: any loading would fail differently.
    with pytest.raises(ValueError, match=rf"tiny_internvl2_qlora.py: QLoRA .* DeepSpeed '{preset}' \(ZeRO-3\)") as e:
        train(config, deepspeed=preset, cfg_options={"model.path": "/nonexistent/model"})
    assert "4-bit weights cannot be partitioned" in str(e.value) and "\n" not in str(e.value)
    assert not dist.is_initialized()


# -- runs: one plain process, no launcher -------------------------------------------------------------------
@pytest.mark.slow
def test_one_process_zero2_offload_run_in_process(train_assets, tmp_path, monkeypatch, lone_process):
    """``train --deepspeed zero2_offload`` as one plain process: no MPI discovery, the group gets runtime's
    timeout, the optimizer is CPU Adam (DeepSpeed itself refuses another one there).

    One DeepSpeed engine per pytest process: DeepSpeed keeps its world group (deepspeed/utils/groups.py,
    ``_WORLD_GROUP``) past ``destroy_process_group``, so a second in-process run fails; other runs use the CLI.
    """
    from xtuner_vl.recipes.train import train

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("XTUNER_VL_CACHE", str(train_assets["cache"]))
    timeouts, cpu_adams = [], []
    real_init, real_cpu_adam = dist.init_process_group, deepspeed_backend.cpu_adam
    monkeypatch.setattr(
        dist, "init_process_group", lambda *a, **kw: (timeouts.append(kw["timeout"]), real_init(*a, **kw))
    )
    monkeypatch.setattr(
        deepspeed_backend, "cpu_adam", lambda *a, **kw: cpu_adams.append(real_cpu_adam(*a, **kw)) or cpu_adams[-1]
    )
    options = {
        "model.path": str(train_assets["model"]),
        "train_dataset.data_paths": [str(train_assets["data"])],
        "train_dataset.image_folders": [str(train_assets["images"])],
        "schedule.max_steps": 2,
        "runtime.dist_timeout_minutes": 7,
    }
    config = str(CONFIG_ROOT / "tiny" / "tiny_internvl2_lora.py")
    work = train(config, deepspeed="zero2_offload", work_dir=str(tmp_path / "w"), cfg_options=options)
    assert timeouts == [timedelta(minutes=7)] and dist.get_world_size() == 1
    assert "mpi4py" not in sys.modules
    assert len(cpu_adams) == 1 and type(cpu_adams[0]).__name__ == "DeepSpeedCPUAdam"
    assert sorted(logged_losses(work)) == [1, 2]
    assert (work / "checkpoints" / "step-00000002" / "COMPLETE").is_file()


@pytest.mark.slow
def test_one_process_zero3_through_the_cli(train_assets, tiny_ckpt, tmp_path, lone_process):
    """The real CLI, one process, ZeRO-3 over gloo, nothing of a launcher in the environment. The model is the
    GPT-OSS family, whose LoRA adapts the fused expert weights through peft's parametrization of the partitioned
    parameters; the ZeRO-3 checkpoint converts with those adapters merged."""
    from xtuner_vl.model.weights import read_state_dict
    from xtuner_vl.recipes.convert import convert

    work, model = tmp_path / "zero3", tiny_ckpt("internvl3_5-gpt-oss-20b-a4b")
    proc = run_cli(
        cli_args({**train_assets, "model": model}, work, "--deepspeed", "zero3") + ["schedule.max_steps=2"],
        cache=train_assets["cache"],
    )
    assert "world 1 x micro-batch 2" in proc.stdout
    assert sorted(logged_losses(work)) == [1, 2]
    assert (work / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
    (dumped,) = work.glob("*.py")
    merged = read_state_dict(convert(str(dumped), str(work), str(tmp_path / "official"), dtype="fp32"))
    base = read_state_dict(model)
    for name in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "self_attn.q_proj.weight"):
        key = f"language_model.model.layers.1.{name}"
        assert (merged[key] - base[key].float()).abs().max() > 0, key  # trained under ZeRO-3 and merged
