"""The engine's logits and captured attention against an independent numpy forward pass."""
import numpy as np
import pytest

import checkpoint
import reference

PROMPT = [1, 17, 42, 99, 7, 23, 64, 5, 88, 31, 12, 77]
NEW = 6
TOL = 1e-5  # float32 engine vs float64 reference, absolute


def check_against_reference(model_dir, run):
    cfg = checkpoint.VARIANTS[[v for v in checkpoint.VARIANTS if model_dir.rstrip("/").split("/")[-1].startswith(v)][0]]
    H = cfg["num_attention_heads"]
    seq = run.prompt + run.tokens[:-1]
    ref_logits, ref_attn = reference.forward(model_dir, seq)
    P = len(run.prompt)
    # Logits that chose each generated token: positions P-1 .. T-1.
    logits = run.t["logits"]
    diff = np.abs(logits - ref_logits[P - 1:]).max()
    print(f"max |logits - reference| = {diff:.2e}")
    assert diff < TOL
    # Greedy tokens follow the reference's argmax.
    assert run.tokens == [int(i) for i in ref_logits[P - 1:].argmax(-1)]
    for layer, ref in enumerate(ref_attn):
        got = run.full_attention(layer, H)
        assert not np.isnan(got).any(), f"layer {layer}: rows missing from the capture"
        diff = np.abs(got - ref).max()
        print(f"layer {layer}: max |attention - reference| = {diff:.2e}")
        assert diff < TOL
        # Rows sum to one, and masked entries (above the diagonal, outside the window) are exactly 0.
        np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
        assert np.all(got[ref == 0.0] == 0.0)
        # The weights are informative: neither uniform nor one-hot.
        rows = ref[:, P:, :]
        ent = -(np.where(rows > 0, rows * np.log(np.where(rows > 0, rows, 1)), 0)).sum(-1)
        norm = ent / np.log(np.arange(P + 1, P + rows.shape[1] + 1))[None, :]
        assert 0.15 < norm.mean() < 0.95, norm.mean()


@pytest.mark.parametrize("variant", sorted(checkpoint.VARIANTS))
def test_matches_reference(variant, make_checkpoint, run_engine):
    model = make_checkpoint(variant)
    run = run_engine(model, PROMPT, NEW, extra=["--logits"])
    assert len(run.tokens) == NEW
    check_against_reference(model, run)


def test_llama3_rope_exercises_all_three_bands():
    high, medium, low = reference.rope_bands(checkpoint.VARIANTS["llama31_gqa"])
    assert high > 0 and medium > 0 and low > 0, (high, medium, low)


def test_sharded_checkpoint_loads_identically(make_checkpoint, run_engine):
    single = run_engine(make_checkpoint("llama31_gqa"), PROMPT, NEW, extra=["--logits"])
    sharded = run_engine(make_checkpoint("llama31_gqa", shards=3), PROMPT, NEW, extra=["--logits"])
    assert single.tokens == sharded.tokens
    np.testing.assert_array_equal(single.t["logits"], sharded.t["logits"])


@pytest.mark.parametrize("variant", ["llama31_gqa", "mistral_hd"])
def test_capture_does_not_change_tokens(variant, make_checkpoint, run_engine):
    model = make_checkpoint(variant)
    on = run_engine(model, PROMPT, 10)
    off = run_engine(model, PROMPT, 10, out=False, extra=["--form=none"])
    assert on.summary["capture_bytes"] > 0 and off.summary["capture_bytes"] == 0
    assert on.tokens == off.tokens


def test_query_block_size_does_not_change_results(make_checkpoint, run_engine):
    model = make_checkpoint("mistral_hd")
    a = run_engine(model, PROMPT, NEW, extra=["--logits", "--query_block=128"])
    b = run_engine(model, PROMPT, NEW, extra=["--logits", "--query_block=5", "--block_elements=150"])
    assert a.tokens == b.tokens
    for layer in range(2):
        np.testing.assert_allclose(a.full_attention(layer, 4), b.full_attention(layer, 4), atol=1e-6, rtol=0)


def test_bfloat16_compute_is_close(make_checkpoint, run_engine):
    """bfloat16 compute against the float64 reference: tolerance stated, not hidden."""
    model = make_checkpoint("llama31_gqa")
    run = run_engine(model, PROMPT, 1, extra=["--dtype=bfloat16", "--phases=prefill"])
    _, ref = reference.forward(model, PROMPT)
    worst = max(np.abs(run.full_attention(l, 4) - ref[l]).max() for l in range(len(ref)))
    print(f"bfloat16 compute: max |attention - reference| = {worst:.3e}")
    assert worst < 0.05


def test_seeded_sampling_is_reproducible(make_checkpoint, run_engine):
    model = make_checkpoint("llama_mha")
    args = ["--temperature=1.5", "--top_k=20", "--top_p=0.9"]
    a = run_engine(model, PROMPT, 12, out=False, extra=args + ["--seed=7"])
    b = run_engine(model, PROMPT, 12, out=False, extra=args + ["--seed=7"])
    c = run_engine(model, PROMPT, 12, out=False, extra=args + ["--seed=8"])
    greedy = run_engine(model, PROMPT, 12, out=False, extra=[])
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens  # the seed matters
    assert a.tokens != greedy.tokens  # and sampling is not greedy
