"""The reference viewer: pictures of every form and statistic (matplotlib figures), and a
self-contained interactive HTML page.

    python -m attnscope.view                          the first sample of attention_data/, as a PNG
    python -m attnscope.view SAMPLE --layer 0 --head 0 --out heatmap.png
    python -m attnscope.view SAMPLE --compare-layers 0,8,16 --out layers.png
    python -m attnscope.view SAMPLE --compare-heads --layer 0 --out heads.png
    python -m attnscope.view SAMPLE --stat row_entropy --out entropy.png   (any statistic captured)
    python -m attnscope.view SAMPLE --divergence --out whatif.png      (requests with interventions)
    python -m attnscope.view SAMPLE --lost-mass [--step 3] --out lost.png
    python -m attnscope.view SAMPLE --kept --layer 1 --out kept.png    (KV policies)
    python -m attnscope.view SAMPLE --html page.html
    python -m attnscope.view SAMPLE --export-pickle sample.pkl

Dense, head_mean/head_max, pooled (axes in token positions) and top_k (a sparse heatmap: each row's
K keys) all draw as heatmaps; statistics as layer x head overviews (entropy, sink and local mass),
key scores and their variance along the prompt with its tokens, row statistics along positions.
Interventions: divergence over steps, a layer x head map of lost attention mass, a KV policy's kept
keys, and its evicted cells drawn over attention heatmaps.
Everything here takes a stored sample (attnscope.load) or a stream result alike.
"""
import html
import json
import os

import numpy as np


MAX_TICKS = 40          # token labels shown per axis at most
HTML_FULL_LIMIT = 1024  # above this many tokens the page shows downsampled tiles
HTML_BUDGET = 4_000_000  # numbers embedded in a page at most (all layers and heads together)
SPARSE_DENSE_LIMIT = 8192  # top_k rows drawn as a dense canvas up to this many keys
CMAP = "viridis"        # perceptual; the HTML page uses the same map
KEY_STATS = ("key_score", "key_score_variance")


def _norm(log, vmax):
    import matplotlib.colors as mcolors
    if log:
        return mcolors.LogNorm(vmin=max(vmax * 1e-4, 1e-8), vmax=vmax)
    # A power norm lifts small weights into view; attention rows are mostly small numbers.
    return mcolors.PowerNorm(gamma=0.4, vmin=0.0, vmax=vmax)


def _tokens(sample):
    return list(getattr(sample, "position_pieces", None) or getattr(sample, "tokens", []) or [])


def _label(tokens, pos):
    """The token at `pos` as a tick label, its position where there is no piece (no tokenizer)."""
    piece = repr(tokens[pos])[1:-1][:12] if 0 <= pos < len(tokens) else ""
    return piece or str(pos)


def _ticks(ax, tokens, rows, cols, step=1):
    """Token labels on both axes where they fit; rows/cols are the positions each index shows."""
    for axis, positions in (("x", cols), ("y", rows)):
        n = len(positions)
        every = max(1, int(np.ceil(n / MAX_TICKS)))
        idx = list(range(0, n, every))
        labels = [_label(tokens, int(positions[i])) if step == 1 else str(int(positions[i])) for i in idx]
        if axis == "x":
            ax.set_xticks(idx)
            ax.set_xticklabels(labels, rotation=90, fontsize=6)
        else:
            ax.set_yticks(idx)
            ax.set_yticklabels(labels, fontsize=6)


def _first_head(sample, head):
    """`head` as given, or the first captured head (a capture of heads 2 and 5 has no head 0)."""
    return head if head is not None else (list(sample.heads) or [0])[0]


def _row(sample, head):
    """The array row of the model's head `head` (head_mean/head_max: their one row)."""
    if sample.reduced_heads:
        return 0
    try:
        return sample.head_index(head)
    except KeyError as e:
        raise KeyError(e.args[0]) from None


