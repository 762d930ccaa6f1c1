#!/usr/bin/env bash
# The CPU image's smoke test, run inside the image by the Dockerfile's smoke stage as its non-root
# user: attnscope-server on the small checkpoint in /smoke/model, its health, a capture with
# attnscope-capture, the stored file loaded with the Python package (numpy only) and checked.
set -euo pipefail
OUT=$(mktemp -d)
# The build's RUN may share the host's network: a port of its own, retried if taken.
for attempt in 1 2 3 4 5; do
  PORT=$((20000 + RANDOM % 30000))
  attnscope-server --model_dir=/smoke/model --listen="127.0.0.1:$PORT" > "$OUT/server.log" 2>&1 &
  SERVER=$!
  ok=0
  for _ in $(seq 1 120); do
    if attnscope-capture --health --server="127.0.0.1:$PORT" > /dev/null 2>&1; then ok=1; break; fi
    kill -0 "$SERVER" 2>/dev/null || break
    sleep 0.5
  done
  [ "$ok" = 1 ] && break
  kill "$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
  echo "smoke: server did not come up on port $PORT (attempt $attempt):" >&2
  tail -5 "$OUT/server.log" >&2
  [ "$attempt" = 5 ] && exit 1
done
trap 'kill $SERVER 2>/dev/null || true' EXIT
attnscope-capture --server="127.0.0.1:$PORT" --prompt_ids=1,17,42,99,7,23,64,5 --max_new_tokens=4 \
  --save_attention --stats=row_entropy --output_dir="$OUT/data"
PYTHONPATH=/smoke/python python3 - "$OUT/data/attention_sample_0.safetensors" <<'PY'
import sys
import numpy as np
import attnscope
s = attnscope.load(sys.argv[1])
T = 8 + 4 - 1
for layer in s.layers:
    a = s.attention(layer)
    assert a.shape == (4, T, T), a.shape
    assert np.allclose(a.sum(-1), 1, atol=1e-4) and not np.triu(a, 1).any()
positions, entropy = s.statistic("row_entropy", 0)
assert entropy.shape == (4, T) and np.isfinite(entropy).all()
print(f"smoke: sample loaded: layers {s.layers}, {T} positions, generated {s.metadata['token_ids']}")
PY
kill "$SERVER"
wait "$SERVER" 2>/dev/null || true
trap - EXIT
echo "smoke: passed as $(id -un) (server, health, capture, sample loaded)"
