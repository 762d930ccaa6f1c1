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
HTML_BUDGET = 4_000_000  # numbers embedded in a page at most (all views together), as float16
HTML_STAT_COLUMNS = 2048  # a statistic view shows at most this many position columns (spans averaged)
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
    the model's head `head` (default: the first captured). top_k rows are spread into a masked
    array: the K kept keys of each row, every other cell masked (not captured, not zero)."""
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
            raise ValueError(f"top_k over {width} keys: draw it with top_k_scatter() (heatmap does)")
        m = np.zeros((len(rows), width), np.float32)
        kept = np.zeros((len(rows), width), bool)
        ok = idx >= 0
        r = np.broadcast_to(np.arange(len(rows))[:, None], idx.shape)
        m[r[ok], idx[ok]] = a[head][ok]
        kept[r[ok], idx[ok]] = True
        return np.ma.masked_array(m, ~kept), rows, np.arange(width), 1
    step = getattr(sample, "pool", 1) if form == "pooled" else 1
    return a[head], rows, np.arange(a.shape[2]) * step, step


def _top_k_width(sample, layer, phase=None):
    idx = sample.indices(layer, phase)
    return int(max(np.asarray(sample.positions(layer, phase)).max() + 1, idx.max() + 1))


def _mark_boundary(ax, sample, rows, cols, step, offsets=((0, 0),)):
    """Dashed lines where the prompt ends and generation begins: below the last prompt row and
    right of the last prompt key, in each panel whose origin (row, column) is in `offsets`. Returns
    the note for a caption ("" when the picture holds no generated row)."""
    from matplotlib.collections import LineCollection
    prompt = int(getattr(sample, "prompt_length", 0) or 0)
    rows, cols = np.asarray(rows), np.asarray(cols)
    if prompt <= 0 or len(rows) == 0 or rows.max() < prompt:
        return ""  # nothing generated in the picture
    y = int(np.searchsorted(rows, prompt)) - 0.5  # first generated row
    x = int(np.searchsorted(cols + step - 1, prompt)) - 0.5 if cols.max() + step - 1 >= prompt else None
    segments = []
    for r0, c0 in offsets:
        segments.append([(c0 - 0.5, r0 + y), (c0 + len(cols) - 0.5, r0 + y)])
        if x is not None:
            segments.append([(c0 + x, r0 + y), (c0 + x, r0 + len(rows) - 0.5)])
    ax.add_collection(LineCollection(segments, colors="white", linestyles="dashed", linewidths=0.8, alpha=0.9))
    return f"dashed: end of the {prompt}-token prompt"


def heatmap(sample, layer, head=None, ax=None, log=False, phase=None, evicted=True, colorbar=None,
            vmax=None, boundary=True, ticks=True):
    """Attention of one layer and head (the model's head number; default: the first captured),
    keys on x, queries on y, tokens (or positions, for tiles) as labels, the prompt/generation
    boundary dashed. Works for every form; top_k draws its K keys per row and leaves the rest
    blank (top_k_scatter above 8192 keys). With a KV policy (and `evicted`), the (query, key) cells
    its decisions hide from that head are drawn over in red: for the intervened run's capture these
    weights are 0, for the reference's (capture_reference) they are the mass the policy lost.

    Given `ax`, it draws there and nothing else: no colour bar unless `colorbar=True`, no layout
    change of the caller's figure. `vmax`: the top of the colour scale (share one across panels)."""
    import matplotlib.pyplot as plt
    form = getattr(sample, "form", "dense")
    if form == "top_k" and _top_k_width(sample, layer, phase) > SPARSE_DENSE_LIMIT:
        return top_k_scatter(sample, layer, head, ax=ax, phase=phase, colorbar=colorbar, vmax=vmax)
    head = _first_head(sample, head)
    m, rows, cols, step = matrix(sample, layer, head, phase)
    own = ax is None
    if own:
        _, ax = plt.subplots(figsize=(8, 7))
    above = cols[None, :] > rows[:, None] + step - 1
    masked = np.ma.masked_where(above | np.ma.getmaskarray(m), np.ma.getdata(m))
    if log:
        masked = np.ma.masked_less_equal(masked, 0)
    top = float(vmax) if vmax is not None else (float(masked.max()) if masked.count() else 0.0)
    im = ax.imshow(masked, cmap=CMAP, norm=_norm(log, top or 1.0), interpolation="nearest", aspect="auto")
    if ticks:
        _ticks(ax, _tokens(sample), rows, cols, step)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    what = sample.head_label(head)
    gone = _evicted_cells(sample, layer, head, rows, cols, step) if evicted else None
    if gone is not None and gone.any():
        overlay = np.zeros(gone.shape + (4,), np.float32)
        overlay[gone] = EVICTED_RGBA
        ax.imshow(overlay, interpolation="nearest", aspect="auto")
        import matplotlib.patches as mpatches
        ax.legend(handles=[mpatches.Patch(color=EVICTED_RGBA, label="evicted by the KV policy")],
                  loc="upper right", fontsize=7)
    note = _mark_boundary(ax, sample, rows, cols, step) if boundary else ""
    extra = {"pooled": f", {step}x{step} tiles", "top_k": ", top-k keys per row (blank: not captured)"}
    ax.set_title(f"layer {layer}, {what}{extra.get(form, '')}", fontsize=10 if ticks else 8)
    if ticks:
        ax.set_xlabel(("key position" if step > 1 else "key") + (f"   ({note})" if note else ""))
        ax.set_ylabel("query position" if step > 1 else "query")
    if colorbar if colorbar is not None else own:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, label="attention weight")
    if own:
        ax.figure.tight_layout()
    return ax.figure