def matrix(sample, layer, head=None, phase=None):
    """(2-D array to draw, query position of each row, key position of each column, tile side) of
    the model's head `head` (default: the first captured). top_k rows are spread into a sparse
    matrix (zeros off the K kept keys)."""
    form = getattr(sample, "form", "dense")
    a = sample.attention(layer, phase) if phase is not None else sample.attention(layer)
    head = _row(sample, _first_head(sample, head))
    try:
        rows = sample.positions(layer, phase)
    except (AttributeError, KeyError):
        rows = np.arange(a.shape[1])
    if form == "top_k":
        idx = sample.indices(layer, phase)[head]
        width = int(max(rows.max() + 1, idx.max() + 1))
        if width > SPARSE_DENSE_LIMIT:
            raise ValueError(f"top_k over {width} keys: use top_k_scatter() for a sparse picture")
        m = np.zeros((len(rows), width), np.float32)
        ok = idx >= 0
        r = np.broadcast_to(np.arange(len(rows))[:, None], idx.shape)
        m[r[ok], idx[ok]] = a[head][ok]
        return m, rows, np.arange(width), 1
    step = getattr(sample, "pool", 1) if form == "pooled" else 1
    return a[head], rows, np.arange(a.shape[2]) * step, step


def heatmap(sample, layer, head=None, ax=None, log=False, phase=None, evicted=True):
    """Attention of one layer and head (the model's head number; default: the first captured),
    keys on x, queries on y, tokens (or positions, for tiles) as labels. Works for every form;
    top_k draws its K keys per row. With a KV policy (and `evicted`), the (query, key) cells its
    decisions hide from that head are drawn over in red: for the intervened run's capture these
    weights are 0, for the reference's (capture_reference) they are the mass the policy lost."""
    import matplotlib.pyplot as plt
    head = _first_head(sample, head)
    m, rows, cols, step = matrix(sample, layer, head, phase)
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 7))
    above = cols[None, :] > rows[:, None] + step - 1
    masked = np.ma.masked_where(above, m)
    if log:
        masked = np.ma.masked_less_equal(masked, 0)
    im = ax.imshow(masked, cmap=CMAP, norm=_norm(log, float(m.max()) or 1.0), interpolation="nearest",
                   aspect="auto")
    _ticks(ax, _tokens(sample), rows, cols, step)
    form = getattr(sample, "form", "dense")
    what = sample.head_label(head)
    gone = _evicted_cells(sample, layer, head, rows, cols, step) if evicted else None
    if gone is not None and gone.any():
        overlay = np.zeros(gone.shape + (4,), np.float32)
        overlay[gone] = EVICTED_RGBA
        ax.imshow(overlay, interpolation="nearest", aspect="auto")
        import matplotlib.patches as mpatches
        ax.legend(handles=[mpatches.Patch(color=EVICTED_RGBA, label="evicted by the KV policy")],
                  loc="upper right", fontsize=7)
    extra = {"pooled": f", {step}x{step} tiles", "top_k": ", top-k keys per row"}
    ax.set_title(f"layer {layer}, {what}{extra.get(form, '')}")
    ax.set_xlabel("key position" if step > 1 else "key")
    ax.set_ylabel("query position" if step > 1 else "query")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, label="attention weight")
    ax.figure.tight_layout()
    return ax.figure


EVICTED_RGBA = (0.9, 0.1, 0.1, 0.55)  # the cells a KV policy hides, over heatmaps
DIVERGENCE_RATIOS = [2.2, 0.6, 1.2]   # KL, top-1 agreement, rank


def _evicted_cells(sample, layer, head, rows, cols, step):
    """bool [rows, cols] of the cells the sample's KV policy hides from `head`, or None (no policy,
    reduced heads or tiles: a tile mixes kept and evicted keys)."""
    if step != 1 or getattr(sample, "reduced_heads", False) or not hasattr(sample, "evicted"):
        return None
    try:
        if not sample.decision_steps(layer):
            return None
    except (AttributeError, KeyError):
        return None
    return sample.evicted(layer, head, rows, cols)


