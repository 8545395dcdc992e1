"""Every shipped config parses, resolves its _base_ chain, and builds with a tiny model swapped in."""

from __future__ import annotations

import pytest
import torch

from xtuner_vl.engine.deepspeed_config import complete_deepspeed_config, load_deepspeed_config
from xtuner_vl.model import load_tokenizer
from xtuner_vl.recipes.config import find_config, list_configs, load_config
from xtuner_vl.recipes.model_wrapper import InternVLChat, build_model_wrapper
from xtuner_vl.recipes.settings import (
    DataLoaderSettings,
    OptimSettings,
    RuntimeSettings,
    ScheduleSettings,
    parse_section,
)
from xtuner_vl.registry import DATASETS, MODELS
from xtuner_vl.tiny.data import make_synthetic_dataset

CONFIGS = list_configs()
# The tiny checkpoint of the same LLM family as each shipped config.
FAMILY = {
    "gpt_oss": "internvl3_5-gpt-oss-20b-a4b",
    "qwen3_moe": "internvl3_5-30b-a3b",
    "qwen3": "internvl3_5-1b",
    "qwen2_5": "internvl2_5-1b",
    "internlm2_5": "internvl2-8b",
    "internlm2_26b": "internvl2-26b",
    "internlm2": "internvl2-2b",
    "phi3": "internvl2-4b",
    "qwen2": "internvl2-1b",
    "yi_40b": "internvl2-40b",  # Llama architecture + InternViT-6B
    "llama3_76b": "internvl2-40b",
}


def _tiny_for(name: str) -> str:
    return next(v for k, v in FAMILY.items() if k in name)


def test_config_tree_is_complete():
    names = set(CONFIGS)
    for version, models in {
        "internvl_v1_5": ["internlm2_2b", "phi3_4b", "internlm2_26b"],
        "internvl_v2": [
            "qwen2_1b",
            "internlm2_2b",
            "phi3_4b",
            "internlm2_5_8b",
            "internlm2_26b",
            "yi_40b",
            "llama3_76b",
        ],
    }.items():
        for model in models:
            for method in ("full", "lora", "qlora"):
                assert f"{version}_{model}_{method}" in names
    new_wave = {
        "internvl_v2_5": ["internlm2_5_8b"],
        "internvl_v3": [f"qwen2_5_{b}b" for b in (1, 2, 8, 14, 38, 78)],
        "internvl_v3_5": [f"qwen3_{b}b" for b in (1, 2, 4, 8, 14, 38)]
        + [
            "qwen3_moe_30b_a3b",
            "qwen3_moe_241b_a28b",
            "gpt_oss_20b_a4b",
        ],
    }
    for version, models in new_wave.items():
        for model in models:
            # 4-bit weights of a 235B LLM (~130 GB) fit no GPU unsharded: no QLoRA config for 241B-A28B
            methods = ("full", "lora") if "241b" in model else ("full", "lora", "qlora")
            for method in methods:
                assert f"{version}_{model}_{method}" in names
    assert {"tiny_internvl2_lora", "tiny_internvl2_full", "tiny_internvl2_qlora"} <= names


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("cfg-data"), num_samples=8)


# (tiny family, method, trained parts) already built: the model is built once per kind, every config still parses.
_BUILT: set[tuple] = set()


@pytest.mark.parametrize("name", [n for n in CONFIGS if not n.startswith("tiny")])
def test_shipped_config_builds_with_tiny_model(name, tiny_ckpt, data, monkeypatch, tmp_path):
    monkeypatch.setenv("XTUNER_VL_CACHE", str(tmp_path))
    path = tiny_ckpt(_tiny_for(name))
    cfg = load_config(
        name,
        {
            "model.path": str(path),
            "train_dataset.data_paths": [str(data[0])],
            "train_dataset.image_folders": [str(data[1])],
        },
    )
    assert cfg.model.type == "InternVLChat"  # built through the MODELS registry
    model_s = build_model_wrapper(cfg.model)
    optim = parse_section(OptimSettings, cfg.optim, "optim")
    sched = parse_section(ScheduleSettings, cfg.schedule, "schedule")
    parse_section(DataLoaderSettings, cfg.dataloader, "dataloader")
    runtime = parse_section(RuntimeSettings, cfg.runtime, "runtime")
    assert runtime.deepspeed in ("zero1", "zero2", "zero3")
    assert optim.lr in (1e-5, 2e-5, 4e-5, 8e-5) and optim.weight_decay in (0.01, 0.05)
    assert sched.global_batch_size % sched.micro_batch_size == 0
    if model_s.quantization is not None:
        assert runtime.deepspeed != "zero3"  # 4-bit weights cannot be partitioned
    if name.startswith("internvl_v3_5"):  # the official 3.5 SFT data and loss (internvl3_5_*_sft.sh)
        assert sched.loss_reduction == "square" and cfg.dataloader.pack and cfg.dataloader.pack_length == 32768
    dataset = DATASETS.build({"model_path": str(path), **cfg.train_dataset, "tokenizer": load_tokenizer(path)})
    assert len(dataset) == 8 and dataset[0].input_ids.numel() > 0
    ds = complete_deepspeed_config(
        load_deepspeed_config(runtime.deepspeed), sched.micro_batch_size, 2, 8, optim.max_grad_norm, True, 64
    )
    assert ds["train_batch_size"] == sched.micro_batch_size * 16 and ds["bf16"]["enabled"] is True
    f = model_s.freeze
    expected = {"language_model"} | ({"vision_model"} if not f.vit else set()) | ({"mlp1"} if not f.mlp else set())
    kind = (_tiny_for(name), model_s.method, tuple(sorted(expected)))
    if kind in _BUILT:
        return
    _BUILT.add(kind)
    model = model_s.build(torch.device("cpu"))
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    if model_s.llm_lora_rank:
        assert all("lora_" in n for n, p in model.language_model.named_parameters() if p.requires_grad)
    if model_s.quantization is not None:
        assert any(type(m).__name__ == "Linear4bit" for m in model.language_model.modules())


