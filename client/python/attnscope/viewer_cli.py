"""The viewer's command line (python -m attnscope.view, python -m attnscope): opens a stored
sample and writes the pictures of attnscope.view. Kept apart from view.py, so that the pictures
depend on nothing else in the package (results, samples and stream results all draw through it)."""
import argparse
import glob
import os

from attnscope import view
from attnscope.sample import load


def first_sample(folder="attention_data"):
    """The prototype's viewer opened the first sample of attention_data/ when given none."""
    found = sorted(glob.glob(os.path.join(folder, "attention_sample_*.safetensors")) +
                   glob.glob(os.path.join(folder, "attention_sample_*.pkl")),
                   key=lambda p: (int(''.join(c for c in os.path.basename(p) if c.isdigit()) or 0), p))
    if not found:
        raise SystemExit(f"no sample given and none in {folder}/ (attention_sample_N.safetensors or .pkl)")
    return found[0]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m attnscope.view", description=view.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sample", nargs="?", default=None,
                    help="a stored sample (default: the first in attention_data/, as the prototype's viewer)")
    ap.add_argument("--allow-unsafe-pickle", action="store_true",
                    help="load a .pkl with plain pickle (runs whatever it holds: only for files you trust)")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--head", type=int, default=None, help="the model's head number (default: the first captured)")
    ap.add_argument("--compare-layers", default=None, help="comma-separated layers")
    ap.add_argument("--compare-heads", action="store_true")
    ap.add_argument("--grid", action="store_true",
                    help="every layer x head pattern in one figure, one colour scale (--layers/--heads choose)")
    ap.add_argument("--layers", default=None, help="with --grid: comma-separated layers (default: all)")
    ap.add_argument("--heads", default=None, help="with --grid: comma-separated heads (default: all captured)")
    ap.add_argument("--stat", default=None,
                    help="a captured statistic (row_entropy, sink_mass, local_mass, key_score, key_score_variance), "
                         "or 'all'")
    ap.add_argument("--log", action="store_true", help="logarithmic colour scale")
    ap.add_argument("--divergence", action="store_true",
                    help="interventions: KL, top-1 agreement and rank over steps, the lost-mass map and "
                         "the KV policy's kept keys (of --layer)")
    ap.add_argument("--lost-mass", action="store_true",
                    help="interventions: the layer x head map of the full model's mass on hidden keys")
    ap.add_argument("--step", type=int, default=None, help="with --lost-mass: one generated step (1-based)")
    ap.add_argument("--kept", action="store_true", help="the KV policy's kept and evicted keys of --layer")
    ap.add_argument("--out", default=None,
                    help="PNG file (default with no other output: what the prototype drew, <sample>.png with "
                         "the heatmap, <sample>_layers.png and <sample>_heads.png)")
    ap.add_argument("--html", default=None, help="write the interactive HTML page here")
    ap.add_argument("--export-pickle", default=None, help="write the prototype's pickle layout here")
    a = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    path = a.sample or first_sample()
    s = load(path, allow_unsafe_pickle=a.allow_unsafe_pickle)
    if a.export_pickle:
        s.to_pickle(a.export_pickle)
        print(f"wrote {a.export_pickle}")
    if a.html:
        with open(a.html, "w", encoding="utf-8") as f:
            f.write(view.html_page(s))
        print(f"wrote {a.html}")
    out = a.out
    kind_given = a.divergence or a.lost_mass or a.kept or a.stat or a.compare_layers or a.compare_heads or a.grid
    if out is None and not (a.html or a.export_pickle):
        stem = os.path.splitext(os.path.basename(path))[0]
        if not kind_given and view.has_attention(s):
            # The prototype's viewer: a heatmap, a layer comparison and a head comparison.
            layers = list(s.layers)
            picks = sorted({layers[round(i * (len(layers) - 1) / 3)] for i in range(4)}) if len(layers) > 4 else layers
            layer = layers[0] if a.layer is None else a.layer
            for name, fig in ((f"{stem}.png", lambda: view.overview(s, a.layer, a.head, a.log)),
                              (f"{stem}_layers.png", lambda: view.compare_layers(s, picks, a.head, a.log)),
                              (f"{stem}_heads.png", lambda: view.compare_heads(s, layer, log=a.log))):
                fig().savefig(name, dpi=110)
                print(f"wrote {name}")
            return
        out = stem + ".png"
    if out:
        if a.divergence:
            fig = view.intervention_figure(s, a.layer)
        elif a.lost_mass:
            fig = view.lost_mass_map(s, a.step)
        elif a.kept:
            layers = sorted({int(d["layer"]) for d in s._kv_rows})
            if not layers:
                raise SystemExit(f"{path}: no KV policy decisions (the request had no kv_policy)")
            fig = view.kept_figure(s, layers[0] if a.layer is None else a.layer)
        elif a.stat == "all":
            fig = view.statistics_figure(s, a.layer)
        elif a.stat:
            layer = a.layer if a.layer is not None else view._stat_layers(s, a.stat)[:1] or [0]
            layer = layer[0] if isinstance(layer, list) else layer
            fig = view.statistic_positions(s, a.stat, layer) if a.layer is not None else view.statistic_overview(s, a.stat)
        elif a.grid:
            fig = view.head_grid(s, [int(x) for x in a.layers.split(",")] if a.layers else None,
                                 [int(x) for x in a.heads.split(",")] if a.heads else None, log=a.log)
        elif a.compare_layers:
            fig = view.compare_layers(s, [int(x) for x in a.compare_layers.split(",")], a.head, a.log)
        elif a.compare_heads:
            fig = view.compare_heads(s, s.layers[0] if a.layer is None else a.layer, log=a.log)
        else:
            fig = view.overview(s, a.layer, a.head, a.log)
        fig.savefig(out, dpi=110)
        print(f"wrote {out}")
