#!/usr/bin/env bash
# Long-context capture: wall time and peak resident memory per prompt length and capture form.
# Usage: bench/flat_memory.sh [LENGTHS...]   (default: 1024 4096 16384 32768)
# Prints a Markdown table. Each cell is its own process, so peak RSS is that run's alone.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=build/tools/attnscope-run
MODEL=${MODEL:-/tmp/attnscope-bench-long}
LENGTHS=("$@")
[ ${#LENGTHS[@]} -gt 0 ] || LENGTHS=(1024 4096 16384 32768)
[ -f "$MODEL/config.json" ] || /usr/bin/python3 tests/tools/checkpoint.py bench_long "$MODEL"

declare -A CAPTURE=(
  [off]="--form=none"
  [stats]="--form=none --stats=row_entropy,key_score:64,sink_mass:4,local_mass:64,key_score_variance"
  [pooled64]="--form=pooled:64"
  [dense_last64]="--form=dense --rows=last:64"
)
ORDER=(off stats pooled64 dense_last64)

echo "| prompt | capture | prefill s | decode tok/s | peak RSS MiB | RSS - off MiB | bytes captured |"
echo "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"
for n in "${LENGTHS[@]}"; do
  base=""
  for c in "${ORDER[@]}"; do
    # shellcheck disable=SC2086
    out=$($RUN --model_dir="$MODEL" --random_prompt="$n" --max_new_tokens=4 ${CAPTURE[$c]})
    row=$(echo "$out" | /usr/bin/python3 -c '
import json, sys
s = json.loads(sys.stdin.read().strip().splitlines()[-1])
print(s["prefill_ms"] / 1000, s["decode_tok_s"], s["peak_rss_mib"], s["capture_bytes"])')
    read -r prefill decode rss bytes <<<"$row"
    [ -n "$base" ] || base=$rss
    printf "| %s | %s | %.2f | %.1f | %.0f | %+.0f | %s |\n" "$n" "$c" "$prefill" "$decode" "$rss" \
      "$(echo "$rss - $base" | bc -l)" "$bytes"
  done
done