def test_config_name_resolution_and_unknown_keys(tmp_path):
    assert find_config("internvl_v2_internlm2_5_8b_lora").name == "internvl_v2_internlm2_5_8b_lora.py"
    with pytest.raises(FileNotFoundError, match="list-cfg"):
        find_config("internvl_v2_nope")
    with pytest.raises(TypeError, match="number"):
        parse_section(OptimSettings, {"lr": "fast"}, "optim")
    with pytest.raises(ValueError, match="optim.lr must be a number"):  # what the CLI reports in one line
        parse_section(OptimSettings, {"lr": "fast"}, "optim")


def test_xtuner_seed_names_resolve_and_hints_are_fuzzy():
    from xtuner_vl.engine.deepspeed_config import load_deepspeed_config
    from xtuner_vl.recipes.config import find_config

    for seed, ours in (
        ("internvl_v2_internlm2_5_8b_lora_finetune", "internvl_v2_internlm2_5_8b_lora"),
        ("internvl_v2_internlm2_5_8b_qlora_finetune", "internvl_v2_internlm2_5_8b_qlora"),
        ("internvl_v2_internlm2_5_8b_finetune", "internvl_v2_internlm2_5_8b_full"),
        ("internvl_v1_5_phi3_4b_lora_finetune", "internvl_v1_5_phi3_4b_lora"),
    ):
        assert find_config(seed).stem == ours
    for stage in (1, 2, 3):
        assert load_deepspeed_config(f"deepspeed_zero{stage}") == load_deepspeed_config(f"zero{stage}")
    with pytest.raises(FileNotFoundError, match=r"similar: internvl_v2_internlm2_5_8b_lora, "):
        find_config("internvl_v2_intern2_5_8b_lora")  # a typo no substring search would find


def test_model_section_builds_through_the_registry_with_clear_errors():
    built = build_model_wrapper({"type": "InternVLChat", "path": "x", "lora": {"llm_rank": 8}})
    assert type(built) is InternVLChat and built.method == "lora" and built.lora.alpha is None
    assert build_model_wrapper({"type": InternVLChat, "path": "x"}).method == "full"  # the class itself
    assert build_model_wrapper({"path": "x", "lora": {"llm_rank": 4}, "quantization": {}}).method == "qlora"
    for section, message in (
        ({"path": "x", "lora_rank": 8}, r"unknown key\(s\) \['lora_rank'\]"),
        ({"path": "x", "lora": {"rank": 8}}, r"model.lora.*unknown key\(s\) \['rank'\]"),
        ({"path": "x", "llm_lora_rank": 8, "freeze_vit": True}, r"llm_lora_rank -> lora=dict\(llm_rank=...\)"),
        ({"path": "x", "lora": {"llm_rank": "8"}}, r"model.lora.llm_rank must be a number"),
        ({"path": "x", "quantization": {"llm": "int8"}}, r"quantization.llm must be one of"),
        ({"path": "x", "quantization": {}}, r"needs model.lora.llm_rank > 0"),
        ({"type": "NoSuchWrapper", "path": "x"}, r"'NoSuchWrapper' is not a registered model wrapper"),
        ({"path": "x", "gradient_checkpointing": "yes"}, r"must be true/false"),
        (None, "no `model` section"),
    ):
        with pytest.raises(ValueError, match=message):
            build_model_wrapper(section)


def test_a_registered_subclass_replaces_the_method(tiny_ckpt, tmp_path):
    """A user's wrapper, named by ``type=``, is what training, estimate and convert use."""

    @MODELS.register_module(force=True)
    class FrozenProjector(InternVLChat):
        def apply_method(self, model, dtype, quantize=True):
            model = super().apply_method(model, dtype, quantize)
            return model.requires_grad_(False).mlp1.requires_grad_(True) and model

    cfg = load_config(
        str(find_config("tiny_internvl2_full")),
        {"model.type": "FrozenProjector", "model.path": str(tiny_ckpt("internvl2-2b"))},
    )
    wrapper = build_model_wrapper(cfg.model)
    assert type(wrapper) is FrozenProjector
    model = wrapper.build(torch.device("cpu"))
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"mlp1"}