def divergence_figure(sample, axes=None):
    """Per generated step of a request with interventions: KL(full || intervened) of the
    next-token distributions, top-1 agreement (green: the same token, red: not), and the chosen
    token's rank under the full model; KV policy decisions after decode steps as dotted lines.
    `axes`: three axes to draw in (default: a new figure)."""
    import matplotlib.pyplot as plt
    d = sample.divergence()
    if len(d) == 0:
        raise ValueError("the sample holds no divergence: it ran without interventions")
    if axes is None:
        fig, axes = plt.subplots(3, 1, figsize=(max(6, min(16, len(d) / 4)), 6), sharex=True,
                                 gridspec_kw={"height_ratios": DIVERGENCE_RATIOS})
    a, b, c = axes
    fig = a.figure
    steps, kl = d["step"].to_numpy(), d["kl"].to_numpy()
    a.plot(steps, kl, marker="o", ms=3, lw=1.2, color="#1f4e79")
    if (kl > 0).any():
        a.set_yscale("symlog", linthresh=max(float(kl[kl > 0].min()), 1e-6))
    a.set_ylabel("KL(full || intervened)")
    agree = d["top1_agree"].to_numpy().astype(bool)
    a.set_title(f"mean KL {kl.mean():.4g} nats, top-1 agreement {agree.mean():.0%} over {len(d)} steps")
    b.scatter(steps, np.zeros(len(steps)), c=np.where(agree, "#2e7d32", "#c62828"), marker="s", s=30)
    b.set_yticks([])
    b.set_ylabel("top-1", rotation=0, ha="right", va="center")
    c.plot(steps, d["rank"].to_numpy(), marker=".", lw=1, color="#6a1b9a")
    c.set_yscale("log")
    c.set_ylabel("rank (full)")
    c.set_xlabel("generated step")
    for s in getattr(sample, "decision_steps", lambda: [])():
        if s > 0:
            for ax in (a, b, c):
                ax.axvline(s + 0.5, color="grey", ls=":", lw=0.8)
    for ax in (a, b):
        ax.tick_params(labelbottom=False)
    fig.tight_layout()
    return fig


def lost_mass_map(sample, step=None, ax=None):
    """Layer x head map of the attention mass the full model puts on keys the intervened model does
    not see (the mean over generated steps, or at one `step`, 1-based)."""
    import matplotlib.pyplot as plt
    lost = sample.lost_mass()
    if lost.size == 0:
        raise ValueError("the sample holds no divergence: it ran without interventions")
    if step is None:
        grid, how = lost.mean(0), f"mean over {lost.shape[0]} steps"
    else:
        if not 1 <= step <= lost.shape[0]:
            raise KeyError(f"step {step} is outside the generated steps 1-{lost.shape[0]}")
        grid, how = lost[step - 1], f"step {step}"
    if ax is None:
        _, ax = plt.subplots(figsize=(1.6 + 0.4 * grid.shape[1], 1.4 + 0.35 * grid.shape[0]))
    im = ax.imshow(grid, cmap="magma", vmin=0.0, vmax=max(float(grid.max()), 1e-6), aspect="auto",
                   interpolation="nearest")
    ax.set_yticks(range(grid.shape[0]))
    ax.set_xticks(range(grid.shape[1]))
    ax.tick_params(labelsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"full model's mass on hidden keys ({how})", fontsize=10)
    for (i, j), v in np.ndenumerate(grid):
        if grid.size <= 256:
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                    color="black" if v > 0.6 * grid.max() else "white")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, label="attention mass")
    ax.figure.tight_layout()
    return ax.figure


def kept_figure(sample, layer, ax=None):
    """The KV policy's kept keys in `layer`: one row per (decision, kv head), keys along x (the
    tokens where they fit); kept in the colour map's bright end, evicted dark, keys not yet there
    at that decision blank."""
    import matplotlib.pyplot as plt
    steps = sample.decision_steps(layer)
    if not steps:
        raise KeyError(f"no KV policy decision for layer {layer}")
    masks = [sample.kept(layer, s) for s in steps]
    width = max(m.shape[1] for m in masks)
    kv = masks[0].shape[0]
    grid = np.full((len(steps) * kv, width), np.nan, np.float32)
    labels = []
    for i, (s, m) in enumerate(zip(steps, masks)):
        grid[i * kv:(i + 1) * kv, :m.shape[1]] = m
        labels += [f"{'prefill' if s == 0 else f'step {s}'}, kv {h}" for h in range(kv)]
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6, min(20, width / 8)), 1.2 + 0.25 * len(labels)))
    ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=6)
    tokens = _tokens(sample)
    every = max(1, int(np.ceil(width / MAX_TICKS)))
    ax.set_xticks(range(0, width, every))
    ax.set_xticklabels([_label(tokens, p) for p in range(0, width, every)], rotation=90, fontsize=6)
    kept = ", ".join(f"{int(m.sum())}/{m.size}" for m in masks)
    ax.set_title(f"layer {layer}: keys kept (bright) and evicted (dark) per kv head; kept {kept}", fontsize=9)
    ax.figure.tight_layout()
    return ax.figure


