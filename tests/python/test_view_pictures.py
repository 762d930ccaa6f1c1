"""Issue 25, the pictures as bertviz and circuitsvis users expect them: a layer x head grid in one
call (one colour scale, the prompt/generation boundary in every panel), heatmaps that compose into
a caller's axes without side effects, comparisons on a shared scale, top_k drawn as what it is
(blank where nothing was captured, a scatter past 8192 keys), readable position plots at 8k, the
no-argument viewer drawing what the prototype drew; and the HTML page at 128, 2k and 8k positions
driven in headless Chromium with playwright-core (tests/tools/page_check.mjs): drawn, no script
error, hover answering with the right cell, prompt and generated tokens told apart, statistics
rows tall enough to read, the file bounded by what it shows. Times are measured in
bench/viewer.py, not here."""
import json
import os
import shutil
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from conftest import BUILD, ROOT, binary, need_reference  # noqa: E402
from service_fixture import served, setup_paths  # noqa: E402

setup_paths(BUILD)
import attnscope  # noqa: E402
from attnscope import view  # noqa: E402
from attnscope.sample import Sample  # noqa: E402

PROMPT = [(i * 29 + 3) % 120 + 1 for i in range(20)]
NEW = 8


@pytest.fixture(scope="module")
def sample(make_checkpoint, tmp_path_factory):
    """A real capture: 2 layers, 4 heads, 20 prompt tokens and 8 generated."""
    for s in served(binary("attnscope-server"), make_checkpoint("llama_mha"), tmp_path_factory):
        with attnscope.Client(s.target) as c:
            r = c.stream_attention(token_ids=PROMPT, max_new_tokens=NEW, ignore_eos=True, form="dense",
                                   row_entropy=True, key_score=4)
        return r.to_sample()


def synthetic(layers, heads, T, prompt, form="dense", k=None, stats=(), rng=0):
    """An in-memory sample of causal attention rows (or top_k of them, or statistics only)."""
    g = np.random.default_rng(rng)
    tensors = {}
    for layer in range(layers):
        if form == "dense":
            a = np.tril(g.random((heads, T, T), np.float32) + 1e-3)
            tensors[f"attention.prefill.{layer}.0.0"] = a / a.sum(-1, keepdims=True)
        elif form == "top_k":
            idx = np.stack([np.sort(g.choice(np.arange(max(k, i + 1)), k, replace=False)) for i in range(T)])
            idx = np.where(idx <= np.arange(T)[:, None], idx, -1)
            w = np.where(idx >= 0, g.random((T, k), np.float32), 0)
            tensors[f"attention.prefill.{layer}.0.0"] = np.repeat(w[None], heads, 0).astype(np.float32)
            tensors[f"attention.prefill.{layer}.0.0.indices"] = np.repeat(idx[None], heads, 0).astype(np.int32)
        for kind in stats:
            tensors[f"statistic.{kind}.prefill.{layer}.0.0"] = g.random((heads, T), np.float32)
    meta = {"prompt_token_ids": list(range(prompt)), "prompt_pieces": [f"t{i}" for i in range(prompt)],
            "token_ids": list(range(T - prompt + 1)), "token_pieces": [f"g{i}" for i in range(T - prompt + 1)],
            "num_heads": heads, "num_layers": layers,
            "capture": {"form": {"dense": "FORM_DENSE", "top_k": "FORM_TOP_K", "none": "FORM_NONE"}[form],
                        "heads": list(range(heads)), "layers": list(range(layers)), "top_k": k or 0}}
    return Sample(None, tensors, meta)


# -- figures ---------------------------------------------------------------------------------

def test_head_grid_is_one_image_on_one_scale_with_the_boundary_in_every_panel(sample):
    fig = view.head_grid(sample)
    ax = fig.axes[0]
    (image,) = ax.images  # one image for all 8 panels, however many heads
    big = image.get_array()
    T = len(PROMPT) + NEW - 1
    gap = (big.shape[0] - 2 * T) // 1
    assert big.shape == (2 * T + gap, 4 * T + 3 * gap)
    for layer in range(2):
        for h in range(4):
            panel = big[layer * (T + gap):layer * (T + gap) + T, h * (T + gap):h * (T + gap) + T]
            want = sample.attention(layer)[h]
            lower = np.tril(np.ones((T, T), bool))
            np.testing.assert_allclose(np.ma.getdata(panel)[lower], want[lower], rtol=0, atol=1e-7)
            assert np.ma.getmaskarray(panel)[~lower].all()  # the future is blank
    assert image.norm.vmax == pytest.approx(max(sample.attention(l).max() for l in range(2)))
    assert len([a for a in fig.axes if a.get_label() == "<colorbar>"]) == 1
    assert [t.get_text() for t in ax.get_yticklabels()] == ["L0", "L1"]
    lines = [c for c in ax.collections if c.get_linestyle()[0][1] is not None]
    assert sum(len(c.get_segments()) for c in lines) == 2 * 8  # a row and a column line per panel
    assert "end of the 20-token prompt" in ax.get_title()
    own = view.head_grid(sample, layers=[1], heads=[0, 3], share=False).axes[0].images[0]
    assert own.get_array().shape == (T, 2 * T + gap) and np.nanmax(own.get_array()) == pytest.approx(1.0)
    plt.close("all")


