"""What a what-if run costs (issue 24's target: <= 2.2x a plain generation with the same capture):
StreamAttention on the prototype's checkpoint (tests/tools/checkpoint.py bench_prototype: 4 layers,
hidden 256, 8/4 heads), a 512-token prompt, 32 new tokens, statistics captured for every layer, plain
and under each intervention, best of RUNS wall times of the whole call, in one run on one machine.
Interpreter: Debian's /usr/bin/python3 (python3-grpcio, numpy), like tests/python.
    /usr/bin/python3 bench/whatif.py [BUILD]        (BUILD: default build; RUNS: default 3)"""
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
BUILD = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build")
os.environ["ATTNSCOPE_BUILD_DIR"] = BUILD
from service_fixture import Server, setup_paths  # noqa: E402

setup_paths(BUILD)
import attnscope  # noqa: E402
import numpy as np  # noqa: E402

RUNS = int(os.environ.get("RUNS", "3"))
MODEL = "/tmp/attnscope-bench-prototype"
if not os.path.exists(os.path.join(MODEL, "config.json")):
    subprocess.run([sys.executable, os.path.join(ROOT, "tests", "tools", "checkpoint.py"), "bench_prototype", MODEL],
                   check=True, stdout=subprocess.DEVNULL)
PROMPT = [1] + [int(x) for x in np.random.default_rng(0).integers(3, 1000, 511)]
CAPTURE = dict(row_entropy=True, key_score=64, sink_mass=4, local_mass=64)
CASES = [
    ("plain", {}),
    ("knockout of 64 keys, every layer", dict(knockout=[dict(keys=[(100, 164)])])),
    ("mean ablation of 2 heads", dict(ablate=[dict(layer=1, heads=[0, 5], kind="mean")])),
    ("streaming_llm, half the keys", dict(kv_policy=dict(kind="streaming_llm", compression_ratio=0.5))),
    ("snapkv, half the keys", dict(kv_policy=dict(kind="snapkv", compression_ratio=0.5))),
    ("h2o adaptive, half the keys", dict(kv_policy=dict(kind="h2o", compression_ratio=0.5, adaptive=True))),
]


def main():
    server = Server(os.path.join(BUILD, "server", "attnscope-server"), MODEL)
    client = attnscope.Client(server.target, timeout=600)
    rows = []
    try:
        for name, kwargs in CASES:
            best = float("inf")
            for _ in range(RUNS):
                t0 = time.perf_counter()
                r = client.stream_attention(token_ids=PROMPT, max_new_tokens=32, ignore_eos=True, **CAPTURE, **kwargs)
                best = min(best, time.perf_counter() - t0)
                assert len(r.generated_ids) == 32
            rows.append((name, best))
    finally:
        client.close()
        server.stop()
    plain = rows[0][1]
    print("| run | seconds | vs plain |\n| --- | ---: | ---: |")
    for name, t in rows:
        print(f"| {name} | {t:.3f} | {t / plain:.2f}x |")


if __name__ == "__main__":
    main()