def intervention_figure(sample, layer=None):
    """A request with interventions at a glance: divergence over steps, the lost-mass map and
    (with a KV policy) the kept keys of `layer` (default: the first)."""
    import matplotlib.pyplot as plt
    steps = sample.decision_steps() if hasattr(sample, "decision_steps") else []
    fig = plt.figure(figsize=(14, 9 if steps else 6))
    grid = fig.add_gridspec(2 if steps else 1, 2, width_ratios=[2.2, 1])
    sub = grid[0, 0].subgridspec(3, 1, height_ratios=DIVERGENCE_RATIOS, hspace=0.15)
    first = fig.add_subplot(sub[0])
    divergence_figure(sample, axes=[first, fig.add_subplot(sub[1], sharex=first),
                                    fig.add_subplot(sub[2], sharex=first)])
    lost_mass_map(sample, ax=fig.add_subplot(grid[0, 1]))
    if steps:
        if layer is None:
            layer = min(int(d["layer"]) for d in sample._kv_rows)
        kept_figure(sample, layer, ax=fig.add_subplot(grid[1, :]))
    fig.tight_layout()
    return fig


def _grid(sample, panels, title, log):
    import matplotlib.pyplot as plt
    n = len(panels)
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (layer, head) in zip(axes.flat, panels):
        m, r, c, step = matrix(sample, layer, head)
        ax.imshow(np.ma.masked_where(c[None, :] > r[:, None] + step - 1, m), cmap=CMAP,
                  norm=_norm(log, float(m.max()) or 1.0), interpolation="nearest", aspect="auto")
        ax.set_title(f"layer {layer}, {sample.head_label(head)}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def compare_layers(sample, layers, head=None, log=False):
    """One head (the model's number; default: the first captured) across layers."""
    head = _first_head(sample, head)
    return _grid(sample, [(l, head) for l in layers], f"{sample.head_label(head)} across layers", log)


def compare_heads(sample, layer, heads=None, log=False):
    """Heads of one layer, titled by the model's head numbers (default: every captured head)."""
    heads = (list(sample.heads)[:1] if sample.reduced_heads else list(sample.heads)) if heads is None else heads
    return _grid(sample, [(layer, h) for h in heads], f"layer {layer}: heads", log)


def _stat_layers(sample, kind):
    return sorted({k.layer for k in sample._statistics if k.stat == kind})


def statistic_overview(sample, kind, ax=None, phase=None):
    """Layer x head picture of a statistic's mean over positions: e.g. which heads are sharp
    (low row_entropy), which attend to the sink (sink_mass) or locally (local_mass)."""
    import matplotlib.pyplot as plt
    layers = _stat_layers(sample, kind)
    if not layers:
        raise KeyError(f"no statistic {kind!r} captured (captured: {sample.statistic_kinds})")
    # Key statistics sum to a constant over the keys: their peak says more than their mean.
    reduce, how = (np.max, "max over prompt keys") if kind in KEY_STATS else (np.mean, "mean over positions")
    grid = np.stack([reduce(sample.statistic(kind, l, phase)[1], axis=1) for l in layers])
    if ax is None:
        _, ax = plt.subplots(figsize=(1.2 + 0.35 * grid.shape[1], 1.2 + 0.3 * len(layers)))
    im = ax.imshow(grid, cmap=CMAP, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels(layers, fontsize=7)
    ax.set_xticks(range(grid.shape[1]))
    ax.set_xticklabels(sample._head_numbers(grid.shape[1]), fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"{kind}: {how}", fontsize=10)
    ax.figure.colorbar(im, ax=ax, fraction=0.046)
    ax.figure.tight_layout()
    return ax.figure


def statistic_positions(sample, kind, layer, head=None, ax=None):
    """A statistic along positions, with the tokens: key_score / key_score_variance per prompt
    key, row statistics per query position (prefill rows, then decode steps). head (the model's
    number) None: one line per head (up to 8) and their mean."""
    import matplotlib.pyplot as plt
    pos, values = sample.statistic(kind, layer)
    numbers = sample._head_numbers(values.shape[0])
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6, min(20, len(pos) / 6)), 3.5))
    if head is None:
        for i in range(min(8, values.shape[0])):
            ax.plot(pos, values[i], lw=0.8, alpha=0.5, label=f"head {numbers[i]}")
        ax.plot(pos, values.mean(0), lw=2, color="black", label="mean")
        ax.legend(fontsize=6, ncol=5)
    else:
        if head not in list(numbers):
            raise KeyError(f"head {head} was not captured (captured heads: {', '.join(map(str, numbers))})")
        ax.plot(pos, values[list(numbers).index(head)], lw=1.2)
    tokens = _tokens(sample)
    every = max(1, int(np.ceil(len(pos) / MAX_TICKS)))
    ax.set_xticks(pos[::every])
    ax.set_xticklabels([_label(tokens, int(p)) for p in pos[::every]], rotation=90, fontsize=6)
    axis = "prompt key" if kind in KEY_STATS else "query position"
    ax.set_xlabel(axis)
    ax.set_ylabel(kind)
    ax.set_title(f"{kind}, layer {layer}" + ("" if head is None else f", head {head}"))
    ax.figure.tight_layout()
    return ax.figure


