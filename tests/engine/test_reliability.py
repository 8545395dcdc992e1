"""Faults a run must survive: stop signals, damaged checkpoints, divergence, I/O errors.

Each test injects the fault the way it happens (a signal to the trainer or to one rank, bytes of a written
checkpoint truncated or overwritten, a learning rate that diverges, a full disk) and checks what the user
gets: a saved step and a distinct exit status, a fallback to the newest checkpoint that verifies, skipped
updates and a clear stop, one message naming the path and the cause.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.engine.conftest import LAUNCHER_ENV, REPO, cli_args, free_port, logged_losses, run_cli
from xtuner_vl.checkpoint.trained import CheckpointError, read_trained_checkpoint
from xtuner_vl.engine.checkpoint_dir import MANIFEST, CheckpointDir, checkpoint_files, manifest_of, verify_files
from xtuner_vl.engine.deepspeed_config import CONFIG_ROOT
from xtuner_vl.engine.io_errors import CheckpointIOError, io_errors_named
from xtuner_vl.engine.preemption import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow

LONG_RUN = ["schedule.max_steps=400", "runtime.save_steps=1000", "runtime.log_interval=1"]


def _start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "xtuner_vl.cli.main", *args],
        env={**{k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}, "OMP_NUM_THREADS": "1", **(env or {})},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for_step(proc: subprocess.Popen, work: Path, step: int) -> None:
    log, deadline = work / "train_log.jsonl", time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and any(json.loads(x)["step"] >= step for x in log.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} never logged: {proc.poll()}")


def test_sigterm_finishes_the_step_saves_and_exits_with_its_status(train_assets, tmp_path):
    work = tmp_path / "run"
    proc = _start(cli_args(train_assets, work, *[], "--resume", "auto") + LONG_RUN)
    _wait_for_step(proc, work, 2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    last = max(logged_losses(work))
    assert f"SIGTERM received: stopped after step {last}, saved" in out + err
    saved = CheckpointDir(work).latest()
    assert saved is not None and saved.name == f"step-{last:08d}" and (saved / MANIFEST).is_file()
    # The saved step resumes.
    done = run_cli(cli_args(train_assets, work, "--resume", "auto") + [f"schedule.max_steps={last + 1}"])
    assert f"resumed from {saved} at step {last}" in done.stdout + done.stderr
    assert max(logged_losses(work)) == last + 1


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(train_assets, tmp_path):
    import psutil

    work = tmp_path / "ddp"
    env = {"NPROC_PER_NODE": "2", "PORT": str(free_port()), "XTUNER_VL_CACHE": str(train_assets["cache"])}
    proc = _start(cli_args(train_assets, work) + LONG_RUN, env)
    _wait_for_step(proc, work, 2)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("LOCAL_RANK") == "1"]
    assert len(ranks) == 1
    os.kill(ranks[0].pid, signal.SIGUSR1)  # what SLURM's --signal sends; rank 0 never receives it
    out, err = proc.communicate(timeout=180)
    saved = CheckpointDir(work).latest()
    assert saved is not None, err[-3000:]
    states = [torch.load(saved / f"trainer_state_rank{r}.pt", weights_only=False)["step"] for r in (0, 1)]
    assert states[0] == states[1] == int(saved.name.split("-")[1]) == max(logged_losses(work))
    assert "a stop signal on another rank received" in out + err  # rank 0 logs; rank 1 got the signal
    assert proc.returncode == PREEMPTED_EXIT_CODE  # through torchrun, which reports any worker status as 1


@pytest.fixture(scope="module")
def saved_run(train_assets, tmp_path_factory) -> Path:
    """A single-process run with checkpoints at steps 2 and 4."""
    work = tmp_path_factory.mktemp("saved") / "run"
    run_cli(cli_args(train_assets, work) + ["schedule.max_steps=4", "runtime.save_steps=2", "runtime.keep_last=3"])
    assert [p.name for p in CheckpointDir(work).complete()] == ["step-00000002", "step-00000004"]
    return work


def _overwrite_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = b"\xff" * 64  # same size, different bytes: invisible to a size check
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": lambda p: os.truncate(p, p.stat().st_size // 2),
    "emptied": lambda p: os.truncate(p, 0),
    "deleted": lambda p: p.unlink(),
    "overwritten": _overwrite_middle,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_files_fail_verification(saved_run, tmp_path, damage):
    step = tmp_path / "step"
    shutil.copytree(saved_run / "checkpoints" / "step-00000004", step)
    manifest = manifest_of(step)
    assert manifest is not None and sorted(manifest) == checkpoint_files(step)
    assert verify_files(step, manifest, sorted(manifest)) is None
    DAMAGE[damage](step / "torch_backend.pt")
    reason = verify_files(step, manifest, sorted(manifest))
    assert reason is not None and reason.startswith("torch_backend.pt")


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_resume_auto_falls_back_to_the_newest_checkpoint_that_verifies(saved_run, tmp_path, train_assets, damage):
    work = tmp_path / "run"
    shutil.copytree(saved_run, work)
    DAMAGE[damage](work / "checkpoints" / "step-00000004" / "torch_backend.pt")
    done = run_cli(
        cli_args(train_assets, work, "--resume", "auto")
        + ["schedule.max_steps=5", "runtime.save_steps=2", "runtime.keep_last=3"]
    )
    text = done.stdout + done.stderr
    assert "checkpoint step-00000004 fails verification (torch_backend.pt" in text
    assert f"resumed from {work / 'checkpoints' / 'step-00000002'} at step 2" in text
    # The damaged one is moved aside: retention can no longer keep it over the good ones.
    assert (work / "checkpoints" / "rejected" / "step-00000004" / "REJECTED").is_file()
    assert [p.name for p in CheckpointDir(work).complete()] == ["step-00000002", "step-00000004", "step-00000005"]


def test_convert_reads_only_checkpoints_that_verify(saved_run, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(saved_run, work)
    _overwrite_middle(work / "checkpoints" / "step-00000004" / "torch_backend.pt")
    assert read_trained_checkpoint(work).path.name == "step-00000002"  # the work dir: newest that verifies
    with pytest.raises(CheckpointError, match="fails verification"):
        read_trained_checkpoint(work / "checkpoints" / "step-00000004")


def test_divergence_skips_updates_stops_and_is_never_saved(train_assets, tmp_path):
    work = tmp_path / "nan"
    args = cli_args(train_assets, work, config=CONFIG_ROOT / "tiny" / "tiny_internvl2_full.py")
    proc = run_cli(args + ["optim.lr=1e30", "schedule.max_steps=12", "runtime.save_steps=2"], check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "steps in a row with a non-finite loss or gradient norm" in text and "runtime.max_nonfinite_steps=3" in text
    assert "Samples of this step: " in text and f"{train_assets['data']}:" in text  # file:line of each sample
    records = [json.loads(x) for x in (work / "train_log.jsonl").read_text().splitlines()]
    assert records[-1]["nonfinite_steps"] == 4 and "update skipped" in text
    for step in CheckpointDir(work).complete():  # whatever was saved is finite
        state = torch.load(step / "torch_backend.pt", weights_only=True)["model"]
        assert all(torch.isfinite(t).all() for t in state.values()), step


def test_convert_refuses_non_finite_weights(saved_run, tmp_path, train_assets):
    work = tmp_path / "run"
    shutil.copytree(saved_run, work)
    step = work / "checkpoints" / "step-00000004"
    state = torch.load(step / "torch_backend.pt", weights_only=True)
    name = next(iter(state["model"]))
    state["model"][name][0] = float("nan")
    torch.save(state, step / "torch_backend.pt")
    (step / MANIFEST).unlink()  # a checkpoint from before manifests: nothing to verify, the values are checked
    config = work / "tiny_internvl2_lora.py"
    out = tmp_path / "out"
    proc = run_cli(["convert", str(config), str(step), str(out), "--format", "adapter"], check=False)
    assert (
        proc.returncode == 1
        and "non-finite values in 1 trained tensors" in proc.stderr
        and "--allow-nonfinite" in (proc.stderr)
    )
    run_cli(["convert", str(config), str(step), str(out), "--format", "adapter", "--allow-nonfinite"])


def test_io_errors_name_the_path_and_the_cause(tmp_path):
    target = tmp_path / "checkpoints" / ".tmp-step-00000004"
    with pytest.raises(CheckpointIOError, match=r"writing .*model.pt failed: No space left on device; [\d.]+ GiB free"):
        with io_errors_named(target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target / "model.pt"))
    # torch's C++ writer reports a full disk as a stream error without a path.
    with pytest.raises(CheckpointIOError, match=r"writing .*tmp-step-00000004 failed \(basic_ios::clear.*GiB free"):
        with io_errors_named(target):
            raise RuntimeError("basic_ios::clear: iostream error")
    with pytest.raises(RuntimeError, match="unrelated"), io_errors_named(target):
        raise RuntimeError("unrelated")


def test_resume_refuses_changed_data_unless_allowed_and_saves_the_cli_overrides(train_assets, tmp_path):
    data = tmp_path / "data.jsonl"
    shutil.copy(train_assets["data"], data)
    assets = {**train_assets, "data": data}
    work = tmp_path / "run"
    run_cli(cli_args(assets, work, "--seed", "7") + ["schedule.max_steps=2", "runtime.save_steps=2"])
    saved_config = (work / "tiny_internvl2_lora.py").read_text()
    assert "seed=7" in saved_config.replace(" ", "")  # the command line's seed, not the config's 42
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[::-1]) + "\n")  # the same records in another order: counts agree
    resume = cli_args(assets, work, "--seed", "7", "--resume", "auto") + ["schedule.max_steps=3"]
    refused = run_cli(resume, check=False)
    assert refused.returncode != 0
    assert f"source {data}:" in refused.stderr and "--allow-data-change" in refused.stderr
    allowed = cli_args(assets, work, "--seed", "7", "--resume", "auto", "--allow-data-change")
    accepted = run_cli(allowed + ["schedule.max_steps=3"])
    assert f"resuming with changed data (--allow-data-change): source {data}" in accepted.stdout


def test_a_second_run_in_the_same_work_dir_is_refused(train_assets, tmp_path):
    import fcntl

    work = tmp_path / "busy"
    work.mkdir()
    with open(work / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on host since now\n")
        held.flush()
        proc = run_cli(cli_args(train_assets, work), check=False)
    assert proc.returncode != 0
    assert f"work dir {work} is in use by another training run (pid 4242 on host since now)" in proc.stderr
    assert not (work / "checkpoints").exists() and not (work / "tiny_internvl2_lora.py").exists()


def test_data_loader_workers_survive_the_stop_signals_torchrun_sends_them():
    """torchrun signals each rank's process group; the rank's DataLoader workers must not die of it."""
    from torch.utils.data import DataLoader

    from xtuner_vl.engine.preemption import ignore_stop_signals

    class Slow(torch.utils.data.Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, i):
            time.sleep(0.02)
            return torch.tensor([i, os.getpid()])

    loader = DataLoader(
        Slow(), batch_size=1, num_workers=2, worker_init_fn=ignore_stop_signals, multiprocessing_context="fork"
    )
    got, workers = [], set()
    for i, batch in enumerate(loader):
        got.append(int(batch[0, 0]))
        workers.add(int(batch[0, 1]))
        if i == 4:
            for pid in workers:
                os.kill(pid, signal.SIGTERM)
                os.kill(pid, signal.SIGUSR1)
    assert got == list(range(40))


@pytest.fixture
def small_disk(tmp_path):
    """A 320 KiB tmpfs: room for the logs, not for a checkpoint (root only; CI runs as root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_save_is_reported_in_one_line(train_assets, small_disk):
    work = small_disk / "run"
    proc = run_cli(cli_args(train_assets, work) + ["schedule.max_steps=1"], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    error = [line.split("xtuner-vl train: error: ", 1)[1] for line in proc.stderr.splitlines() if "error: " in line]
    assert len(error) == 1, proc.stderr[-3000:]  # one line (after the progress bar's carriage returns)
    assert "checkpoints/.tmp-step-00000001" in error[0] and "GiB free on the file system" in error[0]
    assert "No space left on device" in error[0]
    assert CheckpointDir(work).latest() is None  # nothing half-written under a final name


def test_a_bad_model_directory_is_one_line_for_train_and_convert(train_assets, saved_run, tmp_path):
    from xtuner_vl.model import load_internvl, save_official

    bad = tmp_path / "bad"
    save_official(load_internvl(train_assets["model"]), bad, source_dir=train_assets["model"], max_shard_size="200KB")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../../etc/passwd"
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    train = run_cli(cli_args(train_assets, tmp_path / "run") + [f"model.path={bad}"], check=False)
    config = saved_run / "tiny_internvl2_lora.py"
    convert = run_cli(
        [
            "convert",
            str(config),
            str(saved_run),
            str(tmp_path / "out"),
            "--trust-base",
            "--cfg-options",
            f"model.path={bad}",
        ],
        check=False,
    )
    for proc, command in ((train, "train"), (convert, "convert")):
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        lines = [x for x in proc.stderr.splitlines() if f"xtuner-vl {command}: error: " in x]
        assert len(lines) == 1 and "points outside the model directory" in lines[0], proc.stderr[-2000:]
