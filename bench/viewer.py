"""What the pictures and the HTML page cost (issue 25's targets: a 32 x 32 head grid at 128 tokens
in <= 2 s; a 2k dense page written in <= 3 s and <= 500 MB peak; a hover well under 100 ms at 8k
positions). Captures from the demo checkpoint (tests/tools/checkpoint.py demo_llama3: 4 layers,
8 heads, the Llama 3 tokenizer when deploy/fetch-tokenizers.sh has fetched it) through a server of
BUILD: 128 tokens dense, 2k dense, 8k statistics (row_entropy, sink_mass, local_mass, key_score).
For each: `python -m attnscope.view SAMPLE --html PAGE` in its own process (wall time, peak RSS,
page bytes), then the page in headless Chromium (tests/tools/page_check.mjs: load, 30 hovers,
each from the event to the next frame and the hover's own work). Then the grid: view.head_grid of
a 32 x 32-head, 128-token sample (drawing and writing the PNG), and the same panels drawn the way
one did before it (view.heatmap into a 32 x 32 subplot grid, 4 x 8 timed and scaled).
Interpreter: Debian's /usr/bin/python3 (numpy, matplotlib, python3-grpcio), like tests/python.
    /usr/bin/python3 bench/viewer.py [BUILD] [--package DIR] [--shots DIR]
--package: the attnscope package to measure (default client/python; e.g. an older checkout's, for
a before/after); --shots: keep the pages' screenshots there."""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
args = sys.argv[1:]


def option(name, default):
    if name in args:
        i = args.index(name)
        value = args[i + 1]
        del args[i:i + 2]
        return value
    return default


PACKAGE = os.path.abspath(option("--package", os.path.join(ROOT, "client", "python")))
SHOTS = option("--shots", None)
BUILD = os.path.abspath(args[0] if args else os.path.join(ROOT, "build"))
sys.path[:0] = [os.path.join(ROOT, "tests", "python")]
os.environ["ATTNSCOPE_BUILD_DIR"] = BUILD
from service_fixture import Server  # noqa: E402

sys.path[:0] = [PACKAGE, os.path.join(BUILD, "python")]
import numpy as np  # noqa: E402

import attnscope  # noqa: E402

NPM = os.environ.get("ATTNSCOPE_NPM_DIR", os.path.expanduser("~/.cache/attnscope/npm"))
TOKENIZER = os.path.join(NPM, "node_modules", "@lenml", "tokenizer-llama3_1", "models", "tokenizer.json")
MODEL = "/tmp/attnscope-bench-demo"
if not os.path.exists(os.path.join(MODEL, "config.json")):
    subprocess.run([sys.executable, os.path.join(ROOT, "tests", "tools", "checkpoint.py"), "demo_llama3", MODEL,
                    "--seed", "7"], check=True, stdout=subprocess.DEVNULL)
if os.path.exists(TOKENIZER) and not os.path.exists(os.path.join(MODEL, "tokenizer.json")):
    with open(TOKENIZER, "rb") as src, open(os.path.join(MODEL, "tokenizer.json"), "wb") as dst:
        dst.write(src.read())


