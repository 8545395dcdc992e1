"""The evaluation test data and its naive references, shared by test_evaluation.py (one rank) and test_zero3.py
(two ZeRO-3 ranks in the shared launch)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from tests.engine.conftest import TINY_CONFIG
from xtuner_vl.dataset.collate import collate_samples
from xtuner_vl.engine.dist import DistInfo
from xtuner_vl.model import load_tokenizer
from xtuner_vl.model.tokenizer import img_context_token_id
from xtuner_vl.recipes.build_evaluation import eval_dataset_args
from xtuner_vl.recipes.config import load_config
from xtuner_vl.registry import DATASETS
from xtuner_vl.structures import IGNORE_INDEX, Sample

BAD_RECORD = '{"conversations": []}'  # unusable: skipped, as in training
ONE_RANK = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def write_eval_assets(train_assets: dict, folder: Path) -> dict:
    """7 eval records (an odd count): 2 unusable ones, then 5 of the training data (text-only and images); and two
    fixed prompts, one with an image."""
    folder.mkdir(parents=True, exist_ok=True)
    good = train_assets["data"].read_text().splitlines()[:5]
    data = folder / "eval.jsonl"
    data.write_text("\n".join([BAD_RECORD, BAD_RECORD, *good]) + "\n")
    image = next(json.loads(r)["image"] for r in good if isinstance(json.loads(r).get("image"), str))
    prompts = [
        dict(text="How many squares are there?", image=str(train_assets["images"] / image)),
        dict(text="What is 1 plus 4?"),
    ]
    return {**train_assets, "eval": data, "prompts": prompts}


def eval_set(assets: dict):
    """The eval set exactly as ``train`` builds it from the tiny config (arguments inherited from train_dataset)."""
    cfg = load_config(str(TINY_CONFIG))
    args = eval_dataset_args(
        cfg.train_dataset, dict(data_paths=[str(assets["eval"])], image_folders=[str(assets["images"])])
    )
    return DATASETS.build({"model_path": str(assets["model"]), **args, "tokenizer": load_tokenizer(assets["model"])})


def eval_collate(dataset):
    return lambda items: collate_samples(items, dataset.tokenizer.pad_token_id, img_context_token_id(dataset.tokenizer))


def naive_eval_loss(model, dataset, count: int) -> float:
    """Sum of per-token cross-entropy / trained tokens over the usable samples of the first ``count``: each sample
    alone, full logits, float64."""
    total, tokens = torch.zeros((), dtype=torch.float64), 0
    model.eval()
    with torch.no_grad():
        for i in range(count):
            s = dataset[i]
            if not isinstance(s, Sample):
                continue
            logits = model(s.pixel_values, s.input_ids[None], image_flags=s.image_flags).logits[0, :-1].double()
            targets = s.labels[1:]
            keep = targets != IGNORE_INDEX
            total += F.cross_entropy(logits[keep], targets[keep], reduction="sum")
            tokens += int(keep.sum())
    model.train()
    return float(total / tokens)


def eval_records(work: Path) -> tuple[dict[int, float], dict[int, dict]]:
    """(step -> training loss, step -> evaluation record) of train_log.jsonl; the last record of a step wins."""
    losses, evals = {}, {}
    for line in (work / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            losses[rec["step"]] = rec["loss"]
        else:
            evals[rec["step"]] = rec
    return losses, evals