def test_a_32_by_32_grid_is_one_image():
    s = synthetic(32, 32, 128, 100)
    fig = view.head_grid(s)
    assert len(fig.axes[0].images) == 1 and fig.axes[0].images[0].get_array().shape[0] > 32 * 128
    plt.close(fig)


def test_a_heatmap_in_the_callers_axes_changes_nothing_else(sample):
    fig, axes = plt.subplots(2, 4)
    before = (len(fig.axes), vars(fig.subplotpars).copy(), [a.get_position().bounds for a in axes.flat])
    for i, ax in enumerate(axes.flat):
        assert view.heatmap(sample, i // 4, i % 4, ax=ax) is fig
    after = (len(fig.axes), vars(fig.subplotpars).copy(), [a.get_position().bounds for a in axes.flat])
    assert before == after  # no colour bar added, no tight_layout run on the caller's figure
    view.heatmap(sample, 0, 0, ax=axes[0, 0], colorbar=True)
    assert len(fig.axes) == 9
    own = view.heatmap(sample, 1, 2)
    assert len(own.axes) == 2 and "end of the 20-token prompt" in own.axes[0].get_xlabel()
    plt.close("all")


def test_comparisons_share_one_scale_and_keep_tokens_on_the_outer_axes(sample):
    fig = view.compare_heads(sample, 1)
    panels = [a for a in fig.axes if a.images]
    heat = [a for a in panels if a.get_label() != "<colorbar>"]
    assert len(heat) == 4 and len({a.images[0].norm.vmax for a in heat}) == 1
    assert len([a for a in fig.axes if a.get_label() == "<colorbar>"]) == 1
    assert any(t.get_text() for t in heat[0].get_yticklabels())  # tokens where they fit
    assert not any(t.get_text() for t in heat[1].get_yticklabels())  # inner panels: none
    own = view.compare_layers(sample, [0, 1], 2, share=False)
    assert len([a for a in own.axes if a.get_label() == "<colorbar>"]) == 2  # each panel its own scale
    plt.close("all")


def test_top_k_is_blank_where_nothing_was_captured_and_a_scatter_past_8192_keys():
    s = synthetic(1, 2, 64, 50, form="top_k", k=4)
    m, rows, cols, _ = view.matrix(s, 0, 1)
    kept = (s.indices(0)[1] >= 0).sum()
    assert np.ma.count(m) == kept  # the kept cells, and only they, hold values
    image = view.heatmap(s, 0, 1).axes[0].images[0].get_array()
    assert np.ma.count(image) == kept
    long = synthetic(1, 1, 8300, 8000, form="top_k", k=2)
    with pytest.raises(ValueError, match="top_k_scatter"):
        view.matrix(long, 0, 0)
    fig = view.heatmap(long, 0, 0)  # drawn as a scatter instead
    (points,) = fig.axes[0].collections
    assert len(points.get_offsets()) == (long.indices(0)[0] >= 0).sum()
    assert fig.axes[0].get_xlim()[1] >= 8299
    plt.close("all")


def test_position_plots_at_8k_show_positions_and_a_band(tmp_path):
    s = synthetic(1, 8, 8015, 8000, form="none", stats=("row_entropy", "key_score"))
    fig = view.statistic_positions(s, "row_entropy", 0)
    ax = fig.axes[0]
    assert len(ax.lines) == 2  # the mean and the boundary, not eight raw lines
    assert len(ax.collections) == 1  # the band between the lowest and highest head
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert any(label.replace("\u2212", "-").lstrip("-").isdigit() for label in labels), labels  # positions
    assert "running mean over 15" in ax.get_title()
    chosen = view.statistic_positions(s, "row_entropy", 0, heads=[2, 5], smooth=1)
    assert [line.get_label() for line in chosen.axes[0].lines][:3] == ["head 2", "head 5", "mean over heads"]
    with pytest.raises(KeyError, match="head 9"):
        view.statistic_positions(s, "row_entropy", 0, heads=[9])
    plt.close("all")


def test_the_viewer_without_arguments_draws_what_the_prototype_drew(sample, tmp_path):
    data = tmp_path / "attention_data"
    data.mkdir()
    sample.save(str(data / "attention_sample_0.safetensors"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "client", "python"),
                                                        os.path.join(BUILD, "python")])}
    p = subprocess.run([sys.executable, "-m", "attnscope.view"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    for name in ("attention_sample_0.png", "attention_sample_0_layers.png", "attention_sample_0_heads.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    g = subprocess.run([sys.executable, "-m", "attnscope.view", str(data / "attention_sample_0.safetensors"),
                        "--grid", "--out", str(tmp_path / "grid.png")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert g.returncode == 0 and (tmp_path / "grid.png").stat().st_size > 10_000, g.stderr


# -- the HTML page in Chromium -----------------------------------------------------------------

def page_check(page, shot, hovers=12, view_index=0):
    browser = shutil.which("chromium")
    need_reference(browser is not None, "chromium is not installed (apt-get install chromium)")
    npm = os.environ.get("ATTNSCOPE_NPM_DIR", os.path.expanduser("~/.cache/attnscope/npm"))
    need_reference(os.path.isdir(os.path.join(npm, "node_modules", "playwright-core")),
                   f"playwright-core is not in {npm} (bash deploy/fetch-tokenizers.sh)")
    p = subprocess.run(["node", os.path.join(ROOT, "tests", "tools", "page_check.mjs"), str(page), str(shot),
                        str(hovers), str(view_index)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "CHROMIUM": browser})
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert not out["errors"], out["errors"]
    return out


def drawn(shot, box):
    import matplotlib.image as mpimg
    x0, y0, x1, y1 = box
    area = mpimg.imread(str(shot))[y0:y1, x0:x1, :3]
    return area.std() > 0.05 and len(np.unique((area * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 20


def test_the_page_at_128_positions(sample, tmp_path):
    page = tmp_path / "p.html"
    page.write_text(view.html_page(sample), encoding="utf-8")
    out = page_check(page, tmp_path / "shot.png")
    T = len(PROMPT) + NEW - 1
    assert out["spans"] == T + 1 and out["generated_marker"] == 1  # the tokens and the marker before the generated
    assert drawn(tmp_path / "shot.png", (120, 200, 600, 650))
    row, col = int(out["row"]), int(out["col"])
    assert out["query"] == str(row) and f"query {row}" in out["info"] and f"key {col}" in out["info"]
    want = sample.attention(0)[0][row, col]
    shown = out["info"].rsplit(": ", 1)[1]
    assert shown == "not captured" or abs(float(shown) - want) <= 1e-3 * max(want, 1e-3)


def test_the_page_at_2k_positions_is_tiled_and_bounded(tmp_path):
    s = synthetic(4, 8, 2048, 2000)
    page = tmp_path / "p.html"
    text = view.html_page(s)
    page.write_text(text, encoding="utf-8")
    assert len(text) < 1.2 * view.page_bytes(s) and len(text) < 16 << 20  # what it shows, as estimated
    data = json.loads(text[text.index("const D = ") + 10:text.index(";\nconst $")])
    assert data["views"][0]["step"] > 1 and data["prompt_length"] == 2000
    out = page_check(page, tmp_path / "shot.png")
    assert drawn(tmp_path / "shot.png", (120, 200, 600, 650))
    assert "keys " in out["info"] and out["query"] is not None


def test_the_page_at_8k_positions_reads_statistics(tmp_path):
    s = synthetic(2, 8, 8015, 8000, form="none", stats=("row_entropy", "sink_mass"))
    page = tmp_path / "p.html"
    page.write_text(view.html_page(s), encoding="utf-8")
    out = page_check(page, tmp_path / "shot.png")
    width, height = out["canvas"]
    assert height >= 90 + 8 * 18 and width >= 900  # each head a band one can read, the full width used
    assert "head " in out["info"] and "position " in out["info"]
    assert out["spans"] == 8015 + 1
    assert drawn(tmp_path / "shot.png", (100, 100, 900, 230))


def test_jupyter_display_checks_the_size_before_building(sample, monkeypatch):
    calls = []
    real = view.html_page
    monkeypatch.setattr(view, "html_page", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(type(sample), "HTML_INLINE_LIMIT", 100)
    assert "too large to inline" in sample._repr_html_() and not calls
    monkeypatch.setattr(type(sample), "HTML_INLINE_LIMIT", 8 << 20)
    assert "<iframe srcdoc=" in sample._repr_html_() and calls
