"""Evaluation during training: the eval loss against a naive reference, the fixed prompts' greedy answers, the
records in train_log.jsonl and TensorBoard, resume, and the config errors. (Two ZeRO-3 ranks evaluating as one:
test_zero3.py, in its shared launch.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.engine.conftest import TINY_CONFIG
from tests.engine.eval_reference import (
    ONE_RANK,
    eval_collate,
    eval_records,
    eval_set,
    naive_eval_loss,
    write_eval_assets,
)
from xtuner_vl.adapters import apply_lora
from xtuner_vl.engine.checkpoint_dir import rng_state
from xtuner_vl.engine.evaluation import EvalLossData, Evaluator, eval_shard
from xtuner_vl.engine.torch_backend import TorchBackend
from xtuner_vl.model import load_internvl
from xtuner_vl.recipes.build_evaluation import check_evaluation
from xtuner_vl.recipes.settings import EvaluationSettings


@pytest.fixture(scope="module")
def eval_assets(train_assets, tmp_path_factory) -> dict:
    return write_eval_assets(train_assets, tmp_path_factory.mktemp("eval"))


def test_eval_shard_is_sequential_disjoint_and_even():
    shards = [eval_shard(7, r, 3) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4, None], [2, 5, None]]
    assert sorted(i for s in shards for i in s if i is not None) == list(range(7))
    assert eval_shard(2, 3, 4) == [None] and eval_shard(4, 0, 1) == [0, 1, 2, 3]


def test_eval_loss_equals_the_naive_reference_and_leaves_the_model_as_it_was(eval_assets):
    """LoRA (random adapters, dropout) with gradient checkpointing, in training mode: evaluated in eval mode, back
    in training mode after, RNG untouched; an all-skipped batch re-runs a usable sample with weight 0."""
    torch.manual_seed(0)
    model = apply_lora(load_internvl(eval_assets["model"], dtype=torch.float32), llm_rank=4, dropout=0.3)
    model.gradient_checkpointing_enable()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.train()
    backend = TorchBackend(model, torch.optim.SGD(model.parameters(), lr=0.0), ONE_RANK, 1.0, bf16=False)
    dataset = eval_set(eval_assets)
    modes = [m.training for m in model.modules()]
    rng = rng_state()
    results = {}
    for max_samples in (None, 4):  # batches of 2: the first one holds the two unusable records only
        data = EvalLossData(dataset, eval_collate(dataset), micro_batch_size=2, max_samples=max_samples)
        results[max_samples] = Evaluator(backend, ONE_RANK, 1, 1, data).run(1)
    assert [m.training for m in model.modules()] == modes
    after = rng_state()  # python, numpy, torch: evaluation leaves training's random streams where they were
    assert after["python"] == rng["python"] and torch.equal(after["torch"], rng["torch"])
    assert all(np.array_equal(a, b) for a, b in zip(after["numpy"], rng["numpy"], strict=True))
    full = results[None]
    assert (full["eval_samples"], full["eval_skipped"]) == (5, 2)
    assert full["eval_loss"] == pytest.approx(naive_eval_loss(model, dataset, 7), rel=1e-6)
    assert results[4]["eval_samples"] == 2
    assert results[4]["eval_loss"] == pytest.approx(naive_eval_loss(model, dataset, 4), rel=1e-6)


def _options(assets: dict, steps: int, evaluation: dict) -> dict:
    return {
        "model.path": str(assets["model"]),
        "train_dataset.data_paths": [str(assets["data"])],
        "train_dataset.image_folders": [str(assets["images"])],
        "schedule.max_steps": steps,
        "runtime.save_steps": 2,
        "eval_dataset": dict(data_paths=[str(assets["eval"])], image_folders=[str(assets["images"])]),
        "evaluation": evaluation,
    }


def test_training_with_evaluation_logs_it_and_a_resumed_run_evaluates_the_same(eval_assets, tmp_path, monkeypatch):
    """Eval records at the interval and the last step in train_log.jsonl and TensorBoard; greedy LoRA answers that
    end at a stop token or max_new_tokens; resumed from a checkpoint, the same evaluation and training losses."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from xtuner_vl.recipes.train import train

    monkeypatch.setenv("XTUNER_VL_CACHE", str(eval_assets["cache"]))
    evaluation = dict(interval=2, prompts=eval_assets["prompts"], max_new_tokens=6)
    config = str(TINY_CONFIG)
    train(config, work_dir=str(tmp_path / "eval"), cfg_options=_options(eval_assets, 3, evaluation))
    losses, evals = eval_records(tmp_path / "eval")
    assert sorted(losses) == [1, 2, 3]
    assert sorted(evals) == [2, 3]  # the interval, and the last step
    for rec in evals.values():
        assert rec["eval_samples"] == 5 and rec["eval_skipped"] == 2 and rec["eval_tokens"] > 0
        assert [(qa["prompt"], qa["image"]) for qa in rec["eval_chat"]] == [
            (p["text"], p.get("image")) for p in eval_assets["prompts"]
        ]
        for qa in rec["eval_chat"]:
            assert isinstance(qa["answer"], str) and qa["answer"] and qa["finish"] in ("stop", "length")
    acc = EventAccumulator(str(tmp_path / "eval" / "tensorboard")).Reload()
    logged = {e.step: e.value for e in acc.Scalars("eval/loss")}
    assert logged == pytest.approx({s: evals[s]["eval_loss"] for s in (2, 3)}, rel=1e-6)
    assert "eval/chat/text_summary" in acc.Tags()["tensors"]
    # Resumed from step 2: step 3 is evaluated exactly as in the uninterrupted run.
    resumed = tmp_path / "resumed"
    checkpoint = tmp_path / "eval" / "checkpoints" / "step-00000002"
    train(config, work_dir=str(resumed), resume=str(checkpoint), cfg_options=_options(eval_assets, 3, evaluation))
    resumed_losses, resumed_evals = eval_records(resumed)
    assert resumed_losses == {3: losses[3]}
    again = resumed_evals[3]
    assert {k: v for k, v in again.items() if k != "eval_seconds"} == {
        k: v for k, v in evals[3].items() if k != "eval_seconds"
    }


