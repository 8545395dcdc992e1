"""An independent, deliberately naive InternVL forward written from the official code's semantics.

It works on a raw state dict and config.json dict only (no xtuner_vl module), with eager attention,
additive ``finfo.min`` masks and the official rotary tables (InternLM2's stateful dynamic NTK cache,
Phi-3's ``su`` factors), so the tests compare our model against a second implementation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rms(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _vit(sd, vc, px, select_layer):
    p = "vision_model."
    dim, heads = vc["hidden_size"], vc["num_attention_heads"]
    x = F.conv2d(
        px,
        sd[p + "embeddings.patch_embedding.weight"],
        sd[p + "embeddings.patch_embedding.bias"],
        stride=vc["patch_size"],
    )
    b, _, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "embeddings.class_embedding"].expand(b, 1, -1), x], 1)
    pos = sd[p + "embeddings.position_embedding"]
    side = vc["image_size"] // vc["patch_size"]
    grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False).reshape(1, -1, h * w).permute(0, 2, 1)
    x = x + torch.cat([pos[:, :1], grid], 1)
    eps = vc["layer_norm_eps"]

    def norm(t, name):
        if vc["norm_type"] == "rms_norm":
            return _rms(t, sd[name + ".weight"], eps)
        return F.layer_norm(t, (dim,), sd[name + ".weight"], sd[name + ".bias"], eps)

    states = [x]
    for i in range(vc["num_hidden_layers"]):
        lp = f"{p}encoder.layers.{i}."
        y = norm(x, lp + "norm1")
        qkv = F.linear(y, sd[lp + "attn.qkv.weight"], sd.get(lp + "attn.qkv.bias"))
        n = y.shape[1]
        qkv = qkv.reshape(b, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if vc["qk_normalization"]:
            q = _rms(q.transpose(1, 2).flatten(-2), sd[lp + "attn.q_norm.weight"], eps)
            q = q.view(b, n, heads, -1).transpose(1, 2)
            k = _rms(k.transpose(1, 2).flatten(-2), sd[lp + "attn.k_norm.weight"], eps)
            k = k.view(b, n, heads, -1).transpose(1, 2)
        attn = ((q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(b, n, dim)
        x = x + F.linear(y, sd[lp + "attn.proj.weight"], sd[lp + "attn.proj.bias"]) * sd[lp + "ls1"]
        y = F.gelu(F.linear(norm(x, lp + "norm2"), sd[lp + "mlp.fc1.weight"], sd[lp + "mlp.fc1.bias"]))
        x = x + F.linear(y, sd[lp + "mlp.fc2.weight"], sd[lp + "mlp.fc2.bias"]) * sd[lp + "ls2"]
        states.append(x)
    return states[select_layer]


def _pixel_shuffle(x, scale, version):
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x if version == "v1" else x.permute(0, 2, 1, 3).contiguous()


def _rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), -1)


def _yarn_tables(scaling, base, head_dim, position_ids):
    """YaRN: per frequency, interpolate (divide by ``factor``) below ``beta_slow`` rotations over the original
    context, keep above ``beta_fast``, ramp linearly between; cos/sin scaled by 0.1 ln(factor) + 1."""
    factor, orig = scaling["factor"], scaling["original_max_position_embeddings"]

    def dim_of(rotations):  # the frequency index that turns ``rotations`` times over the original context
        return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(dim_of(scaling["beta_fast"]), 0), min(dim_of(scaling["beta_slow"]), head_dim - 1)
    keep = 1 - ((torch.arange(head_dim // 2).float() - low) / (high - low)).clamp(0, 1)
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    inv = inv / factor * (1 - keep) + inv * keep
    emb = torch.cat([position_ids[..., None].float() * inv] * 2, -1)
    mscale = 0.1 * math.log(factor) + 1.0
    return emb.cos() * mscale, emb.sin() * mscale


def _rope_tables(lc, head_dim, position_ids, seq_len, state):
    arch = lc["architectures"][0]
    base = lc.get("rope_theta", 10000)
    scaling = lc.get("rope_scaling")
    if arch == "Phi3ForCausalLM" and scaling:
        orig = lc["original_max_position_embeddings"]
        factors = scaling["long_factor"] if position_ids.max() + 1 > orig else scaling["short_factor"]
        inv = 1.0 / (torch.tensor(factors) * base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        freqs = position_ids[:, :, None].float() * inv
        emb = torch.cat((freqs, freqs), -1)
        scale = lc["max_position_embeddings"] / orig
        f = 1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(orig))
        return emb.cos() * f, emb.sin() * f
    if scaling and scaling.get("rope_type") == "yarn":  # GPT-OSS: YaRN (arXiv:2309.00071), untruncated ramp
        return _yarn_tables(scaling, base, head_dim, position_ids)
    # InternLM2 keeps a cos/sin table of the longest key length seen (state), as the official code.
    max_pos = lc["max_position_embeddings"]
    cached = max(state.get("cached", max_pos), seq_len)
    state["cached"] = cached
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    t = torch.arange(cached).float()
    if scaling and scaling["type"] == "dynamic" and cached > max_pos:
        f = scaling["factor"]
        new_base = base * ((f * cached / max_pos) - (f - 1)) ** (head_dim / (head_dim - 2))
        inv = 1.0 / (new_base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    if scaling and scaling["type"] == "linear":
        t = t / scaling["factor"]
    emb = torch.cat([torch.outer(t, inv)] * 2, -1)
    return emb.cos()[position_ids], emb.sin()[position_ids]


def _llm(sd, lc, embeds, attention_mask, state):
    arch = lc["architectures"][0]
    b, n, hid = embeds.shape
    heads, kv = lc["num_attention_heads"], lc.get("num_key_value_heads") or lc["num_attention_heads"]
    hd = lc.get("head_dim") or hid // heads  # Qwen3 sets its own head_dim
    eps = lc["rms_norm_eps"]
    pos = torch.arange(n)[None].expand(b, n)
    cos, sin = _rope_tables(lc, hd, pos, n, state)
    cos, sin = cos[:, None], sin[:, None]
    big = torch.finfo(torch.float32).min
    causal = torch.full((n, n), big).triu(1)
    am = torch.ones(b, n) if attention_mask is None else attention_mask.float()
    mask = causal[None, None] + (1.0 - am[:, None, None, :]) * big
    if arch == "InternLM2ForCausalLM":
        pre, emb_out = "language_model.model.", "language_model.output.weight"
    else:
        pre, emb_out = "language_model.model.", "language_model.lm_head.weight"
    x = embeds
    for i in range(lc["num_hidden_layers"]):
        lp = f"{pre}layers.{i}."
        if arch == "InternLM2ForCausalLM":
            y = _rms(x, sd[lp + "attention_norm.weight"], eps)
            qkv = F.linear(y, sd[lp + "attention.wqkv.weight"]).view(b, n, kv, heads // kv + 2, hd)
            q = qkv[..., : heads // kv, :].reshape(b, n, heads, hd)
            k, v = qkv[..., -2, :], qkv[..., -1, :]
        elif arch == "Phi3ForCausalLM":
            y = _rms(x, sd[lp + "input_layernorm.weight"], eps)
            qkv = F.linear(y, sd[lp + "self_attn.qkv_proj.weight"])
            q = qkv[..., : heads * hd].view(b, n, heads, hd)
            k = qkv[..., heads * hd : (heads + kv) * hd].view(b, n, kv, hd)
            v = qkv[..., (heads + kv) * hd :].view(b, n, kv, hd)
        else:
            y = _rms(x, sd[lp + "input_layernorm.weight"], eps)
            q = F.linear(y, sd[lp + "self_attn.q_proj.weight"], sd.get(lp + "self_attn.q_proj.bias")).view(
                b, n, heads, hd
            )
            k = F.linear(y, sd[lp + "self_attn.k_proj.weight"], sd.get(lp + "self_attn.k_proj.bias")).view(b, n, kv, hd)
            v = F.linear(y, sd[lp + "self_attn.v_proj.weight"], sd.get(lp + "self_attn.v_proj.bias")).view(b, n, kv, hd)
            if arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):  # RMSNorm of each head's q and k, before rotary
                q, k = (
                    _rms(q, sd[lp + "self_attn.q_norm.weight"], eps),
                    _rms(k, sd[lp + "self_attn.k_norm.weight"], eps),
                )
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
        layer_mask = mask
        if (lc.get("layer_types") or [None] * (i + 1))[i] == "sliding_attention":  # GPT-OSS: the last `window` keys
            far = torch.arange(n)[:, None] - torch.arange(n)[None, :] >= lc["sliding_window"]
            layer_mask = mask.masked_fill(far[None, None], big)
        w = (q @ k.transpose(2, 3)) / math.sqrt(hd) + layer_mask
        if lp + "self_attn.sinks" in sd:  # GPT-OSS: one learned logit per head joins the softmax, then is dropped
            sink = sd[lp + "self_attn.sinks"][None, :, None, None].expand(b, heads, n, 1)
            probs = torch.cat([w, sink], -1).softmax(-1)[..., :-1]
        else:
            probs = w.softmax(-1)
        o = (probs @ v).transpose(1, 2).reshape(b, n, heads * hd)
        if arch == "InternLM2ForCausalLM":
            x = x + F.linear(o, sd[lp + "attention.wo.weight"])
            y = _rms(x, sd[lp + "ffn_norm.weight"], eps)
            x = x + F.linear(
                F.silu(F.linear(y, sd[lp + "feed_forward.w1.weight"])) * F.linear(y, sd[lp + "feed_forward.w3.weight"]),
                sd[lp + "feed_forward.w2.weight"],
            )
            continue
        x = x + F.linear(o, sd[lp + "self_attn.o_proj.weight"], sd.get(lp + "self_attn.o_proj.bias"))
        y = _rms(x, sd[lp + "post_attention_layernorm.weight"], eps)
        if lp + "mlp.router.weight" in sd:  # GPT-OSS
            x = x + _gpt_oss_moe(sd, lc, lp + "mlp.", y)
            continue
        if lp + "mlp.gate.weight" in sd:  # Qwen3-MoE sparse block
            x = x + _moe(sd, lc, lp + "mlp.", y)
            continue
        if arch == "Phi3ForCausalLM":
            gate, up = F.linear(y, sd[lp + "mlp.gate_up_proj.weight"]).chunk(2, -1)
        else:
            gate, up = F.linear(y, sd[lp + "mlp.gate_proj.weight"]), F.linear(y, sd[lp + "mlp.up_proj.weight"])
        x = x + F.linear(F.silu(gate) * up, sd[lp + "mlp.down_proj.weight"])
    x = _rms(x, sd[pre + "norm.weight"], eps)
    if lc.get("tie_word_embeddings") and arch != "InternLM2ForCausalLM":  # no head stored: the embedding is it
        emb_out = pre + "embed_tokens.weight"
    return F.linear(x, sd[emb_out])


def _moe(sd, lc, mp, y):
    """transformers 4.55 Qwen3MoeSparseMoeBlock (the InternVL 3.5 code's): every expert on every token, then
    each token's top-k experts by softmax router probability (renormalised if norm_topk_prob) mixed."""
    probs = F.linear(y, sd[mp + "gate.weight"]).float().softmax(-1)
    top_p, top_i = probs.topk(lc["num_experts_per_tok"], dim=-1)
    if lc.get("norm_topk_prob"):
        top_p = top_p / top_p.sum(-1, keepdim=True)
    outs = torch.stack(
        [
            F.linear(
                F.silu(F.linear(y, sd[f"{mp}experts.{e}.gate_proj.weight"]))
                * F.linear(y, sd[f"{mp}experts.{e}.up_proj.weight"]),
                sd[f"{mp}experts.{e}.down_proj.weight"],
            )
            for e in range(lc["num_experts"])
        ],
        -2,
    )  # [b, n, experts, hidden]
    picked = torch.gather(outs, -2, top_i[..., None].expand(*top_i.shape, outs.shape[-1]))
    return (picked * top_p.to(y.dtype)[..., None]).sum(-2)


def _gpt_oss_moe(sd, lc, mp, y):
    """GPT-OSS experts: top-k of the router logits, softmax over those k; each expert's fused gate/up (interleaved
    columns) with biases, gate clamped above and up on both sides at swiglu_limit, gate * sigmoid(1.702 gate) *
    (up + 1), down with bias; every expert on every token, then the chosen ones mixed."""
    top_v, top_i = F.linear(y, sd[mp + "router.weight"], sd[mp + "router.bias"]).topk(lc["num_experts_per_tok"], -1)
    weights, limit = top_v.softmax(-1), lc.get("swiglu_limit", 7.0)
    gate_up = torch.einsum("bnh,ehf->bnef", y, sd[mp + "experts.gate_up_proj"]) + sd[mp + "experts.gate_up_proj_bias"]
    gate, up = gate_up[..., ::2].clamp(max=limit), gate_up[..., 1::2].clamp(-limit, limit)
    act = (up + 1) * gate * torch.sigmoid(gate * 1.702)
    outs = torch.einsum("bnef,efh->bneh", act, sd[mp + "experts.down_proj"]) + sd[mp + "experts.down_proj_bias"]
    picked = torch.gather(outs, -2, top_i[..., None].expand(*top_i.shape, outs.shape[-1]))
    return (picked * weights[..., None]).sum(-2)


def reference_logits(sd, cfg, pixel_values, input_ids, attention_mask, image_flags, img_context_id, state=None):
    """Logits of the official InternVLChatModel.forward for these fp32 weights and inputs."""
    state = {} if state is None else state
    vc, lc = cfg["vision_config"], cfg["llm_config"]
    vit = _vit(sd, vc, pixel_values, cfg.get("select_layer", -1))[:, 1:]
    side = int(vit.shape[1] ** 0.5)
    vit = _pixel_shuffle(
        vit.reshape(vit.shape[0], side, side, -1), cfg.get("downsample_ratio", 0.5), cfg.get("ps_version", "v1")
    )
    vit = vit.reshape(vit.shape[0], -1, vit.shape[-1])
    vit = F.layer_norm(vit, (vit.shape[-1],), sd["mlp1.0.weight"], sd["mlp1.0.bias"], 1e-5)
    vit = F.linear(
        F.gelu(F.linear(vit, sd["mlp1.1.weight"], sd["mlp1.1.bias"])), sd["mlp1.3.weight"], sd["mlp1.3.bias"]
    )
    vit = vit[image_flags.reshape(-1) == 1]
    emb_key = (
        "language_model.model.tok_embeddings.weight"
        if lc["architectures"][0] == "InternLM2ForCausalLM"
        else "language_model.model.embed_tokens.weight"
    )
    embeds = F.embedding(input_ids, sd[emb_key])
    b, n, c = embeds.shape
    embeds = embeds.reshape(b * n, c)
    sel = input_ids.reshape(-1) == img_context_id
    embeds[sel] = embeds[sel] * 0.0 + vit.reshape(-1, c)
    return _llm(sd, lc, embeds.reshape(b, n, c), attention_mask, state)
