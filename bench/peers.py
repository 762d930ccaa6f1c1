"""The peer side of bench/cpu_peers.sh: transformers (PyPI torch, on the CPU) on the same checkpoint
and the same prompt ids as attnscope-run --random_prompt. Run by the project venv's Python
(deploy/python-env.sh). Prints one JSON object per job.

  peers.py MODEL_DIR prefill P RUNS        sdpa forward over P ids (the cache built): best seconds
  peers.py MODEL_DIR stats P RUNS          eager forward with output_attentions, then the statistics
                                           attnscope computes (row entropy, key score over the last
                                           64 rows, sink mass 4, local mass 64) for every layer
  peers.py MODEL_DIR decode P NEW RUNS     sdpa generate: NEW - 1 decode steps after the first token,
                                           tokens/s (generate of NEW tokens minus generate of 1)
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def random_prompt(n, vocab):
    """attnscope-run --random_prompt's ids (xorshift64 from the same seed)."""
    x, mask, ids = 88172645463325252, (1 << 64) - 1, []
    for _ in range(n):
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
        ids.append(x % vocab)
    return torch.tensor([ids])


def load(model_dir, attn):
    m = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, torch_dtype=torch.float32)
    return m.eval()


def best_of(runs, fn):
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def statistics(attentions, prompt, key_rows=64, sink=4, local=64):
    """What a prototype user computes from output_attentions, per layer: [heads, ...] arrays."""
    out = []
    for a in attentions:
        a = a[0]  # [heads, P, P]
        entropy = torch.special.entr(a).sum(-1)
        key_score = a[:, prompt - key_rows:, :].sum(1)
        sink_mass = a[..., :sink].sum(-1)
        c = torch.nn.functional.pad(a.cumsum(-1), (1, 0))  # c[..., j] = sum of keys < j
        rows = torch.arange(prompt)
        local_mass = c[:, rows, rows + 1] - c[:, rows, (rows + 1 - local).clamp_min(0)]
        out.append((entropy, key_score, sink_mass, local_mass))
    return out


def main():
    model_dir, job = sys.argv[1], sys.argv[2]
    args = [int(a) for a in sys.argv[3:]]
    torch.manual_seed(0)
    with torch.no_grad():
        if job == "prefill":
            p, runs = args
            m = load(model_dir, "sdpa")
            ids = random_prompt(p, m.config.vocab_size)
            m(ids[:, :16], use_cache=True)  # warm-up
            s = best_of(runs, lambda: m(ids, use_cache=True))
            print(json.dumps({"job": job, "prompt": p, "seconds": s}))
        elif job == "stats":
            p, runs = args
            m = load(model_dir, "eager")
            ids = random_prompt(p, m.config.vocab_size)
            m(ids[:, :16], use_cache=False)
            s = best_of(runs, lambda: statistics(m(ids, output_attentions=True, use_cache=False).attentions, p))
            print(json.dumps({"job": job, "prompt": p, "seconds": s}))
        elif job == "decode":
            p, new, runs = args
            m = load(model_dir, "sdpa")
            ids = random_prompt(p, m.config.vocab_size)

            def gen(n):
                m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            gen(2)
            one = best_of(runs, lambda: gen(1))
            full = best_of(runs, lambda: gen(new))
            print(json.dumps({"job": job, "prompt": p, "new": new, "decode_tok_s": (new - 1) / (full - one)}))
        else:
            raise SystemExit(f"unknown job {job}")


if __name__ == "__main__":
    main()
