"""Head to head on the GPU: attnscope against transformers eager with output_attentions=True, on a
random-weight model with Llama 3.1 8B proportions (fewer layers), the same checkpoint for both.
    python3 bench/gpu/headtohead.py --build build-gpu --out OUT [--layers 4]
Wall time to stored results, peak GPU memory (nvidia-smi, whole process), tokens/s. Stops
starting new workloads when $DEADLINE (epoch seconds) is near; writes what it has.
"""
import argparse
import json
import os
import pickle
import subprocess
import sys
import threading
import time

import numpy as np

NEW = 32
DECODE_PROMPT, DECODE_NEW = 512, 65  # the capture-off decode rows (bench/cpu_peers.sh's shape)


class ProcessGpuMemory:
    """Peak GPU memory while active (MiB): of one process (nvidia-smi's per-process used_memory) and of
    the whole GPU (memory.used)."""

    def __init__(self, pid):
        self.pid, self.peak, self.gpu_peak, self._stop = str(pid), 0, 0, False
        self._t = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop:
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout
            for line in out.splitlines():
                pid, _, used = line.partition(",")
                if pid.strip() == self.pid:
                    self.peak = max(self.peak, int(used))
            total = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                   capture_output=True, text=True).stdout.split()
            if total:
                self.gpu_peak = max(self.gpu_peak, int(total[0]))
            time.sleep(0.05)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()


