"""What a what-if run costs (issue 24's target: <= 2.2x a plain generation with the same capture):
StreamAttention on the prototype's checkpoint (tests/tools/checkpoint.py bench_prototype: 4 layers,
hidden 256, 8/4 heads), a 512-token prompt, 32 new tokens, statistics captured for every layer, plain
and under each intervention, best of RUNS wall times of the whole call, in one run on one machine.
Interpreter: Debian's /usr/bin/python3 (python3-grpcio, numpy), like tests/python.
    /usr/bin/python3 bench/whatif.py [BUILD]        (BUILD: default build; RUNS: default 3)

Memory (--memory): the intervened cache each KV policy leaves at 4k and 16k prompt tokens (the sum
over layers of cache_bytes after each layer's last decision: kept keys and values, padding, room
for the tokens still to come, slot positions) against the unmodified model's cache for the same
tokens, on tests/tools/checkpoint.py bench_long (4 layers, 8/2 heads, head_dim 32, float32, 40k
positions), 32 new tokens, nothing captured. The fraction saved carries over to any model with
the same policy and lengths (the cache is per (layer, kv head) slots x head_dim x dtype).
    /usr/bin/python3 bench/whatif.py --memory [BUILD]"""
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
MEMORY = "--memory" in sys.argv[1:]
ARGS = [a for a in sys.argv[1:] if a != "--memory"]
BUILD = ARGS[0] if ARGS else os.path.join(ROOT, "build")
os.environ["ATTNSCOPE_BUILD_DIR"] = BUILD
from service_fixture import Server, setup_paths  # noqa: E402

setup_paths(BUILD)
import attnscope  # noqa: E402
import numpy as np  # noqa: E402

RUNS = int(os.environ.get("RUNS", "3"))
MODEL = "/tmp/attnscope-bench-long" if MEMORY else "/tmp/attnscope-bench-prototype"
if not os.path.exists(os.path.join(MODEL, "config.json")):
    subprocess.run([sys.executable, os.path.join(ROOT, "tests", "tools", "checkpoint.py"),
                    "bench_long" if MEMORY else "bench_prototype", MODEL], check=True, stdout=subprocess.DEVNULL)
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

MEMORY_LENGTHS = (4096, 16384)
MEMORY_NEW = 32
MEMORY_CASES = [
    ("streaming_llm, half the keys", dict(kind="streaming_llm", compression_ratio=0.5)),
    ("streaming_llm, 1024 keys, every 8 steps", dict(kind="streaming_llm", budget=1024, decode_interval=8)),
    ("h2o, half the keys", dict(kind="h2o", compression_ratio=0.5)),
    ("h2o, 1024 keys, every 8 steps", dict(kind="h2o", budget=1024, decode_interval=8)),
    ("snapkv, half the keys", dict(kind="snapkv", compression_ratio=0.5)),
    ("snapkv, three quarters evicted", dict(kind="snapkv", compression_ratio=0.75)),
    ("pyramidkv, half the keys", dict(kind="pyramidkv", compression_ratio=0.5)),
    ("snapkv adaptive (Ada-KV), half the keys", dict(kind="snapkv", compression_ratio=0.5, adaptive=True)),
]


def memory(client):
    import json
    with open(os.path.join(MODEL, "config.json")) as f:
        cfg = json.load(f)
    layers, kv = cfg["num_hidden_layers"], cfg["num_key_value_heads"]
    dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    print("| policy | prompt | full cache (MiB) | policy's cache (MiB) | saved | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for n in MEMORY_LENGTHS:
        prompt = [1] + [int(x) for x in np.random.default_rng(n).integers(3, 30000, n - 1)]
        full = layers * 2 * kv * dim * 4 * (n + MEMORY_NEW - 1)  # float32 k and v, every position
        for name, policy in MEMORY_CASES:
            t0 = time.perf_counter()
            r = client.stream_attention(token_ids=prompt, max_new_tokens=MEMORY_NEW, ignore_eos=True, form="none",
                                        kv_policy=policy)
            seconds = time.perf_counter() - t0
            last = {}
            for d in r.kv_decisions:  # each layer's last decision
                if d.layer not in last or d.step >= last[d.layer].step:
                    last[d.layer] = d
            kept = sum(d.cache_bytes for d in last.values())
            print(f"| {name} | {n} | {full / 2**20:.1f} | {kept / 2**20:.1f} | {1 - kept / full:.1%} | {seconds:.1f} |",
                  flush=True)


def main():
    server = Server(os.path.join(BUILD, "server", "attnscope-server"), MODEL)
    client = attnscope.Client(server.target, timeout=600)
    rows = []
    if MEMORY:
        try:
            memory(client)
        finally:
            client.close()
            server.stop()
        return
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
