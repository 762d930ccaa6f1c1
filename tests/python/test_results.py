"""Arrays, not blocks (issue 15): every form and statistic assembled per layer, from a stream and from
a stored file through the same code, checked against the dense capture reduced independently here
(numpy), and the round trip through save()/load()."""
import subprocess

import grpc
import numpy as np
import pytest

from conftest import BUILD, ROOT, binary, need_reference
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
    r = run(client, form="dense", row_entropy=True, sink_mass=2, local_mass=3, key_score=4,
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
                        "--form=pooled:8", "--stats=row_entropy"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    stored = attnscope.load(out / "attention_sample_0.safetensors")
    assert stored.form == "pooled" and stored.pool == 8
    np.testing.assert_allclose(stored.attention(1), tiles(dense.attention(1).astype(np.float64), 8, "mean"),
                               atol=2e-6)
    np.testing.assert_allclose(stored.statistic("row_entropy", 1)[1], dense.statistic("row_entropy", 1)[1],
                               atol=1e-6)
    xa = stored.to_xarray(1)
    assert xa.dims == ("head", "query", "key") and list(xa.coords["query"].values[:2]) == [0, 8]


FORMS = {"dense": dict(form="dense"), "head_mean": dict(form="head_mean"), "pooled": dict(form="pooled", pool=8),
         "top_k": dict(form="top_k", capture_top_k=3), "last_rows": dict(form="dense", last_queries=4)}


@pytest.mark.parametrize("name", sorted(FORMS))
def test_every_form_has_a_picture(client, tmp_path, name):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    from attnscope import view
    r = run(client, **FORMS[name])
    images = []
    for layer, head in ((0, 0), (2, 1)):
        fig = view.heatmap(r, layer, head)
        fig.savefig(tmp_path / f"{layer}.png", dpi=60)
        images.append(mpimg.imread(tmp_path / f"{layer}.png"))
        assert images[-1].std() > 0.01, f"{name} is blank"
    assert not np.array_equal(images[0], images[1])
    fig = view.compare_heads(r, 1)
    assert len(fig.axes) >= 1
    import matplotlib.pyplot as plt
    plt.close("all")


def test_every_statistic_has_a_picture(dense, tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    from attnscope import view
    for kind in dense.statistic_kinds:
        for fig in (view.statistic_overview(dense, kind), view.statistic_positions(dense, kind, 1)):
            fig.savefig(tmp_path / "s.png", dpi=50)
            matplotlib.pyplot.close(fig)
    fig = view.statistics_figure(dense)
    assert len(fig.axes) >= 2 * len(dense.statistic_kinds)
    matplotlib.pyplot.close("all")


def test_viewer_cli_opens_the_first_sample_like_the_prototype(server, tmp_path):
    import os
    import sys
    data = tmp_path / "attention_data"
    for extra in (["--form=none", "--stats=row_entropy,sink_mass:2"], ["--form=pooled:8"]):
        p = subprocess.run([binary("attnscope-capture"), f"--server={server.target}", f"--output_dir={data}",
                            "--prompt_ids=" + ",".join(map(str, PROMPT)), "--max_new_tokens=3", "--save_attention",
                            "--overwrite", *extra], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "client", "python")}
        p = subprocess.run([sys.executable, "-m", "attnscope.view"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert (tmp_path / "attention_sample_0.png").stat().st_size > 5000
        (tmp_path / "attention_sample_0.png").unlink()
    p = subprocess.run([sys.executable, "-m", "attnscope.view", "--stat", "all", "--out", "x.png"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0  # the pooled sample holds no statistics: a clear error, not a picture
    assert "no statistics" in p.stderr


def chromium(page, tmp_path, *args):
    import shutil
    browser = shutil.which("chromium")
    need_reference(browser is not None, "chromium is not installed (apt-get install chromium)")
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
                           "--hide-scrollbars", *args, page], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", ["dense", "pooled", "statistics"])
def test_html_page_draws_and_hover_shows_the_row(client, dense, tmp_path, name):
    from attnscope import view
    r = dense if name != "pooled" else run(client, **FORMS["pooled"])
    s = r.to_sample()
    if name == "statistics":
        s = attnscope.Sample(tmp_path / "stats.safetensors",
                             {k: v for k, v in s.tensors.items() if not k.startswith("attention.")},
                             {**s.metadata, "capture": {**s.metadata["capture"], "form": "FORM_NONE"}})
    else:
        s.path = tmp_path / "s.safetensors"
    page = tmp_path / "page.html"
    page.write_text(view.html_page(s), encoding="utf-8")
    text = page.read_text()
    assert "<title>s.safetensors</title>" in text or name == "statistics"
    assert str(tmp_path) not in text  # the file name, not its path
    hover = "2,3" if name == "statistics" else "5,3"
    proc = chromium(page.as_uri() + f"#view=0&head=1&hover={hover}", tmp_path, "--dump-dom")
    dom = proc.stdout
    errors = [l for l in proc.stderr.splitlines() if "CONSOLE" in l and ("Error" in l or "Uncaught" in l)]
    assert not errors, errors
    assert f'data-count="{T}"' in dom, dom[:300]
    if name == "dense":
        assert 'data-row="5"' in dom and 'data-col="3"' in dom and 'data-query="5"' in dom
        assert "query 5" in dom and "key 3" in dom
    elif name == "pooled":
        assert 'data-row="40"' in dom and "keys 24-31" in dom
    else:
        assert 'data-row="2"' in dom and "head 2, position 3" in dom
    shot = tmp_path / "shot.png"
    chromium(page.as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=900,900")
    import matplotlib.image as mpimg
    img = mpimg.imread(str(shot))
    heat = img[150:600, 150:600, :3]  # the heatmap's area
    assert heat.std() > 0.05, "the heatmap is blank"
    assert len(np.unique((heat * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 20


def test_asyncio_client_runs_requests_at_once(server, dense):
    import asyncio

    async def main():
        async with attnscope.AsyncClient(server.target) as c:
            info = await c.model_info()
            ids, _ = await c.tokenize("x") if info.has_tokenizer else ([], [])
            a, b = await asyncio.gather(
                c.stream_attention(token_ids=PROMPT, max_new_tokens=NEW, ignore_eos=True, form="dense"),
                c.stream_attention(token_ids=PROMPT, max_new_tokens=NEW, ignore_eos=True, row_entropy=True))
            g = await c.generate(token_ids=PROMPT, max_new_tokens=2)
            many = await c.stream_many([PROMPT, PROMPT[:20]], progress=False, max_new_tokens=2, form="head_mean")
            try:  # the RPCs are Client's, awaited: the same answers and errors as the blocking client
                detokenized = await c.detokenize([1, 2])
            except grpc.RpcError as e:
                detokenized = e.code()
            return a, b, g, many, ids, info, detokenized

    a, b, g, many, _, info, detokenized = asyncio.run(main())
    with attnscope.Client(server.target) as blocking:
        assert info == blocking.model_info()
        try:
            want = blocking.detokenize([1, 2])
        except grpc.RpcError as e:
            want = e.code()
    assert detokenized == want
    np.testing.assert_array_equal(a.attention(2), dense.attention(2))
    np.testing.assert_array_equal(b.statistic("row_entropy", 0)[1], dense.statistic("row_entropy", 0)[1])
    assert len(g.token_ids) == 2
    assert [m.attention(0).shape for m in many] == [(1, 42, 42), (1, 21, 21)]


def test_progress_bars_and_notebook_display(client, capsys):
    r = client.stream_attention(token_ids=PROMPT, max_new_tokens=NEW, ignore_eos=True, form="dense", progress=True)
    err = capsys.readouterr().err
    assert "attention" in err and "B" in err  # tqdm's bar on stderr
    rs = client.stream_many([PROMPT, PROMPT[:10]], max_new_tokens=2, form="none", row_entropy=True)
    assert len(rs) == 2 and "samples" in capsys.readouterr().err
    page = r._repr_html_()
    assert "attnscope StreamResult" in page and "<iframe srcdoc=" in page and "dense" in page
    s = r.to_sample()
    assert "attnscope Sample" in s._repr_html_()


def test_help_lists_each_programs_options(server, tmp_path):
    for prog, flags in (("attnscope-capture", ["--save_attention", "--shared_memory_bytes", "--form", "--stats"]),
                        ("attnscope-server", ["--model_dir", "--max_shared_bytes", "--stall_timeout_s", "--device"])):
        p = subprocess.run([binary(prog), "--help"], capture_output=True, text=True, timeout=60)
        text = p.stdout + p.stderr
        assert "No flags matched" not in text and "Usage: " + prog in text, text[:500]
        for flag in flags:
            assert flag in text, (prog, flag)
        assert "default:" in text and "usage message" not in text.lower().replace("usage: ", "")


def test_prototype_habits_save_attention_off_and_device_index(server, tmp_path):
    p = subprocess.run([binary("attnscope-capture"), f"--server={server.target}", f"--output_dir={tmp_path}",
                        "--prompt_ids=1,2,3", "--max_new_tokens=2", "--device", "0"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "Generated:" in p.stdout and not list(tmp_path.iterdir())  # printed, nothing stored
    assert "--device cuda:0 requested, but the server runs on cpu" in p.stderr


def test_readme_notebook_section_is_the_notebooks_first_cell():
    import json
    import os
    import re
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index("## From a notebook"):]
    block = re.search(r"```python\n(.*?)\n```", section, re.S).group(1)
    with open(os.path.join(root, "examples", "quickstart.ipynb"), encoding="utf-8") as f:
        nb = json.load(f)
    first = "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])
    assert block.strip() == first.strip()
    assert len(first.strip().splitlines()) <= 10