def capture(client, n, new, **spec):
    text = ("The capital of France is Paris, and the capital of Italy is Rome. " * (n // 14 + 2))
    ids, _ = client.tokenize(text) if os.path.exists(os.path.join(MODEL, "tokenizer.json")) else ([], [])
    ids = ids[:n] if ids else [128000] + [int(x) for x in np.random.default_rng(0).integers(1000, 100000, n - 1)]
    return client.stream_attention(token_ids=ids, max_new_tokens=new, ignore_eos=True, **spec)


# The viewer's command line, then its own peak RSS (VmHWM: the process image's, not counting what
# it shared with this process before exec, which ru_maxrss would).
VIEWER = ("import runpy, sys\n"
          "sys.argv = ['attnscope.view'] + sys.argv[1:]\n"
          "runpy.run_module('attnscope.view', run_name='__main__', alter_sys=True)\n"
          "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
          "print('VmHWM_kB', hwm, file=sys.stderr)\n")


def write_page(sample_path, page_path):
    """(seconds, peak RSS in MB) of `python -m attnscope.view SAMPLE --html PAGE` in its own process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([PACKAGE, os.path.join(BUILD, "python")])}
    started = time.time()
    p = subprocess.run([sys.executable, "-c", VIEWER, sample_path, "--html", page_path], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=1800)
    seconds = time.time() - started
    if p.returncode != 0:
        raise SystemExit(f"the viewer failed on {sample_path}: {p.stderr[-2000:]}")
    hwm = [line for line in p.stderr.splitlines() if line.startswith("VmHWM_kB")][-1].split()[1]
    return seconds, int(hwm) / 1024


def browse(page_path, shot):
    p = subprocess.run(["node", os.path.join(ROOT, "tests", "tools", "page_check.mjs"), page_path, shot, "30"],
                       capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        return {"errors": [p.stderr[-500:]]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def grid_sample(layers=32, heads=32, T=128):
    from attnscope.sample import Sample
    g = np.random.default_rng(0)
    tensors = {}
    for layer in range(layers):
        a = np.tril(g.random((heads, T, T), np.float32) + 1e-3)
        tensors[f"attention.prefill.{layer}.0.0"] = a / a.sum(-1, keepdims=True)
    meta = {"prompt_token_ids": list(range(T - 8)), "prompt_pieces": [f"t{i}" for i in range(T - 8)],
            "token_ids": list(range(9)), "token_pieces": [f"g{i}" for i in range(9)], "num_heads": heads,
            "num_layers": layers, "capture": {"form": "FORM_DENSE", "heads": list(range(heads)),
                                              "layers": list(range(layers))}}
    return Sample(None, tensors, meta)


def main():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from attnscope import view
    out = tempfile.mkdtemp(prefix="attnscope-bench-viewer-")
    print(f"package {PACKAGE}; build {BUILD}; files in {out}")
    server = Server(os.path.join(BUILD, "server", "attnscope-server"), MODEL, "--max_capture_bytes=4000000000")
    try:
        with attnscope.Client(server.target, max_bytes=0) as c:
            cases = [("128 dense", capture(c, 120, 8, form="dense")),
                     ("2k dense", capture(c, 2040, 8, form="dense")),
                     ("8k statistics", capture(c, 8000, 15, form="none", row_entropy=True, sink_mass=4,
                                               local_mass=32, key_score=64))]
            paths = []
            for name, r in cases:
                path = os.path.join(out, name.replace(" ", "_") + ".safetensors")
                r.save(path)
                paths.append((name, path))
                del r
            del cases
    finally:
        server.stop()
    print("| sample | positions | page written in | peak RSS | page size | load in Chromium | hover, event to frame (median / max) | hover's own work (median / max) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, path in paths:
        page = path.replace(".safetensors", ".html")
        seconds, peak = write_page(path, page)
        shot = os.path.join(SHOTS or out, name.replace(" ", "_") + ".png")
        if SHOTS:
            os.makedirs(SHOTS, exist_ok=True)
        b = browse(page, shot)
        positions = len(attnscope.load(path).token_ids)
        if b.get("errors"):
            print(f"| {name} | {positions} | {seconds:.2f} s | {peak:.0f} MB | {os.path.getsize(page) / 1e6:.1f} MB | "
                  f"errors: {b['errors'][:2]} | | |")
            continue
        h, w = b["hover_ms"], b["work_ms"]
        print(f"| {name} | {positions} | {seconds:.2f} s | {peak:.0f} MB | {os.path.getsize(page) / 1e6:.1f} MB | "
              f"{b['load_ms'] / 1e3:.2f} s | {statistics.median(h):.1f} / {max(h):.1f} ms | "
              f"{statistics.median(w):.2f} / {max(w):.2f} ms |")
    s = grid_sample()
    if hasattr(view, "head_grid"):
        started = time.time()
        fig = view.head_grid(s)
        fig.savefig(os.path.join(out, "grid.png"), dpi=100)
        plt.close(fig)
        print(f"head_grid, 32 layers x 32 heads, 128 tokens, drawn and written: {time.time() - started:.2f} s")
    started = time.time()
    fig, axes = plt.subplots(4, 8, figsize=(32, 16))
    for i, ax in enumerate(axes.flat):
        view.heatmap(s, i // 8, i % 8, ax=ax)
    fig.savefig(os.path.join(out, "heatmaps.png"), dpi=60)
    plt.close(fig)
    took = time.time() - started
    print(f"view.heatmap into a 4 x 8 subplot grid, drawn and written: {took:.2f} s "
          f"(32 x 32 at that rate: about {took * 32:.0f} s)")


if __name__ == "__main__":
    main()