class AttnscopeServer:
    """The product path: a resident attnscope-server on the GPU, attnscope-capture storing each sample."""

    def __init__(self, build, model, port=50551):
        self.build, self.target = build, f"127.0.0.1:{port}"
        self.proc = subprocess.Popen([os.path.join(build, "server", "attnscope-server"), f"--model_dir={model}",
                                      f"--listen={self.target}", "--device=" + os.environ.get("H2H_DEVICE", "cuda"),
                                      "--max_capture_bytes=0", "--query_block=1024", "--block_elements=268435456"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(600):
            if subprocess.run([self.capture_bin(), f"--server={self.target}", "--health"],
                              capture_output=True).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("attnscope-server did not start")

    def capture_bin(self):
        return os.path.join(self.build, "client", "cpp", "attnscope-capture")

    def run(self, n, mode, out_dir):
        ids = os.path.join(out_dir, f"ids_{n}.txt")
        with open(ids, "w") as f:
            f.write(",".join(map(str, prompt_ids(n))))
        data = os.path.join(out_dir, f"attnscope_{mode}_{n}")
        args = [self.capture_bin(), f"--server={self.target}", f"--prompt_ids=@{ids}", f"--max_new_tokens={NEW}",
                f"--output_dir={data}", "--overwrite", "--save_attention"]
        args += (["--form=dense", "--element_type=float16"] if mode == "dense"
                 else ["--form=none", "--stats=row_entropy,key_score:64,sink_mass:4,local_mass:64"])
        t0 = time.time()
        with ProcessGpuMemory(self.proc.pid) as mem:
            p = subprocess.run(args, capture_output=True, text=True)
        wall = time.time() - t0
        path = os.path.join(data, "attention_sample_0.safetensors")
        if p.returncode != 0 or not os.path.exists(path):
            return {"status": "OOM" if "memory" in p.stderr else "error", "detail": p.stderr[-300:], "peak_mib": mem.peak}
        with open(path, "rb") as f:
            import struct
            (hn,) = struct.unpack("<Q", f.read(8))
            meta = json.loads(json.loads(f.read(hn))["__metadata__"]["attnscope"])
        size = os.path.getsize(path)
        subprocess.run(["rm", "-rf", data])
        t = meta["timings"]
        return {"status": "ok", "wall_s": wall, "peak_mib": mem.peak, "gpu_peak_mib": mem.gpu_peak, "bytes": size,
                "prefill_tok_s": n / (t["prefill_ms"] / 1e3),
                "decode_tok_s": (NEW - 1) / (t["decode_ms"] / 1e3) if t["decode_ms"] else 0}

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def make_model(path, layers):
    import torch
    from safetensors.torch import save_file
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    os.makedirs(path, exist_ok=True)
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336,
               num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072, bos_token_id=128000,
               eos_token_id=[128001, 128009], tie_word_embeddings=False, torch_dtype="bfloat16",
               rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192))
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device="cuda") * std).to(torch.bfloat16).cpu()

    w = {"model.embed_tokens.weight": rnd(128256, 4096, std=1.0), "model.norm.weight": torch.ones(4096, dtype=torch.bfloat16),
         "lm_head.weight": rnd(128256, 4096)}
    for l in range(layers):
        p = f"model.layers.{l}."
        w[p + "input_layernorm.weight"] = torch.ones(4096, dtype=torch.bfloat16)
        w[p + "post_attention_layernorm.weight"] = torch.ones(4096, dtype=torch.bfloat16)
        w[p + "self_attn.q_proj.weight"] = rnd(4096, 4096, std=0.05)
        w[p + "self_attn.k_proj.weight"] = rnd(1024, 4096, std=0.05)
        w[p + "self_attn.v_proj.weight"] = rnd(1024, 4096)
        w[p + "self_attn.o_proj.weight"] = rnd(4096, 4096)
        w[p + "mlp.gate_proj.weight"] = rnd(14336, 4096)
        w[p + "mlp.up_proj.weight"] = rnd(14336, 4096)
        w[p + "mlp.down_proj.weight"] = rnd(4096, 14336)
    save_file(w, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


def prompt_ids(n):
    rng = np.random.default_rng(n)
    return [128000] + rng.integers(1000, 120000, n - 1).tolist()


def attnscope(build, model, n, mode, out_dir):
    out = os.path.join(out_dir, f"attnscope_{mode}_{n}.safetensors")
    args = [os.path.join(build, "tools", "attnscope-run"), f"--model_dir={model}", "--device=cuda",
            "--dtype=bfloat16", f"--random_prompt={n}", f"--max_new_tokens={NEW}",
            "--query_block=1024", "--block_elements=268435456"]
    if mode == "dense":
        args += ["--form=dense", "--element_type=float16", f"--out={out}"]
    else:
        args += ["--form=none", "--stats=row_entropy,key_score:64,sink_mass:4,local_mass:64", f"--out={out}"]
    t0 = time.time()
    with ProcessGpuMemory(os.getpid()) as mem:  # the whole-GPU figure is the one that counts here
        p = subprocess.run(args, capture_output=True, text=True)
    wall = time.time() - t0
    if os.path.exists(out):
        os.remove(out)
    if p.returncode != 0:
        return {"status": "OOM" if "memory" in p.stderr else "error", "detail": p.stderr[-300:],
                "peak_mib": mem.gpu_peak}
    s = json.loads(p.stdout.strip().splitlines()[-1])
    return {"status": "ok", "wall_s": wall - s["load_ms"] / 1e3, "peak_mib": mem.gpu_peak,
            "prefill_tok_s": s["prefill_tok_s"], "decode_tok_s": s["decode_tok_s"], "bytes": s["capture_bytes"]}


DECODE_STATS = "row_entropy,sink_mass:4,local_mass:64"  # the statistics of a decode row


def attnscope_decode(build, model, device, lookahead, runs=2, queued="auto", stats=""):
    """Decode after DECODE_PROMPT tokens, the engine direct, with --decode_lookahead and
    --queued_copies set as given, capturing `stats` (none: capture off): the best tokens/s of
    `runs`."""
    args = [os.path.join(build, "tools", "attnscope-run"), f"--model_dir={model}", f"--device={device}",
            f"--random_prompt={DECODE_PROMPT}", f"--max_new_tokens={DECODE_NEW}", "--form=none",
            f"--decode_lookahead={lookahead}", f"--queued_copies={queued}"] + (
                ["--dtype=bfloat16"] if device != "cpu" else []) + ([f"--stats={stats}"] if stats else [])
    best = 0.0
    for _ in range(runs):
        p = subprocess.run(args, capture_output=True, text=True)
        if p.returncode != 0:
            return {"status": "error", "detail": p.stderr[-300:]}
        best = max(best, json.loads(p.stdout.strip().splitlines()[-1])["decode_tok_s"])
    return {"status": "ok", "decode_tok_s": best}


def hf_decode(model, device, runs=2):
    """transformers' sdpa generate on the same checkpoint and prompt ids: DECODE_NEW - 1 decode steps
    after the first token, tokens/s (generate of DECODE_NEW tokens minus generate of 1, best of
    `runs` each), as bench/peers.py measures it on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from peers import random_prompt  # attnscope-run --random_prompt's ids
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    try:  # transformers 5 names it dtype; 4.x, torch_dtype
        m = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation="sdpa")
    except TypeError:
        m = AutoModelForCausalLM.from_pretrained(model, torch_dtype=dtype, attn_implementation="sdpa")
    m = m.to(device).eval()
    ids = random_prompt(DECODE_PROMPT, m.config.vocab_size).to(device)

    def gen(n):
        best = float("inf")
        for _ in range(runs):
            t0 = time.perf_counter()
            with torch.no_grad():
                m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            if device != "cpu":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best
    gen(2)  # warm-up
    one, full = gen(1), gen(DECODE_NEW)
    del m
    if device != "cpu":
        torch.cuda.empty_cache()
    return {"status": "ok", "decode_tok_s": (DECODE_NEW - 1) / (full - one)}


def decode_table(build, model, device, record):
    """Decode: capture off with the lookahead off and on, transformers' sdpa generate; then every
    layer's decode-row statistics with the queued copies off (each block read back at once, no
    lookahead) and on (with the lookahead)."""
    rows = {}
    for lookahead in ("off", "on"):
        rows[lookahead] = attnscope_decode(build, model, device, lookahead)
        record(f"attnscope lookahead={lookahead}", DECODE_PROMPT, "decode", dict(rows[lookahead]))
    rows["tf"] = hf_decode(model, device)
    record("transformers sdpa", DECODE_PROMPT, "decode", dict(rows["tf"]))
    for queued, lookahead in (("off", "off"), ("on", "on")):
        key = f"stats_{queued}"
        rows[key] = attnscope_decode(build, model, device, lookahead, queued=queued, stats=DECODE_STATS)
        record(f"attnscope statistics queued_copies={queued}", DECODE_PROMPT, "decode", dict(rows[key]))

    def rate(r):
        return f"{r['decode_tok_s']:.1f}" if r["status"] == "ok" else r["status"]

    def ratio(a, b):
        ok = rows[a]["status"] == "ok" and rows[b]["status"] == "ok"
        return f"{rows[a]['decode_tok_s'] / rows[b]['decode_tok_s']:.2f}" if ok else "-"
    return ["| decode after 512 | attnscope tok/s, capture off, lookahead off | capture off, lookahead on | "
            "transformers sdpa generate tok/s | capture off (on) / transformers | statistics, queued copies off | "
            "statistics, queued copies and lookahead on | statistics (on) / capture off (on) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {DECODE_NEW - 1} steps, {device} | {rate(rows['off'])} | {rate(rows['on'])} | {rate(rows['tf'])} | "
            f"{ratio('on', 'tf')} | {rate(rows['stats_off'])} | {rate(rows['stats_on'])} | "
            f"{ratio('stats_on', 'on')} |"]


class HF:
    def __init__(self, model):
        import torch
        from transformers import AutoModelForCausalLM
        self.torch = torch
        self.m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16, attn_implementation="eager").cuda()

    def run(self, n, mode, out_dir):
        torch = self.torch
        ids = torch.tensor([prompt_ids(n)], device="cuda")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        try:
            with ProcessGpuMemory(os.getpid()) as mem, torch.no_grad():
                r = self.m.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_attentions=True,
                                    return_dict_in_generate=True)
                torch.cuda.synchronize()
                t_gen = time.time() - t0
                layers = len(r.attentions[0])
                T = n + NEW - 1
                if mode == "dense":  # the prototype: full [1, H, T, T] float32 per layer, pickled
                    data = {}
                    for l in range(layers):
                        full = np.zeros((1, 32, T, T), np.float32)
                        full[:, :, :n, :n] = r.attentions[0][l].float().cpu().numpy()
                        for t, step in enumerate(r.attentions[1:], start=1):
                            row = step[l][:, :, -1, :].float().cpu().numpy()
                            full[:, :, n + t - 1, :row.shape[-1]] = row
                        data[l] = {"shape": list(full.shape), "tensor": full}
                    path = os.path.join(out_dir, f"hf_{n}.pkl")
                    with open(path, "wb") as f:
                        pickle.dump(data, f, protocol=4)
                    os.remove(path)
                else:  # statistics from the returned matrices: row entropy per layer and head
                    stats = []
                    for l in range(layers):
                        a = r.attentions[0][l].float()
                        stats.append((-(a * torch.log(a.clamp_min(1e-30))).sum(-1)).cpu())
                wall = time.time() - t0
        except torch.cuda.OutOfMemoryError:
            return {"status": "OOM", "peak_mib": torch.cuda.max_memory_allocated() / 2**20}
        finally:
            r = None
            torch.cuda.empty_cache()
        return {"status": "ok", "wall_s": wall, "generate_s": t_gen, "peak_mib": mem.peak, "gpu_peak_mib": mem.gpu_peak,
                "allocated_peak_mib": torch.cuda.max_memory_allocated() / 2**20,
                "tokens_s": (n + NEW) / t_gen}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build-gpu")
    ap.add_argument("--out", default="/tmp")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--long_only", action="store_true", help="only the statistics runs from 32k up, attnscope only")
    ap.add_argument("--via", choices=["run", "server"], default="run",
                    help="attnscope through attnscope-run (engine direct) or server + capture client")
    ap.add_argument("--decode_only", action="store_true", help="only the capture-off decode rows")
    ap.add_argument("--model", default="", help="an existing checkpoint folder instead of the 8B-shaped one")
    ap.add_argument("--device", default="cuda", help="the decode rows' device (cpu to try this script there)")
    a = ap.parse_args()
    if a.via == "server" and not os.path.exists(os.path.join(a.build, "server", "attnscope-server")):
        print("attnscope-server was not built: measuring the engine directly (attnscope-run)")
        a.via = "run"
    deadline = float(os.environ.get("DEADLINE", time.time() + 400))
    work = "/tmp/h2h"
    os.makedirs(work, exist_ok=True)
    model = a.model or make_model(os.path.join(work, "model"), a.layers)
    results = []

    def record(who, n, mode, r):
        r.update(system=who, prompt=n, mode=mode)
        results.append(r)
        print(json.dumps(r), flush=True)
        with open(os.path.join(a.out, "headtohead.json"), "w") as f:
            json.dump(results, f, indent=1)

    decode_lines = [] if a.long_only else decode_table(a.build, model, a.device, record)
    if a.decode_only:
        print("\n".join(decode_lines))
        with open(os.path.join(a.out, "headtohead.md"), "w") as f:
            f.write("\n".join(decode_lines) + "\n")
        return
    hf = None
    plan = [("dense", 1024), ("dense", 4096), ("stats", 1024), ("stats", 4096), ("stats", 16384),
            ("stats", 32768), ("stats", 65536), ("stats", 131072)]
    hf_oom = False
    if a.long_only:
        plan, hf_oom = [p for p in plan if p[0] == "stats" and p[1] >= 32768], True
    for mode, n in plan:
        if time.time() > deadline - 45:
            print(f"deadline: skipping {mode} {n} and later")
            break
        if a.via == "server":
            # A fresh server per workload: the caching allocator keeps what a larger one reserved.
            server = AttnscopeServer(a.build, model)
            record("attnscope", n, mode, server.run(n, mode, work))
            server.stop()
        else:
            record("attnscope", n, mode, attnscope(a.build, model, n, mode, work))
        if not hf_oom and time.time() < deadline - 45:
            if hf is None:
                hf = HF(model)
            r = hf.run(n, mode, work)
            hf_oom = r["status"] == "OOM"
            record("transformers", n, mode, r)
    lines = ["| mode | prompt | attnscope wall s | transformers wall s | ratio (tf / as) | attnscope peak GPU MiB | "
             "transformers peak GPU MiB | attnscope prefill tok/s | attnscope decode tok/s | transformers tok/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    by = {(r["system"], r["mode"], r["prompt"]): r for r in results}
    for mode, n in plan:
        at, tf = by.get(("attnscope", mode, n)), by.get(("transformers", mode, n))
        if at is None:
            continue

        def wall(r):
            return f"{r['wall_s']:.2f}" if r and r["status"] == "ok" else (r["status"] if r else "not run")
        ratio = f"{tf['wall_s'] / at['wall_s']:.2f}" if at["status"] == "ok" and tf and tf["status"] == "ok" else "-"
        lines.append(f"| {mode} | {n} | {wall(at)} | {wall(tf)} | {ratio} | {at.get('peak_mib', 0):.0f} | "
                     f"{(tf or {}).get('peak_mib', 0):.0f} | {at.get('prefill_tok_s', 0):.0f} | "
                     f"{at.get('decode_tok_s', 0):.0f} | {(tf or {}).get('tokens_s', 0):.0f} |")
    lines += [""] + decode_lines
    with open(os.path.join(a.out, "headtohead.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