@pytest.mark.parametrize(
    ("evaluation", "eval_dataset", "field"),
    [
        (None, dict(data_paths=["x.jsonl"]), "eval_dataset is set without an evaluation section"),
        (dict(interval=0, prompts=[dict(text="hi")]), None, "evaluation.interval"),
        (dict(interval=-3), dict(data_paths=["x.jsonl"]), "evaluation.interval"),
        (dict(max_samples=0, prompts=[dict(text="hi")]), None, "evaluation.max_samples"),
        (dict(max_new_tokens=0, prompts=[dict(text="hi")]), None, "evaluation.max_new_tokens"),
        (dict(), None, "nothing to evaluate"),
        (dict(prompts=[dict(text="hi", image="/no/such.jpg")]), None, "evaluation.prompts[0].image: no such file"),
        (dict(prompts=[dict(text="hi"), dict(txt="hi")]), None, "evaluation.prompts[1]: unknown key"),
        (dict(prompts=[dict(text="")]), None, "evaluation.prompts[0].text"),
        (dict(prompts=["hi"]), None, "evaluation.prompts[0] must be dict"),
        (dict(interval=5), dict(image_folders=["x"]), "eval_dataset needs data_paths"),
        (dict(interval=5), dict(data_paths=["/no/such.jsonl"]), "eval_dataset.data_paths: no such file"),
    ],
)
def test_config_errors_are_one_line_naming_the_field(evaluation, eval_dataset, field):
    s = None if evaluation is None else EvaluationSettings(**evaluation)
    with pytest.raises(ValueError, match="^config ") as err:
        check_evaluation(s, eval_dataset)
    assert field in str(err.value) and "\n" not in str(err.value)


def test_config_errors_stop_train_before_anything_is_loaded(tmp_path):
    from xtuner_vl.recipes.train import train

    options = {"model.path": str(tmp_path / "no-model"), "evaluation": dict(interval=0, prompts=[dict(text="hi")])}
    with pytest.raises(ValueError, match=r"^config evaluation\.interval must be"):
        train(str(TINY_CONFIG), work_dir=str(tmp_path / "w"), cfg_options=options)
    with pytest.raises(ValueError, match="unknown key"):
        train(str(TINY_CONFIG), work_dir=str(tmp_path / "w"), cfg_options={"evaluation": dict(every=3)})