def top_k_scatter(sample, layer, head=None, ax=None, phase=None, colorbar=None, vmax=None):
    """A top_k capture as what it is, at any length: one point per kept (query, key) pair,
    coloured by its weight, positions on both axes, the prompt/generation boundary dashed."""
    import matplotlib.pyplot as plt
    if getattr(sample, "form", "dense") != "top_k":
        raise ValueError(f"top_k_scatter draws top_k captures, not {getattr(sample, 'form', 'dense')}")
    head = _first_head(sample, head)
    row = _row(sample, head)
    values = np.asarray(sample.attention(layer, phase) if phase is not None else sample.attention(layer))[row]
    idx = np.asarray(sample.indices(layer, phase))[row]
    rows = np.asarray(sample.positions(layer, phase))
    ok = idx >= 0
    q = np.broadcast_to(rows[:, None], idx.shape)[ok]
    k, w = idx[ok], values[ok]
    own = ax is None
    if own:
        _, ax = plt.subplots(figsize=(8, 7))
    order = np.argsort(w, kind="stable")  # the heaviest on top
    top = float(vmax) if vmax is not None else (float(w.max()) if w.size else 1.0)
    pts = ax.scatter(k[order], q[order], c=w[order], cmap=CMAP, norm=_norm(False, top or 1.0),
                     s=max(0.5, min(12.0, 4e4 / max(1, w.size))), marker="s", linewidths=0)
    ax.set_xlim(-0.5, max(int(rows.max()), int(k.max()) if k.size else 0) + 0.5)
    ax.set_ylim(rows.max() + 0.5, rows.min() - 0.5)
    prompt = int(getattr(sample, "prompt_length", 0) or 0)
    if 0 < prompt <= rows.max():
        ax.axhline(prompt - 0.5, color="grey", ls="--", lw=0.8)
        ax.axvline(prompt - 0.5, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    ax.set_title(f"layer {layer}, {sample.head_label(head)}: top-{idx.shape[1]} keys per row", fontsize=10)
    if colorbar if colorbar is not None else own:
        ax.figure.colorbar(pts, ax=ax, fraction=0.046, label="attention weight")
    if own:
        ax.figure.tight_layout()
    return ax.figure


def _panel_heads(sample, heads):
    if heads is not None:
        return list(heads)
    return list(sample.heads)[:1] if sample.reduced_heads else list(sample.heads)


def head_grid(sample, layers=None, heads=None, log=False, phase=None, share=True, max_inches=16):
    """Every (layer, head) pattern in one figure, as bertviz's model view and circuitsvis'
    attention_heads: rows are layers, columns heads (the model's numbers), one colour scale and bar
    for all (`share=False`: each panel scaled to its own maximum), tokens on the outer axes where
    they fit, the prompt/generation boundary dashed in every panel. Drawn as one image, so 32 x 32
    heads take about as long as one."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator
    layers = list(sample.layers) if layers is None else list(layers)
    heads = _panel_heads(sample, heads)
    if not layers or not heads:
        raise ValueError("head_grid needs at least one layer and one head")
    if getattr(sample, "form", "dense") == "top_k" and max(_top_k_width(sample, l, phase) for l in layers) > SPARSE_DENSE_LIMIT:
        raise ValueError("top_k over more than 8192 keys: draw heads one by one with top_k_scatter()")
    panels = {}
    for layer in layers:
        for h in heads:
            m, rows, cols, step = matrix(sample, layer, h, phase)
            future = cols[None, :] > rows[:, None] + step - 1
            panels[layer, h] = np.where(future | np.ma.getmaskarray(m), np.nan, np.ma.getdata(m)).astype(np.float32)
    R = max(p.shape[0] for p in panels.values())
    C = max(p.shape[1] for p in panels.values())
    gap = max(1, int(round(0.04 * max(R, C))))
    big = np.full((len(layers) * (R + gap) - gap, len(heads) * (C + gap) - gap), np.nan, np.float32)
    for i, layer in enumerate(layers):
        for j, h in enumerate(heads):
            p = panels[layer, h]
            if not share:
                top = np.nanmax(p) if np.isfinite(p).any() else 0
                p = p / top if top > 0 else p
            big[i * (R + gap):i * (R + gap) + p.shape[0], j * (C + gap):j * (C + gap) + p.shape[1]] = p
    panel_in = max(0.3, min(2.4, max_inches / max(len(heads), len(layers) * C / R)))
    width = panel_in * len(heads) + 1.6
    height = panel_in * len(layers) * R / C + 1.4
    fig, ax = plt.subplots(figsize=(width, height))
    finite = big[np.isfinite(big)]
    top = float(finite.max()) if finite.size else 1.0
    if log:
        big = np.where(big > 0, big, np.nan)
    cmap = plt.get_cmap(CMAP).copy()
    cmap.set_bad("white")
    im = ax.imshow(np.ma.masked_invalid(big), cmap=cmap, norm=_norm(log, top or 1.0), interpolation="nearest",
                   aspect="auto")
    # Layers and heads name the panels; tokens label the outer rows and columns where they fit.
    ax.set_yticks([i * (R + gap) + (R - 1) / 2 for i in range(len(layers))])
    ax.set_yticklabels([f"L{l}" for l in layers], fontsize=7)
    top_axis = ax.secondary_xaxis("top")
    top_axis.set_ticks([j * (C + gap) + (C - 1) / 2 for j in range(len(heads))])
    top_axis.set_xticklabels(["mean" if sample.reduced_heads else f"H{h}" for h in heads], fontsize=7)
    _, rows, cols, step = matrix(sample, layers[0], heads[0], phase)
    tokens = _tokens(sample)
    px_per_token = panel_in * 100 / max(R, C)
    if px_per_token >= 7 and step == 1:
        ticks, labels = [], []
        for j in range(len(heads)):
            for k, pos in enumerate(cols):
                ticks.append(j * (C + gap) + k)
                labels.append(_label(tokens, int(pos)))
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.set_xticklabels(labels, rotation=90, fontsize=5)
        right = ax.secondary_yaxis("right")
        right.set_ticks([(len(layers) - 1) * (R + gap) + k for k in range(len(rows))])
        right.set_yticklabels([_label(tokens, int(p)) for p in rows], fontsize=5)
    else:
        ax.set_xticks([])
    note = _mark_boundary(ax, sample, rows, cols, step,
                          offsets=[(i * (R + gap), j * (C + gap)) for i in range(len(layers)) for j in range(len(heads))])
    scale = "one colour scale for all panels" if share else "each panel scaled to its own maximum"
    ax.set_title(f"attention by layer and head ({getattr(sample, 'form', 'dense')}; {scale})"
                 + (f"\n{note}" if note else ""), fontsize=10, pad=18)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.06 if px_per_token >= 7 else 0.02,
                 label="attention weight" if share else "fraction of the panel's maximum")
    return fig


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
    own = axes is None
    if own:
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
    if own:
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
    own = ax is None
    if own:
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
    if own:
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
    own = ax is None
    if own:
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
    if own:
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


def _grid(sample, panels, title, log, share=True):
    """Panels of (layer, head), four to a row: one colour scale and bar (`share`), tokens on the
    outer axes where they fit, the prompt/generation boundary dashed."""
    import matplotlib.pyplot as plt
    n = len(panels)
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols + 1, 4 * rows + 0.4), squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.axis("off")
    top = None
    if share:
        tops = [matrix(sample, layer, head)[0] for layer, head in panels]
        top = max(float(np.ma.max(m)) if np.ma.count(m) else 0.0 for m in tops) or 1.0
    for k, (ax, (layer, head)) in enumerate(zip(axes.flat, panels)):
        heatmap(sample, layer, head, ax=ax, log=log, vmax=top, colorbar=not share)
        if k % cols:  # tokens on the outer axes only
            ax.set_ylabel("")
            ax.tick_params(labelleft=False)
        if k + cols < n:
            ax.set_xlabel("")
            ax.tick_params(labelbottom=False)
        ax.set_title(ax.get_title(), fontsize=9)
    if share:
        fig.colorbar(axes.flat[0].images[0], ax=axes, fraction=0.02, label="attention weight")
    fig.suptitle(title)
    return fig


def compare_layers(sample, layers, head=None, log=False, share=True):
    """One head (the model's number; default: the first captured) across layers, on one colour
    scale (`share=False`: each its own)."""
    head = _first_head(sample, head)
    return _grid(sample, [(l, head) for l in layers], f"{sample.head_label(head)} across layers", log, share)


def compare_heads(sample, layer, heads=None, log=False, share=True):
    """Heads of one layer, titled by the model's head numbers (default: every captured head), on
    one colour scale (`share=False`: each its own)."""
    return _grid(sample, [(layer, h) for h in _panel_heads(sample, heads)], f"layer {layer}: heads", log, share)


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
    own = ax is None
    if own:
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
    if own:
        ax.figure.tight_layout()
    return ax.figure


def _smooth(values, window):
    """Running mean over `window` positions along the last axis (edges: the mean of what is there)."""
    if window <= 1:
        return values
    kernel = np.ones(window, np.float64)
    pad = window // 2
    num = np.stack([np.convolve(np.pad(v, (pad, window - 1 - pad)), kernel, "valid") for v in values])
    den = np.convolve(np.pad(np.ones(values.shape[-1]), (pad, window - 1 - pad)), kernel, "valid")
    return (num / den).astype(np.float32)


def statistic_positions(sample, kind, layer, head=None, ax=None, heads=None, smooth=None):
    """A statistic along positions: key_score / key_score_variance per prompt key, row statistics
    per query position (prefill rows, then decode steps, the boundary dashed). Tokens label the
    axis where they fit, positions otherwise. One line per head of `heads` (the model's numbers;
    `head`: one), with the mean over all heads in black; with no selection, up to 8 heads, or at
    long lengths only the mean and the band between the lowest and highest head. `smooth`: a
    running mean over that many positions (default: none up to 1024 positions, then length/512)."""
    import matplotlib.pyplot as plt
    pos, values = sample.statistic(kind, layer)
    pos = np.asarray(pos)
    numbers = list(sample._head_numbers(values.shape[0]))
    chosen = [head] if head is not None else (list(heads) if heads is not None else None)
    for h in chosen or []:
        if h not in numbers:
            raise KeyError(f"head {h} was not captured (captured heads: {', '.join(map(str, numbers))})")
    n = len(pos)
    window = (1 if n <= 1024 else n // 512) if smooth is None else int(smooth)
    curves = _smooth(np.asarray(values, np.float32), window)
    own = ax is None
    if own:
        _, ax = plt.subplots(figsize=(max(6, min(20, n / 6)), 3.5))
    mean = curves.mean(0)
    if chosen is None and n > 1024:
        ax.fill_between(pos, curves.min(0), curves.max(0), color="#9ecae1", alpha=0.5, lw=0,
                        label=f"lowest to highest of {len(numbers)} heads")
        ax.plot(pos, mean, lw=1.2, color="black", label="mean over heads")
    else:
        for h in (chosen if chosen is not None else numbers[:8]):
            ax.plot(pos, curves[numbers.index(h)], lw=0.9 if chosen is None else 1.2,
                    alpha=0.55 if chosen is None else 0.9, label=f"head {h}")
        if len(numbers) > 1:
            ax.plot(pos, mean, lw=2 if chosen is None else 1, color="black", label="mean over heads")
    ax.legend(fontsize=6, ncol=5)
    if n <= 2 * MAX_TICKS:
        tokens = _tokens(sample)
        every = max(1, int(np.ceil(n / MAX_TICKS)))
        ax.set_xticks(pos[::every])
        ax.set_xticklabels([_label(tokens, int(p)) for p in pos[::every]], rotation=90, fontsize=6)
    axis = "prompt key" if kind in KEY_STATS else "query position"
    ax.set_xlabel(axis if n <= 2 * MAX_TICKS else axis + " (position)")
    prompt = int(getattr(sample, "prompt_length", 0) or 0)
    if kind not in KEY_STATS and 0 < prompt <= pos.max():
        ax.axvline(prompt - 0.5, color="grey", ls="--", lw=0.8)
        ax.text(prompt - 0.5, 1.0, " generated", transform=ax.get_xaxis_transform(), fontsize=6, va="top",
                color="#555")
    ax.set_ylabel(kind)
    ax.set_xlim(pos.min() - 0.5, pos.max() + 0.5)
    what = "" if chosen is None else ", head " + ", ".join(map(str, chosen))
    ax.set_title(f"{kind}, layer {layer}{what}" + (f" (running mean over {window})" if window > 1 else ""))
    if own:
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


def has_attention(sample):
    """Whether the sample holds attention matrices (not only statistics)."""
    return getattr(sample, "form", "dense") != "none" and bool(
        getattr(sample, "_attention", None) or any(k.startswith("layer.") for k in getattr(sample, "tensors", {})))


def overview(sample, layer=None, head=None, log=False):
    """The sample's natural picture: a heatmap when it holds attention, its statistics otherwise."""
    if has_attention(sample):
        layers = sample.layers
        return heatmap(sample, layers[0] if layer is None else layer, head, log=log)
    return statistics_figure(sample, layer)


def _pool(a, p, gaps=False):
    """Mean over p x p tiles of [H, R, C] (edge tiles average what they cover). With `gaps`, NaN
    cells (not captured) are left out of a tile's mean, and a tile of only NaN stays NaN."""
    H, R, C = a.shape
    ri, ci = np.arange(0, R, p), np.arange(0, C, p)
    if not gaps:
        sums = np.add.reduceat(np.add.reduceat(a, ri, axis=1), ci, axis=2)
        rc = np.diff(np.append(ri, R)).astype(np.float32)
        cc = np.diff(np.append(ci, C)).astype(np.float32)
        return (sums / (rc[:, None] * cc[None, :])).astype(np.float32)
    known = np.isfinite(a)
    filled = np.where(known, a, 0).astype(np.float32)
    sums = np.add.reduceat(np.add.reduceat(filled, ri, axis=1), ci, axis=2)
    counts = np.add.reduceat(np.add.reduceat(known.astype(np.float32), ri, axis=1), ci, axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan).astype(np.float32)


def _pool_columns(a, p):
    """Mean over spans of p columns of [H, C] (the last span averages what it covers)."""
    idx = np.arange(0, a.shape[1], p)
    sums = np.add.reduceat(np.asarray(a, np.float32), idx, axis=1)
    counts = np.diff(np.append(idx, a.shape[1])).astype(np.float32)
    return sums / counts[None, :]


def _encode(a):
    """float16 little-endian bytes of `a`, base64 (the page decodes them into Float32Arrays)."""
    import base64
    with np.errstate(over="ignore"):
        return base64.b64encode(np.ascontiguousarray(a, dtype="<f2").tobytes()).decode("ascii")


def _view_plan(sample, budget):
    """What the page will embed, from shapes alone (no matrix is assembled): per attention layer
    (heads, rows, cols, tile side) and per statistic view (heads, positions, span), within
    `budget` numbers in all."""
    plan = []
    attention = has_attention(sample)
    stats = [(kind, layer) for kind in getattr(sample, "statistic_kinds", []) for layer in _stat_layers(sample, kind)]
    layers, heads = (list(sample.layers), _panel_heads(sample, None)) if attention else ([], [])
    share = budget / max(1, (len(layers) * len(heads)) + len(stats) * 0.25 * max(1, len(heads)))
    for layer in layers:
        rows = np.asarray(sample.positions(layer))
        if getattr(sample, "form", "dense") == "top_k":
            width = _top_k_width(sample, layer)
        else:
            width = (int(rows.max()) + 1) if len(rows) else 0
            if getattr(sample, "form", "dense") == "pooled":
                width = -(-width // max(1, sample.pool))
        n = max(len(rows), width)
        side = max(32, int(np.sqrt(share)))
        pool = 1 if n <= min(HTML_FULL_LIMIT, side) else int(np.ceil(n / min(side, 512)))
        plan.append(("attention", layer, len(heads), -(-len(rows) // pool), -(-width // pool), pool))
    for kind, layer in stats:
        pos, _ = sample.statistic(kind, layer)
        rows = len(sample._head_numbers(sample.statistic(kind, layer)[1].shape[0]))
        span = max(1, int(np.ceil(len(pos) / max(256, min(HTML_STAT_COLUMNS, share * 4 / max(1, rows))))))
        plan.append(("statistic", (kind, layer), rows, 1, -(-len(pos) // span), span))
    return plan


def page_bytes(sample, budget=None):
    """About how many bytes html_page(sample, budget) writes, from shapes alone."""
    numbers = sum(h * r * c for _, _, h, r, c, _ in _view_plan(sample, budget or HTML_BUDGET))
    tokens = _tokens(sample)
    return int(numbers * 2 * 4 / 3 + sum(len(t) + 8 for t in tokens) + 24 * len(tokens) + len(_TEMPLATE))


def _views(sample, budget=None):
    """What the page can show: per layer, one matrix per head (attention; tiles of tiles past
    HTML_FULL_LIMIT positions or the budget), or per statistic and layer a heads x positions
    matrix (spans of positions averaged past HTML_STAT_COLUMNS). One layer is assembled at a time."""
    views = []
    for kind, what, nheads, _, _, pool in _view_plan(sample, budget or HTML_BUDGET):
        if kind == "attention":
            layer, heads = what, _panel_heads(sample, None)
            top_k = getattr(sample, "form", "dense") == "top_k"
            if top_k:  # spread into [rows, keys], NaN where nothing was captured
                mats = []
                for h in heads:
                    m, rows, cols, step = matrix(sample, layer, h)
                    mats.append(np.ma.filled(np.ma.masked_array(m, dtype=np.float32), np.nan))
                a = np.stack(mats)
                del mats
            else:  # the layer assembled once, for all its heads
                a = np.asarray(sample.attention(layer), np.float32)
                rows = np.asarray(sample.positions(layer))
                step = getattr(sample, "pool", 1) if getattr(sample, "form", "dense") == "pooled" else 1
                cols = np.arange(a.shape[2]) * step
                if sample.reduced_heads:
                    a = a[:1]
                elif [sample.head_index(h) for h in heads] != list(range(a.shape[0])):
                    a = a[[sample.head_index(h) for h in heads]]
            if pool > 1:  # tiles of the tiles: positions stay in tokens
                a = _pool(a, pool, gaps=top_k)
                rows, cols, step = rows[::pool][:a.shape[1]], cols[::pool][:a.shape[2]], step * pool
            release = getattr(sample, "release_pages", None)
            if release is not None:  # a stored sample: the next layer's pages replace this one's
                release()
            labels = [sample.head_label(heads[0])] if sample.reduced_heads else [str(h) for h in heads]
            views.append({"name": f"layer {layer}", "kind": "attention", "labels": labels,
                          "shape": list(a.shape), "data": _encode(a), "rows": [int(r) for r in rows],
                          "cols": [int(c) for c in cols], "step": int(step), "causal": True,
                          "top_k": getattr(sample, "form", "dense") == "top_k"})
        else:
            stat, layer = what
            pos, values = sample.statistic(stat, layer)
            pos = np.asarray(pos)
            values = np.asarray(values, np.float32)
            if pool > 1:
                values, pos = _pool_columns(values, pool), pos[::pool]
            views.append({"name": f"{stat}, layer {layer}", "kind": "statistic", "labels": ["all"],
                          "shape": [1, values.shape[0], values.shape[1]], "data": _encode(values[None]),
                          "rows": [int(h) for h in sample._head_numbers(values.shape[0])],
                          "cols": [int(p) for p in pos], "step": int(pool), "causal": False, "row_label": "head",
                          "boundary": stat not in KEY_STATS})
    return views


def html_page(sample, title=None, budget=None):
    """A self-contained page: choose a view (layer, or statistic) and head; the heatmap uses the
    PNGs' colour map with a power or log scale and a colour bar, token labels where they fit;
    hovering a cell highlights its query row and key column and shows both tokens and the weight,
    and shades the token strip below by that query's attention (prompt and generated tokens told
    apart). At most `budget` numbers are embedded (default HTML_BUDGET, as float16): past it, and
    past HTML_FULL_LIMIT positions, the page shows tiles; hovering redraws only the crosshair."""
    import matplotlib
    views = _views(sample, budget)
    if not views:
        raise ValueError("the sample holds neither attention nor statistics")
    lut = [[int(255 * c) for c in matplotlib.colormaps[CMAP](i / 255)[:3]] for i in range(256)]
    tokens = _tokens(sample)
    prompt = int(getattr(sample, "prompt_length", 0) or 0)
    payload = json.dumps({"tokens": tokens, "prompt_length": prompt, "views": views, "lut": lut})
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
body{font-family:sans-serif;margin:16px;color:#222}
#strip{line-height:1.9;max-height:320px;overflow-y:auto;border:1px solid #ddd;padding:4px}
#strip span{padding:1px 2px;margin:1px;display:inline-block;border-radius:3px;white-space:pre;font-family:monospace;font-size:12px}
#strip span.gen{box-shadow:inset 0 -2px 0 #1f77b4;color:#0b3d6e}
#strip span.sep{background:#1f77b4;color:white;font-family:sans-serif;font-size:11px}
canvas{image-rendering:pixelated} #info{margin:8px 0;min-height:1.3em;font-family:monospace}
.row{display:flex;gap:12px;align-items:flex-start} label{margin-right:12px}
#stack{position:relative} #over{position:absolute;left:0;top:0;pointer-events:none}
#barbox{display:flex;flex-direction:column;align-items:center;font-size:11px;font-family:monospace;gap:2px}
</style></head><body>
<h3>__TITLE__</h3>
<label>view <select id="view"></select></label>
<label>head <select id="head"></select></label>
<label>scale <select id="scale"><option value="power">power (0.4)</option><option value="log">log</option>
<option value="linear">linear</option></select></label>
<div id="info"></div>
<div class="row"><div id="stack"><canvas id="map" width="640" height="640"></canvas><canvas id="over" width="640" height="640"></canvas></div>
<div id="barbox"><div id="barmax"></div><canvas id="bar" width="24" height="256"></canvas><div id="barmin"></div></div></div>
<h4>one query's attention over the text <small>(hover a row; <span style="box-shadow:inset 0 -2px 0 #1f77b4">underlined</span>: generated)</small></h4>
<div id="strip"></div>
<script>
const D = __DATA__;
const $ = id => document.getElementById(id);
const map = $('map'), over = $('over'), ctx = map.getContext('2d'), octx = over.getContext('2d'), strip = $('strip');
// float16 -> float32 by table: the views arrive as base64 float16.
const F16 = new Float32Array(65536);
(function () {
  for (let h = 0; h < 65536; h++) {
    const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 31, f = h & 1023;
    F16[h] = e === 0 ? s * f * Math.pow(2, -24) : e === 31 ? (f ? NaN : s * Infinity) : s * (1 + f / 1024) * Math.pow(2, e - 15);
  }
})();
function decode(v) {
  if (v.values) return v.values;
  const bin = atob(v.data), n = bin.length >> 1, out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = F16[bin.charCodeAt(2 * i) | (bin.charCodeAt(2 * i + 1) << 8)];
  v.values = out; delete v.data;
  return out;
}
D.views.forEach((v, i) => $('view').add(new Option(v.name, i)));
const state = Object.fromEntries(new URLSearchParams(location.hash.slice(1)));
function view() { return D.views[Number($('view').value)]; }
function fillHeads() {
  const keep = $('head').value, v = view(), n = v.shape[0];
  $('head').innerHTML = '';
  for (let h = 0; h < n; h++) $('head').add(new Option(v.labels[h], h));  // the model's head numbers
  $('head').value = keep !== '' && Number(keep) < n ? keep : '0';
  $('head').disabled = n === 1;
}
function scale(x, max) {
  const s = $('scale').value;
  if (!(max > 0) || !(x > 0)) return 0;
  if (s === 'log') return Math.max(0, 1 + Math.log10(x / max) / 4);
  return s === 'power' ? Math.pow(x / max, 0.4) : x / max;
}
function label(p) { const t = D.tokens[p]; return t === undefined || t === '' ? String(p) : JSON.stringify(t).slice(1, -1).slice(0, 10); }
// The geometry of a view: a square of attention cells, or statistics as bands of heads at least
// 18 px tall across the full width (8 heads x 8k positions stay readable).
const PAD = 90;
function geometry(v) {
  const R = v.shape[1], C = v.shape[2];
  if (v.kind === 'statistic') {
    const w = Math.min(1100, Math.max(400, C)), h = Math.max(18, Math.min(60, Math.floor(480 / R)));
    return {R, C, cw: w / C, ch: h, W: PAD + w + 10, H: PAD + h * R + 40};
  }
  const cell = 540 / Math.max(R, C);
  return {R, C, cw: cell, ch: cell, W: PAD + C * cell + 10, H: PAD + R * cell + 10};
}
const cache = new Map();  // (view, head, scale) -> the drawn matrix, so that a hover never redraws it
let M = null;
function draw() {
  const v = view(), head = Number($('head').value), all = decode(v), g = geometry(v), R = g.R, C = g.C;
  const m = all.subarray(head * R * C, (head + 1) * R * C);
  let max = -Infinity;
  for (let i = 0; i < m.length; i++) if (m[i] > max) max = m[i];  // a loop: no spread of huge rows
  M = {v, m, R, C, g, max};
  map.width = over.width = g.W; map.height = over.height = g.H;
  const key = $('view').value + '/' + head + '/' + $('scale').value;
  let off = cache.get(key);
  if (!off) {
    const img = new ImageData(C, R), px = img.data;
    for (let i = 0; i < R; i++) for (let j = 0; j < C; j++) {
      const k = 4 * (i * C + j), x = m[i * C + j];
      const future = v.causal && v.cols[j] > v.rows[i] + v.step - 1;
      const c = future ? [240, 240, 240] : Number.isNaN(x) ? [205, 205, 205] : D.lut[Math.min(255, Math.round(255 * scale(x, max)))];
      px[k] = c[0]; px[k + 1] = c[1]; px[k + 2] = c[2]; px[k + 3] = 255;
    }
    off = document.createElement('canvas'); off.width = C; off.height = R;
    off.getContext('2d').putImageData(img, 0, 0);
    cache.set(key, off);
  }
  ctx.clearRect(0, 0, map.width, map.height); ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, PAD, PAD, C * g.cw, R * g.ch);
  ctx.fillStyle = '#333'; ctx.font = '9px monospace';
  if (v.kind === 'statistic') {
    for (let i = 0; i < R; i++) ctx.fillText('head ' + v.rows[i], 2, PAD + (i + 0.6) * g.ch);
    const every = Math.max(1, Math.ceil(60 / g.cw));  // position numbers every 60 px or more
    for (let j = 0; j < C; j += every) ctx.fillText(String(v.cols[j]), PAD + j * g.cw, PAD + R * g.ch + 14);
    ctx.fillText('position' + (v.step > 1 ? ' (each column: the mean of ' + v.step + ')' : '') +
                 (v.boundary && D.prompt_length > 0 ? '; dashed: generation begins' : ''), PAD, PAD + R * g.ch + 30);
    if (v.boundary && D.prompt_length > 0 && v.cols[C - 1] + v.step - 1 >= D.prompt_length) {
      let j = 0; while (j < C && v.cols[j] + v.step - 1 < D.prompt_length) j++;
      ctx.save(); ctx.setLineDash([4, 3]); ctx.strokeStyle = '#222';
      ctx.beginPath(); ctx.moveTo(PAD + j * g.cw, PAD - 6); ctx.lineTo(PAD + j * g.cw, PAD + R * g.ch + 4); ctx.stroke(); ctx.restore();
    }
  } else {
    const every = Math.max(1, Math.ceil(10 / g.cw));
    for (let i = 0; i < R; i += every) ctx.fillText(v.step > 1 ? String(v.rows[i]) : label(v.rows[i]), 2, PAD + (i + 0.8) * g.ch);
    ctx.save(); ctx.rotate(-Math.PI / 2);
    for (let j = 0; j < C; j += every) ctx.fillText(v.step > 1 ? String(v.cols[j]) : label(v.cols[j]), -PAD + 2, PAD + (j + 0.8) * g.cw);
    ctx.restore();
    // Where the prompt ends: below its last row, right of its last key.
    const P = D.prompt_length;
    if (P > 0 && v.rows[R - 1] >= P) {
      let i = 0; while (i < R && v.rows[i] < P) i++;
      let j = 0; while (j < C && v.cols[j] + v.step - 1 < P) j++;
      ctx.save(); ctx.setLineDash([4, 3]); ctx.strokeStyle = 'rgba(255,255,255,0.85)';
      ctx.beginPath(); ctx.moveTo(PAD, PAD + i * g.ch); ctx.lineTo(PAD + C * g.cw, PAD + i * g.ch);
      ctx.moveTo(PAD + j * g.cw, PAD + i * g.ch); ctx.lineTo(PAD + j * g.cw, PAD + R * g.ch); ctx.stroke(); ctx.restore();
    }
  }
  const bar = $('bar').getContext('2d');
  for (let y = 0; y < 256; y++) { const c = D.lut[255 - y]; bar.fillStyle = `rgb(${c[0]},${c[1]},${c[2]})`; bar.fillRect(0, y, 24, 1); }
  $('barmax').textContent = Number.isFinite(max) ? max.toPrecision(3) : '-';
  $('barmin').textContent = $('scale').value === 'log' ? (max / 1e4).toPrecision(2) : '0';
  octx.clearRect(0, 0, over.width, over.height);
  location.hash = 'view=' + $('view').value + '&head=' + $('head').value + '&scale=' + $('scale').value;
}
// The strip: one span per position, generated ones underlined after a marker.
const spans = [];
D.tokens.forEach((t, p) => {
  if (p === D.prompt_length && p > 0) { const s = document.createElement('span'); s.className = 'sep'; s.textContent = 'generated \u2192'; strip.appendChild(s); }
  const s = document.createElement('span'); s.textContent = t === '' ? '#' + p : t;
  s.title = 'position ' + p + (p >= D.prompt_length ? ' (generated)' : ' (prompt)');
  if (p >= D.prompt_length) s.className = 'gen';
  strip.appendChild(s); spans.push(s);
});
strip.dataset.count = String(D.tokens.length);
strip.dataset.prompt = String(D.prompt_length);
let shaded = [];  // the spans the last hover shaded: only they are cleared
function hover(i, j) {
  if (!M || i < 0 || j < 0 || i >= M.R || j >= M.C) return;
  const g = M.g, v = M.v, x = M.m[i * M.C + j];
  octx.clearRect(0, 0, over.width, over.height);
  octx.strokeStyle = 'rgba(255,255,255,0.9)'; octx.lineWidth = 1;
  octx.strokeRect(PAD, PAD + i * g.ch, M.C * g.cw, g.ch); octx.strokeRect(PAD + j * g.cw, PAD, g.cw, M.R * g.ch);
  const q = v.rows[i], k = v.cols[j], val = Number.isNaN(x) ? 'not captured' : x.toPrecision(4);
  $('info').textContent = v.row_label
      ? v.row_label + ' ' + q + ', position ' + (v.step > 1 ? k + '-' + (k + v.step - 1) : k + ' "' + label(k) + '"') + ': ' + val
      : 'query ' + q + ' "' + label(q) + '" -> ' +
        (v.step > 1 ? 'keys ' + k + '-' + (k + v.step - 1) : 'key ' + k + ' "' + label(k) + '"') + ': ' + val;
  $('info').dataset.row = String(q); $('info').dataset.col = String(k);
  if (v.row_label || strip.dataset.query === String(q)) return;  // the strip already shows this row
  for (const s of shaded) { s.style.background = ''; s.style.outline = ''; }
  shaded = [];
  let max = 0;
  for (let c = 0; c < M.C; c++) { const w = M.m[i * M.C + c]; if (w > max) max = w; }
  for (let c = 0; c < M.C; c++) {
    const w = scale(M.m[i * M.C + c], max);
    if (!(w > 0.02)) continue;
    for (let p = v.cols[c]; p < v.cols[c] + v.step && p <= q + v.step - 1 && p < spans.length; p++) {
      spans[p].style.background = 'rgba(253,231,37,' + w.toFixed(3) + ')'; shaded.push(spans[p]);
    }
  }
  if (q < spans.length) { spans[q].style.outline = '1px solid #444'; shaded.push(spans[q]); }
  strip.dataset.query = String(q);
}
let pending = null;  // mouse moves coalesce into one hover per frame
map.addEventListener('mousemove', e => {
  const r = map.getBoundingClientRect();
  if (!M) return;
  pending = [Math.floor((e.clientY - r.top - PAD) / M.g.ch), Math.floor((e.clientX - r.left - PAD) / M.g.cw)];
  requestAnimationFrame(() => { if (pending) { const [i, j] = pending; pending = null; hover(i, j); } });
});
$('view').value = state.view && D.views[Number(state.view)] ? state.view : '0';
fillHeads();
if (state.head) $('head').value = Number(state.head) < view().shape[0] ? state.head : '0';
if (state.scale) $('scale').value = state.scale;
$('view').onchange = () => { fillHeads(); strip.dataset.query = ''; draw(); };
$('head').onchange = () => { strip.dataset.query = ''; draw(); };
$('scale').onchange = () => { strip.dataset.query = ''; draw(); };
draw();
if (state.hover) { const [i, j] = state.hover.split(',').map(Number); hover(i, j); }
</script></body></html>
"""


if __name__ == "__main__":  # python -m attnscope.view: the command line is viewer_cli.py
    from attnscope.viewer_cli import main

    main()
