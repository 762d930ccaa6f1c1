"""Writes tiny random-weight Hugging Face checkpoint folders (config.json + safetensors).

Usage: checkpoint.py VARIANT OUT_DIR [--seed N] [--shards N]
Variants cover what differs between the architectures attnscope serves.
"""
import argparse
import json
import os

import numpy as np

import stfile

# Each variant: config.json fields, plus how weights are stored.
VARIANTS = {
    # Llama with multi-head attention (heads == kv heads).
    "llama_mha": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=128, rope_theta=10000.0,
                      max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2),
    # Llama 3.1 style: GQA and llama3 rope scaling; head_dim 16, theta 10000 and an original context of
    # 64 put wavelengths in all three bands (<16, 16..64, >64).
    "llama31_gqa": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=160, rope_theta=10000.0,
                        max_position_embeddings=1024, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=[2, 3],
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=64)),
    # Qwen2: q/k/v bias, tied embeddings (no lm_head tensor stored).
    "qwen2_tied": dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=150, rope_theta=1000000.0,
                       max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       use_sliding_window=False, sliding_window=4096, max_window_layers=2,
                       bos_token_id=5, eos_token_id=6),
    # Qwen2 with its sliding window switched on for layers >= max_window_layers.
    "qwen2_swa": dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=150, rope_theta=10000.0,
                      max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      use_sliding_window=True, sliding_window=6, max_window_layers=1, eos_token_id=6),
    # Mistral: head_dim (24) != hidden / heads (16), sliding window of 5.
    "mistral_hd": dict(model_type="mistral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=24, vocab_size=128,
                       rope_theta=10000.0, max_position_embeddings=256, rms_norm_eps=1e-5, sliding_window=5,
                       bos_token_id=1, eos_token_id=2),
    # Qwen3: per-head q/k RMSNorm before RoPE, attention_bias (q/k/v and o biases), head_dim (24) !=
    # hidden / heads (16), the sliding window on layers >= max_window_layers.
    "qwen3_qknorm": dict(model_type="qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24, vocab_size=150,
                         rope_theta=1000000.0, max_position_embeddings=512, rms_norm_eps=1e-6,
                         attention_bias=True, tie_word_embeddings=False, use_sliding_window=True,
                         sliding_window=6, max_window_layers=1, eos_token_id=6),
    # Llama with every weight stored as bfloat16.
    "llama_bf16": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128, rope_theta=10000.0,
                       max_position_embeddings=256, rms_norm_eps=1e-5, torch_dtype="bfloat16",
                       bos_token_id=1, eos_token_id=2),
    # Qwen2 layout with every weight stored as float16.
    "qwen2_f16": dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=150, rope_theta=10000.0,
                      max_position_embeddings=512, rms_norm_eps=1e-6, torch_dtype="float16", eos_token_id=6),
}

# Larger random models for benchmarks (not tests).
BENCH_VARIANTS = {
    # Issue-2 throughput benchmark: realistic proportions scaled to a 2-core machine.
    "bench_engine": dict(model_type="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=4, vocab_size=32000, rope_theta=500000.0,
                         max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2),
    # The built-in demo: Llama 3.1 layout and rope scaling, small, paired with the real Llama 3 tokenizer.
    "demo_llama3": dict(model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2, vocab_size=128256, rope_theta=500000.0,
                        max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=128000,
                        eos_token_id=[128001, 128008, 128009], torch_dtype="bfloat16",
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=8192)),
    # Streaming benchmark: many heads, little compute, so that the bytes dominate.
    "bench_stream": dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=4, vocab_size=1000, rope_theta=10000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2),
    # The prototype's job (bench/prototype_job.sh): 4 layers, hidden 256, 8 query / 4 kv heads.
    "bench_prototype": dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=4, vocab_size=32000, rope_theta=500000.0,
                            max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2),
    # Long-context memory benchmark: small model, 32k positions.
    "bench_long": dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, vocab_size=32000, rope_theta=500000.0,
                       max_position_embeddings=40000, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2),
}

# Standard deviation of q/k projections: large enough that attention is clearly non-uniform,
# small enough that it is not one-hot.
QK_SCALE = 0.2