def statistics_figure(sample, layer=None):
    """Every captured statistic in one figure: the layer x head overview of each, and along
    positions for `layer` (the first captured by default)."""
    import matplotlib.pyplot as plt
    kinds = sample.statistic_kinds
    if not kinds:
        raise ValueError("the sample holds no statistics")
    layer = _stat_layers(sample, kinds[0])[0] if layer is None else layer
    fig, axes = plt.subplots(len(kinds), 2, figsize=(14, 3.2 * len(kinds)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2.5]})
    for row, kind in zip(axes, kinds):
        statistic_overview(sample, kind, ax=row[0])
        statistic_positions(sample, kind, layer, ax=row[1])
    fig.tight_layout()
    return fig


def overview(sample, layer=None, head=None, log=False):
    """The sample's natural picture: a heatmap when it holds attention, its statistics otherwise."""
    if getattr(sample, "form", "dense") != "none" and (getattr(sample, "_attention", None) or
                                                       any(k.startswith("layer.") for k in getattr(sample, "tensors", {}))):
        layers = sample.layers
        return heatmap(sample, layers[0] if layer is None else layer, head, log=log)
    return statistics_figure(sample, layer)


def _pool(a, p):
    """Mean over p×p tiles (edge tiles average what they cover)."""
    H, T, _ = a.shape
    n = -(-T // p)
    pad = np.zeros((H, n * p, n * p), np.float32)
    pad[:, :T, :T] = a
    sums = pad.reshape(H, n, p, n, p).sum(axis=(2, 4))
    counts = np.minimum(p, T - np.arange(n) * p).astype(np.float32)
    return sums / (counts[:, None] * counts[None, :])


def _views(sample):
    """What the page can show: per layer, one matrix per head (attention), or per statistic and
    layer a heads x positions matrix (statistics-only samples)."""
    views = []
    form = getattr(sample, "form", "dense")
    has_attention = form != "none" and (getattr(sample, "_attention", None) or
                                        any(k.startswith("layer.") for k in getattr(sample, "tensors", {})))
    if has_attention:
        layers = sample.layers
        heads = list(sample.heads)[:1] if sample.reduced_heads else list(sample.heads)
        labels = [sample.head_label(heads[0])] if sample.reduced_heads else [str(h) for h in heads]
        for layer in layers:
            mats, rows, cols, step = [], None, None, 1
            for h in heads:
                m, rows, cols, step = matrix(sample, layer, h)
                mats.append(m)
            a = np.stack(mats)
            side = max(32, int(np.sqrt(HTML_BUDGET / (len(layers) * len(heads)))))
            n = max(a.shape[1], a.shape[2])
            pool = 1 if n <= min(HTML_FULL_LIMIT, side) else int(np.ceil(n / min(side, 512)))
            if pool > 1:  # tiles of the tiles: positions stay in tokens
                a = _pool(np.pad(a, ((0, 0), (0, max(0, n - a.shape[1])), (0, max(0, n - a.shape[2])))), pool)
                rows, cols, step = rows[::pool][:a.shape[1]], cols[::pool][:a.shape[2]], step * pool
            views.append({"name": f"layer {layer}", "heads": np.round(a, 5).tolist(), "labels": labels,
                          "rows": [int(r) for r in rows], "cols": [int(c) for c in cols], "step": int(step),
                          "causal": True})
    for kind in getattr(sample, "statistic_kinds", []):
        for layer in _stat_layers(sample, kind):
            pos, values = sample.statistic(kind, layer)
            views.append({"name": f"{kind}, layer {layer}", "heads": [np.round(values, 5).tolist()],
                          "labels": ["all"], "rows": [int(h) for h in sample._head_numbers(values.shape[0])],
                          "cols": [int(p) for p in pos], "step": 1, "causal": False, "row_label": "head"})
    return views


def html_page(sample, title=None):
    """A self-contained page: choose a view (layer, or statistic) and head; the heatmap uses the
    PNGs' colour map with a power or log scale and a colour bar, token labels where they fit;
    hovering a cell highlights its query row and key column and shows both tokens and the weight,
    and shades the token strip below by that query's attention."""
    import matplotlib
    views = _views(sample)
    if not views:
        raise ValueError("the sample holds neither attention nor statistics")
    lut = [[int(255 * c) for c in matplotlib.colormaps[CMAP](i / 255)[:3]] for i in range(256)]
    tokens = _tokens(sample)
    payload = json.dumps({"tokens": tokens, "views": views, "lut": lut})
    # Token pieces are untrusted text: inside <script>, '<', '>' and '&' must not appear literally
    # (a piece "</script>" would end the script), nor U+2028/2029 (line ends in older JavaScript).
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                    ("\u2029", "\\u2029")):
        payload = payload.replace(ch, esc)
    name = title or os.path.basename(str(getattr(sample, "path", None) or "stream result"))
    return _TEMPLATE.replace("__TITLE__", html.escape(name)).replace("__DATA__", payload)


