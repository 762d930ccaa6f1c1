"""Every capture form and statistic against the same quantity computed from the dense matrix of
the independent reference (float64 numpy), to 1e-5."""
import subprocess

import numpy as np
import pytest

import reference
from conftest import binary

PROMPT = [1, 17, 42, 99, 7, 23, 64, 5, 88, 31, 12, 77, 3, 9]  # 14 tokens
NEW = 5
TOL = 1e-5
H = 4


@pytest.fixture(scope="module")
def model(make_checkpoint):
    return make_checkpoint("llama31_gqa")


@pytest.fixture(scope="module")
def dense_ref(model, run_engine):
    """(run with greedy tokens, reference attention per layer [H, T, T])."""
    run = run_engine(model, PROMPT, NEW, out=False, extra=["--form=none"])
    _, attn = reference.forward(model, PROMPT + run.tokens[:-1])
    return run.tokens, attn


def rows_of(ref_layer, phase, step=None):
    """Reference rows as the engine hands them out: prefill [H, P, P]; decode step t [H, 1, P+t]."""
    P = len(PROMPT)
    if phase == "prefill":
        return ref_layer[:, :P, :P]
    r = P + step - 1
    return ref_layer[:, r:r + 1, :r + 1]


def concat_prefill(blocks):
    """Prefill blocks {(0, query_begin): array [., m, .]} joined along the rows, plus the row starts."""
    keys = sorted(blocks)
    return np.concatenate([blocks[k] for k in keys], axis=1), [k[1] for k in keys]


def test_dense_heads_and_last_queries(model, run_engine, dense_ref):
    tokens, ref = dense_ref
    run = run_engine(model, PROMPT, NEW, extra=["--heads=3,1", "--rows=last:5", "--query_block=4"])
    assert run.tokens == tokens
    P = len(PROMPT)
    for layer in range(3):
        got, starts = concat_prefill(run.blocks("attention", "prefill", layer))
        assert starts[0] == P - 5 and got.shape == (2, 5, P)
        np.testing.assert_allclose(got, ref[layer][[3, 1], P - 5:P, :P], atol=TOL, rtol=0)
        for t in range(1, NEW):
            blk = run.blocks("attention", "decode", layer)[(t, P + t - 1)]
            np.testing.assert_allclose(blk, rows_of(ref[layer], "decode", t)[[3, 1]], atol=TOL, rtol=0)


def test_query_ranges(model, run_engine, dense_ref):
    _, ref = dense_ref
    run = run_engine(model, PROMPT, NEW, extra=["--rows=9:12,0:3", "--phases=prefill", "--query_block=4"])
    blocks = run.blocks("attention", "prefill", 1)
    got_rows = {}
    for (_, qb), blk in blocks.items():
        for i in range(blk.shape[1]):
            got_rows[qb + i] = blk[:, i]
    assert sorted(got_rows) == [0, 1, 2, 9, 10, 11]
    for r, row in got_rows.items():
        np.testing.assert_allclose(row, ref[1][:, r, :len(PROMPT)], atol=TOL, rtol=0)
    assert not run.blocks("attention", "decode", 1)


@pytest.mark.parametrize("form,reduce", [("head_mean", np.mean), ("head_max", np.max)])
def test_head_reductions(model, run_engine, dense_ref, form, reduce):
    _, ref = dense_ref
    run = run_engine(model, PROMPT, NEW, extra=[f"--form={form}", "--heads=0,2,3"])
    for layer in range(3):
        got, _ = concat_prefill(run.blocks("attention", "prefill", layer))
        np.testing.assert_allclose(got, reduce(rows_of(ref[layer], "prefill")[[0, 2, 3]], axis=0, keepdims=True),
                                   atol=TOL, rtol=0)
        for t in range(1, NEW):
            blk = run.blocks("attention", "decode", layer)[(t, len(PROMPT) + t - 1)]
            want = reduce(rows_of(ref[layer], "decode", t)[[0, 2, 3]], axis=0, keepdims=True)
            np.testing.assert_allclose(blk, want, atol=TOL, rtol=0)


