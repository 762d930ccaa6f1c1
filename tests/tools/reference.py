"""Independent reference forward pass in float64 numpy, written from the math.

For a checkpoint folder and a token sequence it returns the logits at every position and, per
layer, the full [heads, T, T] attention matrix of one pass over the whole sequence (no cache):
softmax(q·kᵀ/sqrt(d) + mask) with q, k after rotary embedding, a causal mask limited to the
sliding window (key > query - window) where the configuration sets one.
"""
import json
import math
import os

import numpy as np

import stfile


def load(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    weights = {}
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    for name in files:
        tensors, _ = stfile.read(os.path.join(model_dir, name))
        weights.update({k: v.astype(np.float64) for k, v in tensors.items()})
    return cfg, weights


def inverse_frequencies(cfg):
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    theta = cfg.get("rope_theta", 10000.0)
    inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        out = []
        for f in inv:
            wavelength = 2 * math.pi / f
            if wavelength < old / hi:          # high frequency: unchanged
                out.append(f)
            elif wavelength > old / lo:        # low frequency: slowed down by `factor`
                out.append(f / factor)
            else:                              # in between: interpolate
                s = (old / wavelength - lo) / (hi - lo)
                out.append((1 - s) * f / factor + s * f)
        inv = np.array(out)
    return inv


def rope_bands(cfg):
    """For llama3 scaling: how many frequencies fall in the high, medium and low bands."""
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    s = cfg["rope_scaling"]
    inv = 1.0 / cfg.get("rope_theta", 10000.0) ** (np.arange(0, d, 2, dtype=np.float64) / d)
    wl = 2 * math.pi / inv
    old = s["original_max_position_embeddings"]
    high = int((wl < old / s["high_freq_factor"]).sum())
    low = int((wl > old / s["low_freq_factor"]).sum())
    return high, len(wl) - high - low, low


def window_of(cfg, layer):
    t = cfg["model_type"]
    if t == "mistral":
        return cfg.get("sliding_window") or 0
    if t in ("qwen2", "qwen3") and cfg.get("use_sliding_window") and layer >= cfg.get("max_window_layers", 0):
        return cfg.get("sliding_window") or 0
    return 0


def rms_norm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def rotate(x, positions, inv):
    # pairs (i, i + d/2) rotate by angle position * inv_freq[i]
    ang = np.outer(positions, inv)                  # (T, d/2)
    cos, sin = np.cos(ang), np.sin(ang)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def forward(model_dir, ids, hidden=None, ablate=None, mean_rows=None):
    """hidden: layer -> bool [heads, T, T] (True: the key is hidden from the row) or None;
    ablate: {(layer, head): "zero" | "mean"}, a mean over rows [0, mean_rows) (the prompt)."""
    cfg, w = load(model_dir)
    T = len(ids)
    H, KV = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    d = cfg.get("head_dim") or cfg["hidden_size"] // H
    eps = cfg.get("rms_norm_eps", 1e-6)
    inv = inverse_frequencies(cfg)
    pos = np.arange(T, dtype=np.float64)
    x = w["model.embed_tokens.weight"][np.array(ids)]
    attentions = []
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)

        def proj(name):
            y = h @ w[p + f"self_attn.{name}.weight"].T
            b = w.get(p + f"self_attn.{name}.bias")
            return y + b if b is not None else y

        q = proj("q_proj").reshape(T, H, d).transpose(1, 0, 2)
        k = proj("k_proj").reshape(T, KV, d).transpose(1, 0, 2)
        v = proj("v_proj").reshape(T, KV, d).transpose(1, 0, 2)
        if p + "self_attn.q_norm.weight" in w:  # Qwen3: each head's q and k RMS-normalized over head_dim
            q = rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
            k = rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
        q, k = rotate(q, pos, inv), rotate(k, pos, inv)
        k = np.repeat(k, H // KV, axis=0)
        v = np.repeat(v, H // KV, axis=0)
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        qi, kj = np.arange(T)[:, None], np.arange(T)[None, :]
        allowed = kj <= qi
        win = window_of(cfg, layer)
        if win:
            allowed &= kj > qi - win
        mask = hidden(layer) if hidden is not None else None
        allowed = allowed[None] if mask is None else allowed[None] & ~mask
        scores = np.where(allowed, scores, -np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        e = np.exp(scores)
        a = e / e.sum(axis=-1, keepdims=True)
        attentions.append(a)
        o = a @ v  # (heads, T, d)
        for (al, ah), kind in (ablate or {}).items():
            if al == layer:
                o[ah] = 0 if kind == "zero" else o[ah, :mean_rows].mean(axis=0)
        o = o.transpose(1, 0, 2).reshape(T, H * d)
        o = o @ w[p + "self_attn.o_proj.weight"].T
        if p + "self_attn.o_proj.bias" in w:
            o = o + w[p + "self_attn.o_proj.bias"]
        x = x + o
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        up = h @ w[p + "mlp.up_proj.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T, attentions