_TEMPLATE = """<!doctype html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font-family:sans-serif;margin:16px;color:#222} #strip span{padding:1px 2px;margin:1px;display:inline-block;
border-radius:3px;white-space:pre;font-family:monospace;font-size:12px} canvas{image-rendering:pixelated}
#info{margin:8px 0;min-height:1.3em;font-family:monospace} .row{display:flex;gap:12px;align-items:flex-start}
label{margin-right:12px}
</style></head><body>
<h3>__TITLE__</h3>
<label>view <select id="view"></select></label>
<label>head <select id="head"></select></label>
<label>scale <select id="scale"><option value="power">power (0.4)</option><option value="log">log</option>
<option value="linear">linear</option></select></label>
<div id="info"></div>
<div class="row"><canvas id="map" width="640" height="640"></canvas>
<div><canvas id="bar" width="24" height="256"></canvas><div id="barmax"></div><div id="barmin"></div></div></div>
<h4>one query's attention over the text <small>(hover a row)</small></h4>
<div id="strip"></div>
<script>
const D = __DATA__;
const $ = id => document.getElementById(id);
const map = $('map'), ctx = map.getContext('2d'), strip = $('strip');
const PAD = 90, SIZE = 540;  // room for token labels, then the matrix
D.views.forEach((v, i) => $('view').add(new Option(v.name, i)));
const state = Object.fromEntries(new URLSearchParams(location.hash.slice(1)));
function view() { return D.views[Number($('view').value)]; }
function fillHeads() {
  const keep = $('head').value, v = view(), n = v.heads.length;
  $('head').innerHTML = '';
  for (let h = 0; h < n; h++) $('head').add(new Option(v.labels[h], h));  // the model's head numbers
  $('head').value = keep !== '' && Number(keep) < n ? keep : '0';
  $('head').disabled = n === 1;
}
function scale(x, max) {
  const s = $('scale').value;
  if (max <= 0 || x <= 0) return 0;
  if (s === 'log') return Math.max(0, 1 + Math.log10(x / max) / 4);
  return s === 'power' ? Math.pow(x / max, 0.4) : x / max;
}
// A loop, not Math.max(...row): spreading a row of 125k+ numbers overflows the call stack.
function maxOf(a) { let m = -Infinity; for (let i = 0; i < a.length; i++) if (a[i] > m) m = a[i]; return m; }
function label(p) { const t = D.tokens[p]; return t === undefined || t === '' ? String(p) : JSON.stringify(t).slice(1, -1).slice(0, 10); }
let M = null, cell = 1;
function draw() {
  const v = view(), m = v.heads[Number($('head').value)], R = m.length, C = m[0].length;
  M = {v, m, R, C, max: maxOf(m.map(maxOf))};
  cell = SIZE / Math.max(R, C);
  const img = ctx.createImageData(C, R);
  for (let i = 0; i < R; i++) for (let j = 0; j < C; j++) {
    const k = 4 * (i * C + j), future = v.causal && v.cols[j] > v.rows[i] + v.step - 1;
    const c = future ? [240, 240, 240] : D.lut[Math.min(255, Math.round(255 * scale(m[i][j], M.max)))];
    img.data[k] = c[0]; img.data[k + 1] = c[1]; img.data[k + 2] = c[2]; img.data[k + 3] = 255;
  }
  const off = document.createElement('canvas'); off.width = C; off.height = R;
  off.getContext('2d').putImageData(img, 0, 0);
  ctx.clearRect(0, 0, map.width, map.height); ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, PAD, PAD, C * cell, R * cell);
  // Labels where they fit: tokens (positions for tiles and statistics' heads).
  ctx.fillStyle = '#333'; ctx.font = '9px monospace';
  const every = Math.max(1, Math.ceil(10 / cell));
  for (let i = 0; i < R; i += every) ctx.fillText(v.row_label ? v.row_label + ' ' + v.rows[i] : (v.step > 1 ? String(v.rows[i]) : label(v.rows[i])), 2, PAD + (i + 0.8) * cell);
  ctx.save(); ctx.rotate(-Math.PI / 2);
  for (let j = 0; j < C; j += every) ctx.fillText(v.step > 1 ? String(v.cols[j]) : label(v.cols[j]), -PAD + 2, PAD + (j + 0.8) * cell);
  ctx.restore();
  const bar = $('bar').getContext('2d');
  for (let y = 0; y < 256; y++) { const c = D.lut[255 - y]; bar.fillStyle = `rgb(${c[0]},${c[1]},${c[2]})`; bar.fillRect(0, y, 24, 1); }
  $('barmax').textContent = M.max.toPrecision(3);
  $('barmin').textContent = $('scale').value === 'log' ? (M.max / 1e4).toPrecision(2) : '0';
  location.hash = 'view=' + $('view').value + '&head=' + $('head').value + '&scale=' + $('scale').value;
}
function hover(i, j) {
  if (!M || i < 0 || j < 0 || i >= M.R || j >= M.C) return;
  draw();
  ctx.strokeStyle = 'rgba(255,255,255,0.9)'; ctx.lineWidth = 1;
  ctx.strokeRect(PAD, PAD + i * cell, M.C * cell, cell); ctx.strokeRect(PAD + j * cell, PAD, cell, M.R * cell);
  const v = M.v, q = v.rows[i], k = v.cols[j];
  $('info').textContent = v.row_label
      ? v.row_label + ' ' + q + ', position ' + k + ' "' + label(k) + '": ' + M.m[i][j].toPrecision(4)
      : 'query ' + q + ' "' + label(q) + '" -> ' +
        (v.step > 1 ? 'keys ' + k + '-' + (k + v.step - 1) : 'key ' + k + ' "' + label(k) + '"') +
        ': ' + M.m[i][j].toPrecision(4);
  $('info').dataset.row = String(q); $('info').dataset.col = String(k);
  if (v.row_label) return;
  const row = M.m[i], max = maxOf(row);
  strip.querySelectorAll('span').forEach((s, p) => {
    const c = Math.min(M.C - 1, Math.floor(p / v.step));
    const w = p <= q + v.step - 1 && v.cols[c] <= p ? scale(row[c], max) : 0;
    s.style.background = 'rgba(253,231,37,' + w.toFixed(3) + ')';
    s.style.outline = p === q ? '1px solid #444' : '';
  });
  strip.dataset.query = String(q);
}
map.addEventListener('mousemove', e => {
  const r = map.getBoundingClientRect();
  hover(Math.floor((e.clientY - r.top - PAD) / cell), Math.floor((e.clientX - r.left - PAD) / cell));
});
D.tokens.forEach((t, p) => { const s = document.createElement('span'); s.textContent = t === '' ? '#' + p : t; s.title = 'position ' + p; strip.appendChild(s); });
strip.dataset.count = String(D.tokens.length);
$('view').value = state.view && D.views[Number(state.view)] ? state.view : '0';
fillHeads();
if (state.head) $('head').value = Number(state.head) < view().heads.length ? state.head : '0';
if (state.scale) $('scale').value = state.scale;
$('view').onchange = () => { fillHeads(); draw(); };
$('head').onchange = draw; $('scale').onchange = draw;
draw();
if (state.hover) { const [i, j] = state.hover.split(',').map(Number); hover(i, j); }
</script></body></html>
"""


if __name__ == "__main__":  # python -m attnscope.view: the command line is viewer_cli.py
    from attnscope.viewer_cli import main

    main()
