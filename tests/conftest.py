"""Shared fixtures: tiny official-format checkpoints built once per test session."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread for the commands the tests start (see pytest_configure)


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist's controller only hands test files to the workers: it need not spend seconds importing torch.
    if config.getoption("numprocesses", None) and not hasattr(config, "workerinput"):
        return
    import torch

    # Tiny tensors gain nothing from intra-op threads; the cores go to pytest-xdist's workers and the ranks of the
    # multi-process runs (whose launches set OMP_NUM_THREADS=1 themselves). Two threads per worker on two cores
    # oversubscribe them and make the in-process tests several times slower.
    torch.set_num_threads(1)


# The longest test files (paths under tests/), started first. pytest-xdist runs each file whole on one worker in
# collection order (pyproject.toml: --dist loadfile --no-loadscope-reorder); a long file collected last would run
# alone at the end while the other cores idle.
LONGEST_FIRST = (
    "test_demo.py",
    "engine/test_resume.py",
    "test_gpu_check.py",
    "engine/test_zero3.py",
    "engine/test_estimate.py",
    "engine/test_reliability.py",
    "checkpoint/test_hf_export.py",
    "engine/test_train_runs.py",
    "engine/test_dist_setup.py",
    "test_wheel.py",
    "cli/test_launch.py",
    "dataset/test_data_tools.py",
)
_TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def key(item: pytest.Item) -> int:
        path = Path(str(item.path)).resolve()
        return rank.get(path.relative_to(_TESTS).as_posix(), len(rank)) if path.is_relative_to(_TESTS) else len(rank)

    items.sort(key=key)  # stable: the other files keep their order


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_ckpt(family, **config_overrides)`` -> directory of a tiny checkpoint (cached)."""
    from xtuner_vl.tiny.checkpoints import make_tiny

    cache: dict[tuple, Path] = {}

    def build(family: str, **overrides) -> Path:
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            name = family + "".join(f"-{k}{v}" for k, v in key[1])
            cache[key] = make_tiny(family, tmp_path_factory.mktemp(name), **overrides)
        return cache[key]

    return build


@pytest.fixture
def lone_process(monkeypatch):
    """This process as if started plainly: no launcher variables (restored afterwards, as is the process group)."""
    from xtuner_vl.engine.dist import RENDEZVOUS_ENV, destroy_distributed

    launch = (*RENDEZVOUS_ENV, "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "OMPI_COMM_WORLD_SIZE")
    for key in launch:  # _environment_restored restores the whole environment afterwards
        monkeypatch.delenv(key, raising=False)
    yield
    destroy_distributed()


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    import torch

    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test leaves ``os.environ`` as it found it. An in-process ``init_distributed`` fills the rendezvous
    variables in, and a leaked LOCAL_RANK would make every later ``xtuner-vl train`` skip torchrun. Autouse,
    so set up before and torn down after ``monkeypatch``."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
