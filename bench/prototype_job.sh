#!/usr/bin/env bash
# The prototype's own job, end to end: generate 32 tokens after a 512-token prompt, capture every
# layer's dense attention, write the prototype's pickle ({layer: {'shape', 'tensor'}}), on the
# bench_prototype model (4 layers, hidden 256, 8/4 heads). attnscope: a warm server and
# attnscope-capture (--format pickle, and safetensors for comparison), best of N runs each; eager
# transformers' generate + assemble + pickle.dump (model already loaded, best of N) where torch and
# transformers are importable by PEER_PYTHON (default /usr/bin/python3, which has neither: then that
# row says so; the project venv has both: deploy/python-env.sh).
# Usage: [BUILD=build-torch2] [PEER_PYTHON=.venv/bin/python] bench/prototype_job.sh [RUNS]   (default 3)
#   CAPTURE_ARGS="--shared_memory_bytes=0" bench/prototype_job.sh   the wire instead of same-host
#   shared memory (attnscope-capture's default)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-3}"
BUILD="${BUILD:-build}"  # the build whose server and client run
MODEL=${MODEL:-/tmp/attnscope-bench-prototype}
[ -f "$MODEL/config.json" ] || /usr/bin/python3 tests/tools/checkpoint.py bench_prototype "$MODEL" >/dev/null
WORK=$(mktemp -d)
trap 'kill $SERVER 2>/dev/null || true; rm -rf "$WORK"' EXIT
PORT=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BUILD"/server/attnscope-server --model_dir="$MODEL" --listen="127.0.0.1:$PORT" --max_capture_bytes=0 \
  >"$WORK/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 100); do grep -q "listening on" "$WORK/server.log" && break; sleep 0.1; done
/usr/bin/python3 -c "
import random; random.seed(0)
print(','.join(str(random.randrange(3, 32000)) for _ in range(512)))" > "$WORK/ids"
capture() {  # format -> seconds
  local start end
  start=$(date +%s.%N)
  "$BUILD"/client/cpp/attnscope-capture --server="127.0.0.1:$PORT" --prompt_ids="@$WORK/ids" --max_new_tokens=32 \
    --form=dense --format="$1" --output_dir="$WORK/out" --overwrite --save_attention ${CAPTURE_ARGS:-} >/dev/null 2>"$WORK/capture.err" \
    || { cat "$WORK/capture.err" >&2; exit 1; }
  end=$(date +%s.%N)
  echo "$end - $start" | bc -l
}
capture pickle >/dev/null  # warm-up
best() { local b=999; for _ in $(seq "$RUNS"); do t=$(capture "$1"); b=$(echo "if ($t < $b) $t else $b" | bc -l); done; echo "$b"; }
PKL=$(best pickle)
ST=$(best safetensors)
SIZE=$(stat -c %s "$WORK/out/attention_sample_0.pkl")
TF=$("${PEER_PYTHON:-/usr/bin/python3}" - "$MODEL" "$WORK/ids" "$RUNS" <<'PY' 2>/dev/null || echo "n/a"
import pickle, sys, time
try:
    import torch
    from transformers import AutoModelForCausalLM
except ImportError:
    print("n/a"); sys.exit(0)
model_dir, ids_file, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
ids = torch.tensor([[int(x) for x in open(ids_file).read().split(",")]])
m = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", torch_dtype=torch.float32)
best = 1e9
for _ in range(runs):
    t0 = time.time()
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, output_attentions=True,
                         return_dict_in_generate=True)
    T = ids.shape[1] + 31
    data = {}
    for layer in range(m.config.num_hidden_layers):
        full = torch.zeros(1, m.config.num_attention_heads, T, T)
        P = ids.shape[1]
        full[:, :, :P, :P] = out.attentions[0][layer]
        for t in range(1, 32):
            full[:, :, P + t - 1, :P + t] = out.attentions[t][layer][:, :, 0]
        data[layer] = {"shape": list(full.shape), "tensor": full.numpy()}
    with open("/tmp/attnscope-prototype-job.pkl", "wb") as f:
        pickle.dump(data, f)
    best = min(best, time.time() - t0)
print(f"{best:.3f}")
PY
)
echo "| job (512-token prompt, 32 new tokens, 4 layers dense, $((SIZE / 1000000)) MB pickle) | seconds (best of $RUNS) |"
echo "| --- | ---: |"
printf "| attnscope: warm server + attnscope-capture --format pickle | %.3f |\n" "$PKL"
printf "| attnscope: warm server + attnscope-capture --format safetensors | %.3f |\n" "$ST"
if [ "$TF" = "n/a" ]; then echo "| eager transformers generate + assemble + pickle | not installed here |"
else printf "| eager transformers generate + assemble + pickle | %.3f |\n" "$TF"; fi
printf "| pickle / safetensors | %.2f |\n" "$(echo "$PKL / $ST" | bc -l)"
