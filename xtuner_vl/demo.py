"""``xtuner-vl demo``: the model core end to end on a tiny official-format InternVL2 (CPU, ~1 min).

Builds a tiny InternVL2-2B-shaped checkpoint (InternLM2 LLM), loads it without remote code, trains
mlp1 + LLM for a few steps on one synthetic image-question pair, writes the official format back,
reloads it and checks the reloaded logits equal the trained model's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from xtuner_vl.model import IGNORE_INDEX, load_internvl, load_tokenizer, save_official
from xtuner_vl.tiny.checkpoints import make_tiny

__all__ = ["run_demo"]


def _synthetic_sample(tokenizer, num_image_token: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One red-square image and an internlm2-chat prompt asking for its colour."""
    pixels = torch.zeros(1, 3, 448, 448)
    pixels[:, 0, 100:300, 100:300] = 2.0
    image = "<img>" + "<IMG_CONTEXT>" * num_image_token + "</img>"
    prompt = f"<|im_start|>user\n{image}\nWhat colour is the square?<|im_end|><|im_start|>assistant\n"
    answer = "red<|im_end|>"
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids[0]
    answer_ids = tokenizer(answer, add_special_tokens=False, return_tensors="pt").input_ids[0]
    ids = torch.cat([prompt_ids, answer_ids])[None]
    labels = ids.clone()
    labels[0, : len(prompt_ids)] = IGNORE_INDEX
    return pixels, ids, labels


def run_demo(work_dir: str | Path = "work_dirs/demo", steps: int = 30) -> int:
    """Run the demo; returns a process exit code (0 on success)."""
    work = Path(work_dir)
    base = make_tiny("internvl2-2b", work / "base")
    print(f"[1/4] tiny InternVL2-2B-shaped checkpoint: {base}")
    model = load_internvl(base, dtype=torch.float32)
    tokenizer = load_tokenizer(base)
    model.vision_model.requires_grad_(False)  # official recipe: ViT frozen
    model.train()
    pixels, ids, labels = _synthetic_sample(tokenizer, model.num_image_token)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in tqdm(range(steps), desc="[2/4] training mlp1 + LLM"):
        loss = model(pixels, ids, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())
    print(f"      loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    out = save_official(model, work / "official", source_dir=base, dtype=torch.float32)
    print(f"[3/4] official-format directory: {out}")
    model.eval()
    reloaded = load_internvl(out, dtype=torch.float32)
    with torch.no_grad():
        diff = (model(pixels, ids).logits - reloaded(pixels, ids).logits).abs().max().item()
    ok = diff == 0.0 and losses[-1] < losses[0]
    print(f"[4/4] reloaded logits max |diff| = {diff:.2e}; {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1
