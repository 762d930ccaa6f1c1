"""Runs StreamAttention requests against an attnscope-server on a checkpoint and writes what came
back as JSON, for tests run by another interpreter (tests/peers, under the project venv, which has
no gRPC): generated ids, per-step divergence and lost mass, the KV policy's decisions (kept masks and
scores per layer). Interpreter: Debian's /usr/bin/python3 (python3-grpcio, numpy), like tests/python.
    /usr/bin/python3 tests/tools/serve_requests.py MODEL_DIR REQUESTS.json OUT.json
REQUESTS.json: a list of keyword dicts for attnscope.Client.stream_attention."""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))
from conftest import BUILD, binary  # noqa: E402
from service_fixture import Server, setup_paths  # noqa: E402

setup_paths(BUILD)
import attnscope  # noqa: E402
from attnscope.client import kv_decision_arrays  # noqa: E402


def main(model_dir, requests_path, out_path):
    with open(requests_path) as f:
        requests = json.load(f)
    server = Server(binary("attnscope-server"), model_dir)
    client = attnscope.Client(server.target, timeout=300)
    out = []
    try:
        for kwargs in requests:
            r = client.stream_attention(**kwargs)
            decisions = []
            for d in r.kv_decisions:
                kept, scores = kv_decision_arrays(d)
                decisions.append({"layer": d.layer, "step": d.step, "kept": kept.astype(int).tolist(),
                                  "scores": None if scores is None else scores.tolist(),
                                  "bytes_freed": d.bytes_freed})
            table = r.divergence()
            out.append({"generated_ids": r.generated_ids, "kl": [float(x) for x in table["kl"]],
                        "top1_agree": [bool(x) for x in table["top1_agree"]],
                        "rank": [int(x) for x in table["rank"]], "lost_mass": r.lost_mass().tolist(),
                        "decisions": decisions})
    finally:
        client.close()
        server.stop()
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