def pool(a, p, op):
    """p×p tiles of [H, R, K] starting at (0, 0); edge tiles reduce what they cover."""
    Hh, R, K = a.shape
    out = np.zeros((Hh, -(-R // p), -(-K // p)))
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            tile = a[:, i * p:(i + 1) * p, j * p:(j + 1) * p]
            out[:, i, j] = tile.mean(axis=(1, 2)) if op == "mean" else tile.max(axis=(1, 2))
    return out


@pytest.mark.parametrize("op", ["mean", "max"])
def test_pooled(model, run_engine, dense_ref, op):
    _, ref = dense_ref
    p = 4
    # query_block 10 becomes 8 so that no tile is split between blocks.
    run = run_engine(model, PROMPT, NEW, extra=[f"--form=pooled:{p}:{op}", "--query_block=10"])
    # An element budget small enough to force one tile row per block: tiles still whole.
    small = run_engine(model, PROMPT, NEW, extra=[f"--form=pooled:{p}:{op}",
                                                  "--block_elements=100"])
    assert small.t.keys() != run.t.keys()
    for layer in range(3):
        a, _ = concat_prefill(run.blocks("attention", "prefill", layer))
        b, starts = concat_prefill(small.blocks("attention", "prefill", layer))
        assert starts == list(range(0, len(PROMPT), p))
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    for layer in range(3):
        got, starts = concat_prefill(run.blocks("attention", "prefill", layer))
        assert all(s % p == 0 for s in starts), starts
        np.testing.assert_allclose(got, pool(rows_of(ref[layer], "prefill"), p, op), atol=TOL, rtol=0)
        for t in range(1, NEW):
            blk = run.blocks("attention", "decode", layer)[(t, len(PROMPT) + t - 1)]
            np.testing.assert_allclose(blk, pool(rows_of(ref[layer], "decode", t), p, op), atol=TOL, rtol=0)


def test_top_k(model, run_engine, dense_ref):
    _, ref = dense_ref
    k = 3
    run = run_engine(model, PROMPT, NEW, extra=[f"--form=top_k:{k}"])
    P = len(PROMPT)
    for layer in range(3):
        name = f"attention.prefill.{layer}.0.0"
        values, idx = run.t[name], run.t[name + ".indices"]
        dense = rows_of(ref[layer], "prefill")
        want = -np.sort(-dense, axis=-1)[..., :k]
        np.testing.assert_allclose(values, want, atol=TOL, rtol=0)
        # The indices point at those values (ties aside).
        np.testing.assert_allclose(np.take_along_axis(dense, idx.astype(np.int64), -1), values, atol=TOL, rtol=0)
        assert idx.dtype == np.int32 and idx.max() < P


def entropy(a):
    return -(np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0)), 0.0)).sum(-1)


def test_statistics(model, run_engine, dense_ref):
    _, ref = dense_ref
    P = len(PROMPT)
    W, K, L = 4, 2, 3
    run = run_engine(model, PROMPT, NEW, extra=[
        "--form=none", f"--stats=row_entropy,key_score:{W},sink_mass:{K},local_mass:{L},key_score_variance", "--query_block=5"])
    assert not [n for n in run.t if n.startswith("attention.")]
    for layer in range(3):
        a = ref[layer]
        pre = rows_of(a, "prefill")
        ent = np.concatenate([v for _, v in sorted(run.blocks("row_entropy", "prefill", layer).items())], axis=1)
        np.testing.assert_allclose(ent, entropy(pre), atol=TOL, rtol=0)
        sink = np.concatenate([v for _, v in sorted(run.blocks("sink_mass", "prefill", layer).items())], axis=1)
        np.testing.assert_allclose(sink, pre[..., :K].sum(-1), atol=TOL, rtol=0)
        local = np.concatenate([v for _, v in sorted(run.blocks("local_mass", "prefill", layer).items())], axis=1)
        want_local = np.stack([pre[:, i, max(0, i - L + 1):i + 1].sum(-1) for i in range(P)], axis=1)
        np.testing.assert_allclose(local, want_local, atol=TOL, rtol=0)
        # SnapKV / H2O key score: attention each prompt key receives from the last W prompt queries.
        score = run.blocks("key_score", "prefill", layer)[(0, 0)]
        np.testing.assert_allclose(score, pre[:, P - W:, :].sum(1), atol=TOL, rtol=0)
        # Decode rows: entropy per step.
        for t in range(1, NEW):
            e = run.blocks("row_entropy", "decode", layer)[(t, P + t - 1)]
            np.testing.assert_allclose(e[:, 0], entropy(rows_of(a, "decode", t)[:, 0]), atol=TOL, rtol=0)
            row = rows_of(a, "decode", t)[:, 0]
            loc = run.blocks("local_mass", "decode", layer)[(t, P + t - 1)]
            np.testing.assert_allclose(loc[:, 0], row[:, P + t - L:].sum(-1), atol=TOL, rtol=0)
        # Temporal variance over decode steps of the attention each prompt key receives.
        var = run.blocks("key_score_variance", "decode", layer)[(NEW - 1, 0)]
        steps = np.stack([a[:, P + t - 1, :P] for t in range(1, NEW)], axis=0)
        np.testing.assert_allclose(var, steps.var(axis=0), atol=TOL, rtol=0)


