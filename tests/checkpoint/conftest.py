"""Fixtures for conversion tests: tiny training runs (cached per session) and reference logits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.engine.conftest import REPO, cli_args, free_port, run_cli, train_assets  # noqa: F401  (fixture)
from xtuner_vl.checkpoint import materialize, read_trained_checkpoint
from xtuner_vl.engine.deepspeed_config import CONFIG_ROOT
from xtuner_vl.model import img_context_token_id, load_tokenizer
from xtuner_vl.recipes.config import load_config
from xtuner_vl.recipes.model_wrapper import build_model_wrapper

CONFIGS = {m: CONFIG_ROOT / "tiny" / f"tiny_internvl2_{m}.py" for m in ("full", "lora", "qlora")}


@pytest.fixture(scope="session")
def trained_run(train_assets, tmp_path_factory) -> Callable[..., Path]:  # noqa: F811
    """``trained_run(method, deepspeed=None, *options)`` -> work dir of a 2-step tiny run (2 processes with
    DeepSpeed); ``options`` are extra ``key=value`` config overrides."""
    cache: dict[tuple, Path] = {}

    def run(method: str, deepspeed: str | None = None, *options: str) -> Path:
        key = (method, deepspeed, options)
        if key not in cache:
            work = tmp_path_factory.mktemp(f"run-{method}-{deepspeed or 'torch'}")
            extra = ("--deepspeed", deepspeed) if deepspeed else ()
            env = {"NPROC_PER_NODE": "2", "PORT": str(free_port())} if deepspeed else {}
            args = cli_args(train_assets, work, *extra, config=CONFIGS[method]) + ["schedule.max_steps=2", *options]
            run_cli(args, env=env, cache=train_assets["cache"])
            cache[key] = work
        return cache[key]

    return run


def dumped_config(work: Path) -> Path:
    """The resolved config the trainer dumped into its work dir."""
    (config,) = work.glob("*.py")
    return config


def sample_inputs(model_dir: Path) -> dict[str, torch.Tensor]:
    """One image tile and a prompt whose <IMG_CONTEXT> tokens take its 256 features."""
    ctx = img_context_token_id(load_tokenizer(model_dir))
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([[1, 20, 21] + [ctx] * 256 + [30, 31, 32, 33]])
    return {
        "pixel_values": torch.randn(1, 3, 448, 448, generator=g),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "image_flags": torch.ones(1, dtype=torch.long),
    }


@torch.no_grad()
def logits_of(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.eval()(**inputs).logits.float()


def rebuilt_training_model(work: Path) -> torch.nn.Module:
    """The run's training model rebuilt in fp32 on CPU with the checkpoint's trainable weights loaded."""
    cfg = load_config(str(dumped_config(work))).get("model")
    model = build_model_wrapper(cfg, dtype="fp32", gradient_checkpointing=False).build(torch.device("cpu"))
    state = {k: materialize(v).float() for k, v in read_trained_checkpoint(work).state.items()}
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return model.eval()
