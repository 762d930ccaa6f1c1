#!/usr/bin/env bash
# Rendering time of the real chat templates of the four families (and the slowest template in the
# fixture) for a typical conversation (system + 3 turns), attnscope's renderer vs Python jinja2
# (already compiled, as transformers caches it). Usage: bench/chat_template_bench.sh
# (needs ../shared/fixtures/chat_templates and python3-jinja2).
set -euo pipefail
cd "$(dirname "$0")/.."
/usr/bin/python3 - <<'PY'
import json, subprocess, sys, time
sys.path.insert(0, "tests/tools")
import chat_reference as ref
models = json.load(open("../shared/fixtures/chat_templates/templates.json"))
conv = [{"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is attention in a transformer?"},
        {"role": "assistant", "content": "A weighted average of value vectors, weights from query-key scores."},
        {"role": "user", "content": "And why does it scale quadratically?"}]
env = ref.environment()
rows = []
for name, model in [("Llama 2 chat", "meta-llama/Llama-2-7b-chat-hf"), ("Llama 3.1 Instruct", "meta-llama/Llama-3.1-8B-Instruct"),
                    ("Mistral 7B Instruct v0.3", "mistralai/Mistral-7B-Instruct-v0.3"), ("Qwen2.5 Instruct", "Qwen/Qwen2.5-3B-Instruct"),
                    ("Qwen2.5 Instruct + tools", "Qwen/Qwen2.5-3B-Instruct"), ("MiniCPM3 + tools (macros, call blocks)", "openbmb/MiniCPM3-4B")]:
    entry = models[model]
    t = entry["chat_template"]
    named = dict((x["name"], x["template"]) for x in t) if isinstance(t, list) else t if isinstance(t, dict) else None
    tmpl = named.get("tool_use", named.get("default")) if named else t
    v = ref.variables(entry, conv, {"tools": ref.TOOLS} if "tools" in name else {})
    case = json.dumps({"template": tmpl, "variables": v}) + "\n"
    out = json.loads(subprocess.run(["build/tools/attnscope-chat-template", "--repeat=2000"], input=case,
                                    capture_output=True, text=True, check=True).stdout)
    compiled = env.from_string(tmpl)
    n = 500
    start = time.perf_counter()
    for _ in range(n):
        try:
            compiled.render(**v)
        except Exception:
            pass
    py_us = (time.perf_counter() - start) / n * 1e6
    rows.append((name, len(tmpl), out.get("us", float("nan")), py_us, "error" in out))
print("| template | bytes | attnscope render µs | jinja2 render µs (compiled) | ratio |")
print("| --- | ---: | ---: | ---: | ---: |")
for name, size, us, py, err in rows:
    print(f"| {name}{' (raises)' if err else ''} | {size} | {us:.1f} | {py:.1f} | {py / us:.1f}x |")
PY
