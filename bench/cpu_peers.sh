#!/usr/bin/env bash
# attnscope against transformers on the CPU, in one run on one machine, same checkpoints, same
# prompt ids (issue 23's CPU targets). attnscope: build-torch2 (the engine on the torch wheel's
# libtorch, fused attention; deploy/test.sh builds it); the peer: transformers on the same torch,
# from the project venv (deploy/python-env.sh). Best of RUNS per cell, each side alone on the machine.
#   bench/cpu_peers.sh [--write]   print the table; --write also replaces it in BENCHMARKS.md
# Environment: RUNS (default 3), BUILD (default build-torch2), LONG (default 16384: the long prompt).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-3}"
BUILD="${BUILD:-build-torch2}"
LONG="${LONG:-16384}"
bash deploy/python-env.sh
PY="$PWD/.venv/bin/python"
RUN="$BUILD/tools/attnscope-run"
[ -x "$RUN" ] || { echo "cpu_peers: $RUN not built (deploy/test.sh builds $BUILD)" >&2; exit 1; }
M_LONG=/tmp/attnscope-bench-long
M_PROTO=/tmp/attnscope-bench-prototype
[ -f "$M_LONG/config.json" ] || /usr/bin/python3 tests/tools/checkpoint.py bench_long "$M_LONG" >/dev/null
[ -f "$M_PROTO/config.json" ] || /usr/bin/python3 tests/tools/checkpoint.py bench_prototype "$M_PROTO" >/dev/null
STATS="--stats=row_entropy,key_score:64,sink_mass:4,local_mass:64"

# attnscope-run's prefill seconds (or decode tokens/s), best of RUNS.
ours() {  # field model prompt new args...
  local field=$1 model=$2 prompt=$3 new=$4; shift 4
  local best=""
  for _ in $(seq "$RUNS"); do
    v=$("$RUN" --model_dir="$model" --random_prompt="$prompt" --max_new_tokens="$new" "$@" |
        "$PY" -c "import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); print(d['$field'])")
    if [ "$field" = prefill_ms ]; then v=$(echo "$v / 1000" | bc -l); fi
    if [ -z "$best" ]; then best=$v
    elif [ "$field" = prefill_ms ]; then best=$(echo "if ($v < $best) $v else $best" | bc -l)
    else best=$(echo "if ($v > $best) $v else $best" | bc -l); fi
  done
  echo "$best"
}
theirs() {  # model job args... -> the JSON's seconds or decode_tok_s
  "$PY" bench/peers.py "$@" | "$PY" -c "import json,sys; d=json.loads(sys.stdin.read()); print(d.get('seconds', d.get('decode_tok_s')))"
}
ratio() { echo "$1 / $2" | bc -l; }

TORCH=$("$PY" -c 'import torch; print(torch.__version__)')
TF=$("$PY" -c 'import transformers; print(transformers.__version__)')
OFF4=$(ours prefill_ms "$M_LONG" 4096 1 --form=none)
ST4=$(ours prefill_ms "$M_LONG" 4096 1 --form=none "$STATS")
EAGER4=$(theirs "$M_LONG" stats 4096 "$RUNS")
SDPA4=$(theirs "$M_LONG" prefill 4096 "$RUNS")
OFF16=$(ours prefill_ms "$M_LONG" "$LONG" 1 --form=none)
ST16=$(ours prefill_ms "$M_LONG" "$LONG" 1 --form=none "$STATS")
SDPA16=$(theirs "$M_LONG" prefill "$LONG" 1)
DEC=$(ours decode_tok_s "$M_PROTO" 512 65 --form=none)
DEC_TF=$(theirs "$M_PROTO" decode 512 65 "$RUNS")
JOB=$(BUILD="$BUILD" PEER_PYTHON="$PY" bash bench/prototype_job.sh "$RUNS")
JOB_OURS=$(echo "$JOB" | awk -F'|' '/--format pickle/ {gsub(/ /,"",$3); print $3}')
JOB_TF=$(echo "$JOB" | awk -F'|' '/eager transformers/ {gsub(/ /,"",$3); print $3}')

TABLE=$(cat <<MD
\`bench/cpu_peers.sh\` ($(date -u +%Y-%m-%d), $(nproc) cores; attnscope on libtorch $TORCH with the fused path, the
peer transformers $TF on the same torch, best of $RUNS; models bench_long (4 layers, hidden 256, 8/2
heads) and bench_prototype (4 layers, hidden 256, 8/4 heads); statistics = row entropy, key score over
64 rows, sink mass 4, local mass 64 for every layer)

| measurement | attnscope | transformers | attnscope / transformers | target |
| --- | ---: | ---: | ---: | --- |
| the prototype's job (512 + 32 tokens, every layer dense, pickled), s | $(printf %.3f "$JOB_OURS") | $(printf %.3f "$JOB_TF") (eager) | $(printf %.2f "$(ratio "$JOB_OURS" "$JOB_TF")") | ≤ 0.33 |
| statistics at 4k, prefill s | $(printf %.2f "$ST4") | $(printf %.2f "$EAGER4") (eager + output_attentions) | $(printf %.2f "$(ratio "$ST4" "$EAGER4")") | ≤ 0.15 |
| capture off at 4k, prefill s | $(printf %.2f "$OFF4") | $(printf %.2f "$SDPA4") (sdpa forward) | $(printf %.2f "$(ratio "$OFF4" "$SDPA4")") | ≤ 1.10 |
| statistics / capture off at 4k | $(printf %.2f "$(ratio "$ST4" "$OFF4")") | | | ≤ 1.15 |
| capture off at $((LONG / 1024))k, prefill s | $(printf %.2f "$OFF16") | $(printf %.2f "$SDPA16") (sdpa forward, 1 run) | $(printf %.2f "$(ratio "$OFF16" "$SDPA16")") | ≤ 1.10 |
| statistics / capture off at $((LONG / 1024))k | $(printf %.2f "$(ratio "$ST16" "$OFF16")") ($(printf %.2f "$ST16") s) | (eager: $((4 * 8 * LONG * LONG * 4 / 1073741824)) GiB of attentions) | | ≤ 1.15 |
| decode after 512, capture off, tokens/s | $(printf %.1f "$DEC") | $(printf %.1f "$DEC_TF") (sdpa generate) | $(printf %.2f "$(ratio "$DEC" "$DEC_TF")") | ≥ 1.00 |
MD
)
echo "$TABLE"
if [ "${1:-}" = "--write" ]; then
  "$PY" - "$TABLE" <<'PY'
import re, sys
path, table = "BENCHMARKS.md", sys.argv[1]
text = open(path).read()
begin, end = "<!-- cpu_peers: begin -->", "<!-- cpu_peers: end -->"
block = f"{begin}\n{table}\n{end}"
text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S) if begin in text else text + "\n" + block + "\n"
open(path, "w").write(text)
PY
fi
