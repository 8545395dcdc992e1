"""Fixtures for conversion tests: tiny training runs (cached per session) and reference logits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.engine.conftest import cli_args, run_cli, train_assets  # noqa: F401  (fixture)
from xtuner_vl.checkpoint import materialize, read_trained_checkpoint
from xtuner_vl.engine.deepspeed_config import CONFIG_ROOT
from xtuner_vl.model import img_context_token_id, load_tokenizer
from xtuner_vl.recipes.config import load_config
from xtuner_vl.recipes.model_wrapper import build_model_wrapper

CONFIGS = {m: CONFIG_ROOT / "tiny" / f"tiny_internvl2_{m}.py" for m in ("full", "lora", "qlora")}


@pytest.fixture(scope="session")
def trained_run(train_assets, tmp_path_factory) -> Callable[..., Path]:  # noqa: F811
    """``trained_run(method, *options)`` -> work dir of a 2-step tiny run in this process (plain PyTorch);
    ``options`` are extra ``key=value`` config overrides. Two-rank DeepSpeed checkpoints are converted where their
    runs are (tests/engine/test_resume.py for ZeRO-2 LoRA, tests/engine/test_train_runs.py for ZeRO-3 full)."""
    cache: dict[tuple, Path] = {}

    def run(method: str, *options: str) -> Path:
        key = (method, options)
        if key not in cache:
            work = tmp_path_factory.mktemp(f"run-{method}")
            args = cli_args(train_assets, work, config=CONFIGS[method]) + ["schedule.max_steps=2", *options]
            run_cli(args, cache=train_assets["cache"])
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


def assert_converts_to_the_trained_model(work: Path, out: Path) -> None:
    """``convert`` of the run in ``work`` (its last checkpoint, any backend: DeepSpeed's frozen weights excluded,
    ZeRO-3 partitions consolidated) gives the logits of the training model rebuilt from that checkpoint."""
    from xtuner_vl.model import load_internvl
    from xtuner_vl.recipes.convert import convert

    assert (max(work.glob("checkpoints/step-*")) / "COMPLETE").is_file()
    converted = convert(str(dumped_config(work)), str(work), str(out), dtype="fp32")
    inputs = sample_inputs(converted)
    expected = logits_of(rebuilt_training_model(work), inputs)
    got = logits_of(load_internvl(converted, dtype=torch.float32), inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def rebuilt_training_model(work: Path) -> torch.nn.Module:
    """The run's training model rebuilt in fp32 on CPU with the checkpoint's trainable weights loaded."""
    cfg = load_config(str(dumped_config(work))).get("model")
    model = build_model_wrapper(cfg, dtype="fp32", gradient_checkpointing=False).build(torch.device("cpu"))
    state = {k: materialize(v).float() for k, v in read_trained_checkpoint(work).state.items()}
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return model.eval()
