"""The reference viewer: heatmaps, layer and head comparisons (matplotlib), and a self-contained
interactive HTML page.

    /usr/bin/python3 -m attnscope.view SAMPLE --layer 0 --head 0 --out heatmap.png
    /usr/bin/python3 -m attnscope.view SAMPLE --compare-layers 0,8,16 --out layers.png
    /usr/bin/python3 -m attnscope.view SAMPLE --compare-heads --layer 0 --out heads.png
    /usr/bin/python3 -m attnscope.view SAMPLE --html page.html
    /usr/bin/python3 -m attnscope.view SAMPLE --export-pickle sample.pkl
"""
import argparse
import html
import json

import numpy as np

from .sample import load

MAX_TICKS = 40          # token labels shown per axis at most
HTML_FULL_LIMIT = 1024  # above this many tokens the page shows downsampled tiles
HTML_BUDGET = 4_000_000  # numbers embedded in a page at most (all layers and heads together)


def _norm(log, vmax):
    import matplotlib.colors as mcolors
    if log:
        return mcolors.LogNorm(vmin=max(vmax * 1e-4, 1e-8), vmax=vmax)
    # A power norm lifts small weights into view; attention rows are mostly small numbers.
    return mcolors.PowerNorm(gamma=0.4, vmin=0.0, vmax=vmax)


def _ticks(ax, tokens):
    n = len(tokens)
    step = max(1, int(np.ceil(n / MAX_TICKS)))
    idx = list(range(0, n, step))
    labels = [repr(tokens[i])[1:-1][:12] for i in idx]
    ax.set_xticks(idx)
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_yticks(idx)
    ax.set_yticklabels(labels, fontsize=6)


def heatmap(sample, layer, head, ax=None, log=False):
    """Attention of one layer and head, keys on x, queries on y, tokens as labels."""
    import matplotlib.pyplot as plt
    a = sample.attention(layer)[head]
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 7))
    masked = np.ma.masked_where(np.triu(np.ones_like(a, dtype=bool), 1), a)
    if log:
        masked = np.ma.masked_less_equal(masked, 0)
    im = ax.imshow(masked, cmap="viridis", norm=_norm(log, float(a.max()) or 1.0), interpolation="nearest")
    _ticks(ax, sample.tokens)
    ax.set_title(f"layer {layer}, head {head}")
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.figure.colorbar(im, ax=ax, fraction=0.046)
    ax.figure.tight_layout()
    return ax.figure


