"""Captured attention and logits of attnscope-run against eager transformers itself, on every
checkpoint variant of tests/tools/checkpoint.py (Llama 2 MHA, Llama 3.1 GQA with rope scaling, Qwen2
tied embeddings and sliding window, Mistral with a wider head, Qwen3 q/k norms, bfloat16, float16).
Run by the project venv's Python (CTest entry peer_tests): transformers computes one forward pass
over prompt + generated tokens with attn_implementation="eager" and output_attentions, which is the
prototype's definition of the attention weights. float32 (also the float16 checkpoint, computed in
float32 on both sides: the engine refuses float16 compute on the CPU): within 1e-5 of transformers.
bfloat16: measured against the float64 reference (tests/tools/reference.py) beside transformers' own
bfloat16 run. Layer 0 sees the same bfloat16 inputs on both sides (the embedding rows), so there
attnscope is no further from float64 than transformers; deeper layers read each side's own rounded
residual stream (the same rounding points, different summation orders), so there the bound is the
larger of 1.5x transformers' error, in the maximum and in the root mean square."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import checkpoint
import reference

PROMPT = [1, 17, 42, 99, 7, 23, 64, 5, 88, 31, 12, 77]
NEW = 6
VARIANTS = ["llama_mha", "llama31_gqa", "qwen2_tied", "qwen2_swa", "mistral_hd", "qwen3_qknorm",
            "llama_bf16", "qwen2_f16"]
TORCH_TYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def transformers_forward(model_dir, seq, dtype):
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", torch_dtype=dtype)
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([seq]), output_attentions=True, use_cache=False)
    logits = out.logits[0].to(torch.float64).numpy()
    attn = [a[0].to(torch.float64).numpy() for a in out.attentions]
    return logits, attn


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_eager_transformers(variant, make_checkpoint, run_engine):
    model_dir = make_checkpoint(variant)
    cfg = checkpoint.VARIANTS[variant]
    dtype = "bfloat16" if cfg.get("torch_dtype") == "bfloat16" else "float32"
    run = run_engine(model_dir, PROMPT, NEW, extra=["--logits", "--form=dense", f"--dtype={dtype}"])
    seq = run.prompt + run.tokens[:-1]
    P = len(run.prompt)
    heads = cfg["num_attention_heads"]
    got = [run.full_attention(layer, heads) for layer in range(cfg["num_hidden_layers"])]
    tf_logits, tf_attn = transformers_forward(model_dir, seq, TORCH_TYPES[dtype])
    if dtype == "float32":
        # Greedy tokens are transformers' argmax; logits and every attention weight within 1e-5.
        assert run.tokens == [int(i) for i in tf_logits[P - 1:].argmax(-1)]
        diff = np.abs(run.t["logits"] - tf_logits[P - 1:]).max()
        print(f"{variant}: max |logits - transformers| = {diff:.2e}")
        assert diff < 1e-5
        for layer, (a, b) in enumerate(zip(got, tf_attn)):
            diff = np.abs(a - b).max()
            print(f"{variant} layer {layer}: max |attention - transformers| = {diff:.2e}")
            assert diff < 1e-5
        return
    # Half types: both runs against the float64 reference over the same tokens.
    _, ref_attn = reference.forward(model_dir, seq)
    for layer, (a, b, ref) in enumerate(zip(got, tf_attn, ref_attn)):
        ours, theirs = np.abs(a - ref).max(), np.abs(b - ref).max()
        ours_rms, theirs_rms = np.sqrt(((a - ref) ** 2).mean()), np.sqrt(((b - ref) ** 2).mean())
        print(f"{variant} layer {layer}: |attention - float64| max / rms: attnscope {ours:.2e} / "
              f"{ours_rms:.2e}, transformers {theirs:.2e} / {theirs_rms:.2e}")
        bound = 1.0 if layer == 0 else 1.5
        assert ours <= bound * theirs, (layer, ours, theirs)
        assert ours_rms <= bound * theirs_rms, (layer, ours_rms, theirs_rms)


@pytest.mark.parametrize("variant", ["llama_mha", "llama31_gqa", "qwen2_swa", "mistral_hd"])
def test_statistics_match_eager_transformers(variant, make_checkpoint, run_engine):
    """The prefill's statistics (on libtorch 2.x computed inside the fused attention pass: row
    entropy, sink and local mass, key score) against the same statistics of transformers' eager
    attention weights, within 1e-5."""
    model_dir = make_checkpoint(variant)
    cfg = checkpoint.VARIANTS[variant]
    sink, local, window = 2, 3, 4
    run = run_engine(model_dir, PROMPT, 1, extra=[
        "--form=none", f"--stats=row_entropy,sink_mass:{sink},local_mass:{local},key_score:{window}"])
    P = len(PROMPT)
    _, tf_attn = transformers_forward(model_dir, PROMPT, torch.float32)
    back = np.arange(P)[:, None] - np.arange(P)[None, :]  # position - key
    for layer, a in enumerate(tf_attn):  # a: (heads, P, P)
        want = {
            "row_entropy": -(a * np.log(np.where(a > 0, a, 1.0))).sum(-1),
            "sink_mass": a[:, :, :sink].sum(-1),
            "local_mass": (a * ((back >= 0) & (back < local))).sum(-1),
            "key_score": a[:, P - window:, :].sum(1),
        }
        for kind, w in want.items():
            blocks = sorted(run.blocks(kind, "prefill", layer).items())
            got = np.concatenate([v for _, v in blocks], axis=1)
            assert got.shape == w.shape, (kind, got.shape, w.shape)
            diff = np.abs(got - w).max()
            print(f"{variant} layer {layer}: max |{kind} - transformers| = {diff:.2e}")
            assert diff < 1e-5, (kind, layer, diff)
    assert cfg["num_hidden_layers"] == len(tf_attn)
