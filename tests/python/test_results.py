"""Arrays, not blocks (issue 15): every form and statistic assembled per layer, from a stream and from
a stored file through the same code, checked against the dense capture reduced independently here
(numpy), and the round trip through save()/load()."""
import subprocess

import numpy as np
import pytest

from conftest import BUILD, binary
from service_fixture import Server, setup_paths

setup_paths(BUILD)
import attnscope  # noqa: E402

PROMPT = [(i * 37 + 11) % 150 + 1 for i in range(41)]  # 41 tokens: blocks and tiles do not divide it
NEW = 6
T = len(PROMPT) + NEW - 1


@pytest.fixture(scope="module")
def model(make_checkpoint):
    return make_checkpoint("llama31_gqa")  # 3 layers, 4 heads


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    s = Server(binary("attnscope-server"), model, "--query_block=16",
               log_path=str(tmp_path_factory.mktemp("log") / "server.log"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    c = attnscope.Client(server.target)
    yield c
    c.close()


def run(client, **capture):
    return client.stream_attention(token_ids=PROMPT, max_new_tokens=NEW, ignore_eos=True, **capture)


@pytest.fixture(scope="module")
def dense(client):
    r = run(client, form="dense", row_entropy=True, sink_tokens=2, local_window=3, key_score_window=4,
            key_score_variance=True)
    assert len({k[3] for k in r.attention if k[0] == "prefill"}) > 1, "the prompt should span several blocks"
    return r


def tiles(a, p, op):
    H, n, _ = a.shape
    m = -(-n // p)
    out = np.zeros((H, m, m))
    for i in range(m):
        for j in range(m):
            t = a[:, i * p:(i + 1) * p, j * p:(j + 1) * p]
            out[:, i, j] = t.max(axis=(1, 2)) if op == "max" else t.mean(axis=(1, 2))
    return out


def test_dense_assembles_prefill_and_decode(dense):
    for layer in (0, 2):
        a = dense.attention(layer)
        assert a.shape == (4, T, T) and a.dtype == np.float32
        np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)
        assert np.all(np.triu(a, 1) == 0)
        np.testing.assert_array_equal(dense.positions(layer), np.arange(T))
        # The decode rows are the streamed rows, placed at their positions.
        step1 = dense.attention[("decode", 1, layer, len(PROMPT))]
        np.testing.assert_array_equal(a[:, len(PROMPT), :len(PROMPT) + 1], step1[:, 0])
        assert dense.attention(layer, "prefill").shape == (4, len(PROMPT), len(PROMPT))
        assert dense.attention(layer, "decode").shape == (4, NEW - 1, T)


@pytest.mark.parametrize("form,check", [
    ("head_mean", lambda a: a.mean(0, keepdims=True)),
    ("head_max", lambda a: a.max(0, keepdims=True)),
    ("pooled_mean", lambda a: tiles(a, 8, "mean")),
    ("pooled_max", lambda a: tiles(a, 8, "max")),
])
def test_reduced_forms_match_the_dense_capture_reduced_here(client, dense, form, check):
    kw = dict(form="pooled", pool=8, pool_op=form.split("_")[1]) if form.startswith("pooled") else dict(form=form)
    r = run(client, **kw)
    for layer in range(3):
        got = r.attention(layer)
        want = check(dense.attention(layer).astype(np.float64))
        assert got.shape == want.shape, (got.shape, want.shape)
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    if form.startswith("pooled"):
        np.testing.assert_array_equal(r.positions(0), np.arange(0, T, 8))


def test_top_k_values_and_indices(client, dense):
    r = run(client, form="top_k", capture_top_k=3)
    for layer in range(3):
        values, idx = r.attention(layer), r.indices(layer)
        full = dense.attention(layer)
        assert values.shape == idx.shape == (4, T, 3)
        np.testing.assert_allclose(np.take_along_axis(full, np.maximum(idx, 0), -1), values, atol=1e-6)
        np.testing.assert_allclose(values, -np.sort(-full, -1)[..., :3], atol=1e-6)
        assert np.all(idx[:, 0, 1:] == -1) or np.all(values[:, 0, 1:] == 0)  # row 0 has one key


def test_selected_rows_keep_their_positions(client, dense):
    r = run(client, form="dense", last_queries=3)
    pos = r.positions(1)
    assert list(pos[:3]) == [len(PROMPT) - 3, len(PROMPT) - 2, len(PROMPT) - 1]
    np.testing.assert_array_equal(r.attention(1), dense.attention(1)[:, pos, :])


def test_statistics_assemble_with_positions(dense):
    a = dense.attention(1).astype(np.float64)
    pos, ent = dense.statistic("row_entropy", 1)
    np.testing.assert_array_equal(pos, np.arange(T))
    with np.errstate(divide="ignore", invalid="ignore"):
        want = -np.nansum(np.where(a > 0, a * np.log(a), 0), -1)
    np.testing.assert_allclose(ent, want, atol=1e-5)
    pos, sink = dense.statistic("sink_mass", 1)
    np.testing.assert_allclose(sink, a[:, :, :2].sum(-1), atol=1e-5)
    pos, score = dense.statistic("key_score", 1)
    np.testing.assert_array_equal(pos, np.arange(len(PROMPT)))
    P = len(PROMPT)
    np.testing.assert_allclose(score, a[:, P - 4:P, :P].sum(1), atol=1e-5)
    pos, var = dense.statistic("key_score_variance", 1)
    assert var.shape == (4, P)
    with pytest.raises(KeyError, match="statistics: key_score"):
        dense.statistic("no_such_kind", 1)
    table = dense.statistics_table()
    assert set(table["kind"]) == {"row_entropy", "sink_mass", "local_mass", "key_score", "key_score_variance"}
    assert len(table[(table.kind == "row_entropy") & (table.layer == 1)]) == 4 * T
    assert "token" in table.columns


def test_save_load_and_the_capture_clients_file_read_the_same(server, dense, tmp_path):
    dense.save(tmp_path / "s.safetensors")
    s = attnscope.load(tmp_path / "s.safetensors")
    assert s.form == "dense" and s.layers == [0, 1, 2]
    for layer in range(3):
        np.testing.assert_array_equal(s.attention(layer), dense.attention(layer))
    np.testing.assert_array_equal(s.statistic("row_entropy", 2)[1], dense.statistic("row_entropy", 2)[1])
    dense.save(tmp_path / "s.pkl")
    np.testing.assert_array_equal(attnscope.load(tmp_path / "s.pkl").attention(0), dense.attention(0))
    out = tmp_path / "capture"
    p = subprocess.run([binary("attnscope-capture"), f"--server={server.target}", f"--output_dir={out}",
                        "--prompt_ids=" + ",".join(map(str, PROMPT)), f"--max_new_tokens={NEW}", "--save_attention",
                        "--form=pooled:8", "--stats=entropy"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    stored = attnscope.load(out / "attention_sample_0.safetensors")
    assert stored.form == "pooled" and stored.pool == 8
    np.testing.assert_allclose(stored.attention(1), tiles(dense.attention(1).astype(np.float64), 8, "mean"),
                               atol=2e-6)
    np.testing.assert_allclose(stored.statistic("row_entropy", 1)[1], dense.statistic("row_entropy", 1)[1],
                               atol=1e-6)
    xa = stored.to_xarray(1)
    assert xa.dims == ("head", "query", "key") and list(xa.coords["query"].values[:2]) == [0, 8]