def _grid(sample, panels, title, log):
    import matplotlib.pyplot as plt
    n = len(panels)
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (layer, head) in zip(axes.flat, panels):
        a = sample.attention(layer)[head]
        ax.imshow(np.ma.masked_where(np.triu(np.ones_like(a, dtype=bool), 1), a), cmap="viridis",
                  norm=_norm(log, float(a.max()) or 1.0), interpolation="nearest")
        ax.set_title(f"layer {layer}, head {head}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def compare_layers(sample, layers, head=0, log=False):
    return _grid(sample, [(l, head) for l in layers], f"head {head} across layers", log)


def compare_heads(sample, layer, heads=None, log=False):
    heads = list(range(sample.attention(layer).shape[0])) if heads is None else heads
    return _grid(sample, [(layer, h) for h in heads], f"layer {layer}: heads", log)


def _pool(a, p):
    """Mean over p×p tiles (edge tiles average what they cover)."""
    H, T, _ = a.shape
    n = -(-T // p)
    pad = np.zeros((H, n * p, n * p), np.float32)
    pad[:, :T, :T] = a
    sums = pad.reshape(H, n, p, n, p).sum(axis=(2, 4))
    counts = np.minimum(p, T - np.arange(n) * p).astype(np.float32)
    return sums / (counts[:, None] * counts[None, :])


def html_page(sample, title=None):
    """A self-contained page: choose layer and head, hover a token to see its attention row.
    Above HTML_FULL_LIMIT tokens the matrices are shown as downsampled tiles."""
    tokens = sample.tokens
    T = len(tokens)
    layers = sample.layers
    heads = sample.attention(layers[0]).shape[0]
    side = max(32, int(np.sqrt(HTML_BUDGET / (len(layers) * heads))))
    pool = 1 if T <= min(HTML_FULL_LIMIT, side) else int(np.ceil(T / min(side, 512)))
    data = {}
    for layer in layers:
        a = sample.attention(layer)
        if pool > 1:
            a = _pool(a, pool)
        data[str(layer)] = np.round(a, 5).tolist()
    # Token pieces are untrusted text: inside <script>, '<', '>' and '&' must not appear literally
    # (a piece "</script>" would end the script), nor U+2028/2029 (line ends in older JavaScript).
    payload = json.dumps({"tokens": tokens, "layers": layers, "pool": pool, "attention": data})
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                    ("\u2029", "\\u2029")):
        payload = payload.replace(ch, esc)
    return _TEMPLATE.replace("__TITLE__", html.escape(title or str(sample.path))).replace("__DATA__", payload)


_TEMPLATE = """<!doctype html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font-family:sans-serif;margin:16px} #tokens span{padding:1px 2px;margin:1px;display:inline-block;
border-radius:3px;cursor:pointer;white-space:pre} canvas{border:1px solid #ccc;image-rendering:pixelated}
#info{margin:8px 0;color:#444}
</style></head><body>
<h3>__TITLE__</h3>
<label>layer <select id="layer"></select></label>
<label>head <select id="head"></select></label>
<div id="info"></div>
<canvas id="map" width="512" height="512"></canvas>
<div id="tokens"></div>
<script>
const D = __DATA__;
const layerSel = document.getElementById('layer'), headSel = document.getElementById('head');
const info = document.getElementById('info'), canvas = document.getElementById('map');
const tokensDiv = document.getElementById('tokens');
D.layers.forEach(l => layerSel.add(new Option(l, l)));
const nHeads = D.attention[String(D.layers[0])].length;
for (let h = 0; h < nHeads; h++) headSel.add(new Option(h, h));
function matrix() { return D.attention[layerSel.value][Number(headSel.value)]; }
function draw() {
  const m = matrix(), n = m.length, ctx = canvas.getContext('2d');
  const img = ctx.createImageData(n, n);
  let max = 0; m.forEach(r => r.forEach(v => { if (v > max) max = v; }));
  for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) {
    // Above the diagonal (future keys) stays light grey; weights use a power scale to show small ones.
    const v = Math.pow(m[i][j] / (max || 1), 0.4), k = 4 * (i * n + j), future = j > i;
    img.data[k] = future ? 235 : 255 * v; img.data[k + 1] = future ? 235 : 80 * v;
    img.data[k + 2] = future ? 235 : 255 * (1 - v); img.data[k + 3] = 255;
  }
  const off = document.createElement('canvas'); off.width = n; off.height = n;
  off.getContext('2d').putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false; ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(off, 0, 0, canvas.width, canvas.height);
  info.textContent = D.tokens.length + ' tokens' + (D.pool > 1 ? ', shown as ' + D.pool + 'x' + D.pool + ' tiles' : '');
}
function showRow(q) {
  const row = matrix()[Math.floor(q / D.pool)]; let max = 0; row.forEach(v => { if (v > max) max = v; });
  tokensDiv.querySelectorAll('span').forEach((s, k) => {
    const v = k <= q ? row[Math.floor(k / D.pool)] / (max || 1) : 0;
    s.style.background = 'rgba(255,80,0,' + v.toFixed(3) + ')';
  });
}
D.tokens.forEach((t, q) => {
  const s = document.createElement('span'); s.textContent = t; s.title = 'position ' + q;
  s.addEventListener('mouseenter', () => showRow(q)); tokensDiv.appendChild(s);
});
tokensDiv.dataset.count = String(D.tokens.length);
layerSel.onchange = draw; headSel.onchange = draw; draw();
</script></body></html>
"""


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m attnscope.view", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sample")
    ap.add_argument("--allow-unsafe-pickle", action="store_true",
                    help="load a .pkl with plain pickle (runs whatever it holds: only for files you trust)")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--head", type=int, default=0)
    ap.add_argument("--compare-layers", default=None, help="comma-separated layers")
    ap.add_argument("--compare-heads", action="store_true")
    ap.add_argument("--log", action="store_true", help="logarithmic colour scale")
    ap.add_argument("--out", default=None, help="PNG file")
    ap.add_argument("--html", default=None, help="write the interactive HTML page here")
    ap.add_argument("--export-pickle", default=None, help="write the prototype's pickle layout here")
    a = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    s = load(a.sample, allow_unsafe_pickle=a.allow_unsafe_pickle)
    layer = s.layers[0] if a.layer is None else a.layer
    if a.export_pickle:
        s.to_pickle(a.export_pickle)
        print(f"wrote {a.export_pickle}")
    if a.html:
        with open(a.html, "w", encoding="utf-8") as f:
            f.write(html_page(s))
        print(f"wrote {a.html}")
    if a.out:
        if a.compare_layers:
            fig = compare_layers(s, [int(x) for x in a.compare_layers.split(",")], a.head, a.log)
        elif a.compare_heads:
            fig = compare_heads(s, layer, log=a.log)
        else:
            fig = heatmap(s, layer, a.head, log=a.log)
        fig.savefig(a.out, dpi=110)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