@pytest.mark.parametrize("extra", [[], ["--heads=3,1"], ["--fast_attention=false"]],
                         ids=["all_heads", "two_heads", "explicit"])
def test_decode_statistics_without_probabilities(model, run_engine, dense_ref, extra):
    """Decode rows' statistics with no form and no key-score variance: on the fused path the
    attention pass computes them (CpuFlashAttention, no probabilities recomputed); the explicit
    path from its probabilities. Both against the float64 reference, for the selected heads."""
    _, ref = dense_ref
    P = len(PROMPT)
    K, L = 2, 3
    heads = [3, 1] if "--heads=3,1" in extra else list(range(H))
    run = run_engine(model, PROMPT, NEW, extra=["--form=none", f"--stats=row_entropy,sink_mass:{K},local_mass:{L}",
                                                *extra])
    for layer in range(3):
        for t in range(1, NEW):
            row = rows_of(ref[layer], "decode", t)[heads, 0]  # [heads, P + t]
            key = (t, P + t - 1)
            np.testing.assert_allclose(run.blocks("row_entropy", "decode", layer)[key][:, 0], entropy(row),
                                       atol=TOL, rtol=0)
            np.testing.assert_allclose(run.blocks("sink_mass", "decode", layer)[key][:, 0], row[:, :K].sum(-1),
                                       atol=TOL, rtol=0)
            np.testing.assert_allclose(run.blocks("local_mass", "decode", layer)[key][:, 0],
                                       row[:, P + t - L:].sum(-1), atol=TOL, rtol=0)


def test_element_types(model, run_engine, dense_ref):
    _, ref = dense_ref
    for et, tol in [("float16", 1e-3), ("bfloat16", 4e-3)]:
        run = run_engine(model, PROMPT, 2, extra=[f"--element_type={et}", "--phases=prefill"])
        got = run.t["attention.prefill.2.0.0"]
        np.testing.assert_allclose(got, rows_of(ref[2], "prefill"), atol=tol, rtol=0)


@pytest.mark.parametrize("flags,message", [
    (["--element_type=float64"], "--element_type: 'float64' is not float32, float16 or bfloat16"),
    (["--phases=prefil"], "--phases: 'prefil' is not prefill or decode"),
    (["--form=pooled"], "is pooled:P or pooled:P:mean|max"),
    (["--form=top_k:0"], "must be at least 1"),
    (["--stats=row_entropy,perplexity"], "'perplexity' is not one of row_entropy, sink_mass:K"),
    (["--rows=last:x"], "is not an integer"),
])
def test_run_refuses_malformed_spec_flags(model, flags, message):
    """attnscope-run speaks attnscope-capture's dialect: a misspelling is an error, never a default."""
    proc = subprocess.run([binary("attnscope-run"), f"--model_dir={model}", "--prompt_ids=1,2", "--max_new_tokens=1",
                           *flags], capture_output=True, text=True)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_run_reports_the_spec_in_the_dialect(model, run_engine):
    run = run_engine(model, PROMPT, 2, out=False, extra=["--form=pooled:4:max", "--stats=sink_mass:2,row_entropy",
                                                         "--layers=1", "--rows=last:3", "--element_type=bfloat16"])
    assert run.summary["capture"] == ("pooled:4:max stats=row_entropy,sink_mass:2 layers=1 phases=prefill,decode "
                                      "rows=last:3 element_type=bfloat16")
