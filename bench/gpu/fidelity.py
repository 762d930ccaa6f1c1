"""Fidelity on the GPU: the engine on CUDA against the engine on CPU, the float64 numpy reference,
and transformers eager (output_attentions=True), for every tiny test checkpoint.
    python3 bench/gpu/fidelity.py --build build-gpu --out OUT
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [os.path.join(ROOT, "tests", "tools"), os.path.join(ROOT, "tests", "python")]
import checkpoint  # noqa: E402
import reference  # noqa: E402
import stfile  # noqa: E402
from conftest import Run  # noqa: E402

PROMPT = [1, 17, 42, 99, 7, 23, 64, 5, 88, 31, 12, 77]


def run(build, model, ids, new, *extra):
    out = f"/tmp/fid-{os.getpid()}.safetensors"
    cmd = [os.path.join(build, "tools", "attnscope-run"), f"--model_dir={model}",
           "--prompt_ids=" + ",".join(map(str, ids)), f"--max_new_tokens={new}", f"--out={out}", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(p.stderr)
    return Run(json.loads(p.stdout.strip().splitlines()[-1]), stfile.read(out)[0])


def hf_attention(model_dir, seq):
    import torch
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").cuda()
    with torch.no_grad():
        out = m(torch.tensor([seq]).cuda(), output_attentions=True)
    return [a[0].double().cpu().numpy() for a in out.attentions]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build-gpu")
    ap.add_argument("--out", default="/tmp")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script without a GPU")
    a = ap.parse_args()
    rows = []
    for variant in sorted(checkpoint.VARIANTS):
        model = checkpoint.make(variant, f"/tmp/fid-models/{variant}")
        H = checkpoint.VARIANTS[variant]["num_attention_heads"]
        L = checkpoint.VARIANTS[variant]["num_hidden_layers"]
        row = {"variant": variant}
        try:
            gpu = run(a.build, model, PROMPT, 6, f"--device={a.device}", "--dtype=float32")
            seq = PROMPT + gpu.tokens[:-1]
            cpu = run(a.build, model, seq, 1, "--device=cpu", "--phases=prefill")
            bf16 = run(a.build, model, seq, 1, f"--device={a.device}", "--dtype=bfloat16", "--phases=prefill")
            _, ref = reference.forward(model, seq)
            g = [gpu.full_attention(l, H) for l in range(L)]
            c = [cpu.full_attention(l, H) for l in range(L)]
            b = [bf16.full_attention(l, H) for l in range(L)]
            row["gpu_vs_cpu"] = max(float(np.abs(x - y).max()) for x, y in zip(g, c))
            row["gpu_vs_numpy"] = max(float(np.abs(x - y).max()) for x, y in zip(g, ref))
            row["bf16_vs_numpy"] = max(float(np.abs(x - y).max()) for x, y in zip(b, ref))
            # Row entropy on the device (its tensor-op path, not the CPU loop) against -Σ p log p of
            # the float64 reference.
            ent = run(a.build, model, seq, 1, f"--device={a.device}", "--dtype=float32",
                      "--phases=prefill", "--form=none", "--stats=row_entropy")
            worst = 0.0
            for layer in range(L):
                blocks = sorted(ent.blocks("row_entropy", "prefill", layer).items())
                got = np.concatenate([v for _, v in blocks], axis=1)
                p = ref[layer]
                want = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(-1)
                worst = max(worst, float(np.abs(got - want).max()))
            row["entropy_gpu_vs_numpy"] = worst
            try:
                hf = hf_attention(model, seq)
                row["gpu_vs_transformers"] = max(float(np.abs(x - y).max()) for x, y in zip(g, hf))
                row["numpy_vs_transformers"] = max(float(np.abs(x - y).max()) for x, y in zip(ref, hf))
            except Exception as e:  # noqa: BLE001 - report, go on
                row["transformers_error"] = str(e)[:300]
        except Exception as e:  # noqa: BLE001
            row["error"] = str(e)[:500]
        print(json.dumps(row), flush=True)
        rows.append(row)
    with open(os.path.join(a.out, "fidelity.json"), "w") as f:
        json.dump(rows, f, indent=1)
    cols = ["gpu_vs_cpu", "gpu_vs_numpy", "gpu_vs_transformers", "numpy_vs_transformers", "bf16_vs_numpy",
            "entropy_gpu_vs_numpy"]
    lines = ["| checkpoint | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(f"{r[c]:.1e}" if c in r else "-" for c in cols) + " |")
    with open(os.path.join(a.out, "fidelity.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
