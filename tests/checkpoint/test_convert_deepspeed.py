"""DeepSpeed checkpoints (2 processes, frozen weights excluded) -> convert -> the trained model's logits."""

from __future__ import annotations

import pytest
import torch

from tests.checkpoint.conftest import dumped_config, logits_of, rebuilt_training_model, sample_inputs
from xtuner_vl.model import load_internvl
from xtuner_vl.recipes.convert import convert

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("method", "stage"), [("lora", "zero2"), ("full", "zero3")])
def test_zero_checkpoint_converts_to_the_trained_model(trained_run, method, stage, tmp_path):
    work = trained_run(method, stage)
    assert (next(work.glob("checkpoints/step-*")) / "engine").is_dir()
    out = convert(str(dumped_config(work)), str(work), str(tmp_path / "out"), dtype="fp32")
    inputs = sample_inputs(out)
    expected = logits_of(rebuilt_training_model(work), inputs)
    torch.testing.assert_close(logits_of(load_internvl(out, dtype=torch.float32), inputs), expected, rtol=0, atol=1e-5)