def head_dim(cfg):
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def make_weights(cfg, rng):
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = head_dim(cfg)
    q_dim, kv_dim = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    # q/k/v biases: always in Qwen2; with attention_bias (which adds the o_proj bias too) in Llama and Qwen3.
    config_bias = cfg.get("attention_bias", False) and cfg["model_type"] in ("llama", "qwen3")
    bias = cfg["model_type"] == "qwen2" or config_bias

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    # Tied embeddings double as the LM head: keep them small so logits stay O(1).
    embed_std = 2.0 / np.sqrt(h) if cfg.get("tie_word_embeddings", False) else 1.0
    w = {"model.embed_tokens.weight": normal((vocab, h), embed_std),
         "model.norm.weight": 1.0 + normal((h,), 0.1)}
    if not cfg.get("tie_word_embeddings", False):
        w["lm_head.weight"] = normal((vocab, h), 1.0 / np.sqrt(h))
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = 1.0 + normal((h,), 0.1)
        w[p + "post_attention_layernorm.weight"] = 1.0 + normal((h,), 0.1)
        w[p + "self_attn.q_proj.weight"] = normal((q_dim, h), QK_SCALE)
        w[p + "self_attn.k_proj.weight"] = normal((kv_dim, h), QK_SCALE)
        w[p + "self_attn.v_proj.weight"] = normal((kv_dim, h), 1.0 / np.sqrt(h))
        w[p + "self_attn.o_proj.weight"] = normal((h, q_dim), 1.0 / np.sqrt(q_dim))
        if bias:
            w[p + "self_attn.q_proj.bias"] = normal((q_dim,), 0.5)
            w[p + "self_attn.k_proj.bias"] = normal((kv_dim,), 0.5)
            w[p + "self_attn.v_proj.bias"] = normal((kv_dim,), 0.5)
        if config_bias:
            w[p + "self_attn.o_proj.bias"] = normal((h,), 0.1)
        if cfg["model_type"] == "qwen3":  # RMSNorm weights over head_dim, for q and for k
            w[p + "self_attn.q_norm.weight"] = 1.0 + normal((d,), 0.3)
            w[p + "self_attn.k_norm.weight"] = 1.0 + normal((d,), 0.3)
        w[p + "mlp.gate_proj.weight"] = normal((inter, h), 1.0 / np.sqrt(h))
        w[p + "mlp.up_proj.weight"] = normal((inter, h), 1.0 / np.sqrt(h))
        w[p + "mlp.down_proj.weight"] = normal((h, inter), 1.0 / np.sqrt(inter))
    return w


def write_checkpoint(out_dir, cfg, weights, dtype="F32", shards=1):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    eos = cfg.get("eos_token_id")
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos, "bos_token_id": cfg.get("bos_token_id")}, f)
    names = list(weights)
    if shards <= 1:
        stfile.write(os.path.join(out_dir, "model.safetensors"), {n: (weights[n], dtype) for n in names},
                     metadata={"format": "pt"})
        return
    weight_map = {}
    per = (len(names) + shards - 1) // shards
    for s in range(shards):
        part = names[s * per:(s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        stfile.write(os.path.join(out_dir, fname), {n: (weights[n], dtype) for n in part}, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def make(variant, out_dir, seed=0, shards=1, vocab_size=None):
    cfg = dict(VARIANTS.get(variant) or BENCH_VARIANTS[variant])
    if vocab_size:
        cfg["vocab_size"] = vocab_size
    rng = np.random.default_rng(seed)
    weights = make_weights(cfg, rng)
    dtype = {"bfloat16": "BF16", "float16": "F16"}.get(cfg.get("torch_dtype"), "F32")
    write_checkpoint(out_dir, cfg, weights, dtype=dtype, shards=shards)
    return out_dir


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("variant", choices=sorted(VARIANTS) + sorted(BENCH_VARIANTS))
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--vocab_size", type=int, default=0, help="override (to match a real tokenizer)")
    a = ap.parse_args()
    make(a.variant, a.out_dir, a.seed, a.shards, a.vocab_size or None)
