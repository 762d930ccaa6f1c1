#!/usr/bin/env bash
# Coverage-guided fuzzing with clang's libFuzzer (+ ASan and UBSan), the longer run:
#   bash tests/fuzz/run.sh [SECONDS_PER_TARGET] [TARGET ...]     (default 60 s, every target)
# Builds into build-fuzz/, fuzzes each target from a copy of its committed seeds (the corpus in the
# repository is not changed; new inputs stay in build-fuzz/corpus/), and prints each target's runs.
# A crash leaves its input in build-fuzz/ and fails the run.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
SECONDS_PER_TARGET="${1:-60}"
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=(fuzz_safetensors fuzz_config fuzz_tokenizer fuzz_template fuzz_chat_config fuzz_registry fuzz_auth fuzz_request fuzz_stream fuzz_stored_sample)
BUILD="$ROOT/build-fuzz"
CC=clang CXX=clang++ cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DATTNSCOPE_FUZZ=libfuzzer \
  -DATTNSCOPE_SANITIZE=address,undefined -DATTNSCOPE_BUILD_TESTS=OFF -DATTNSCOPE_BUILD_BENCH=OFF >/dev/null
cmake --build "$BUILD" -j "${JOBS:-2}" --target "${TARGETS[@]}"
export ASAN_OPTIONS="detect_leaks=0"
status=0
for t in "${TARGETS[@]}"; do
  seeds="$ROOT/tests/fuzz/corpus/${t#fuzz_}"
  work="$BUILD/corpus/${t#fuzz_}"
  mkdir -p "$work"
  cp -n "$seeds"/* "$work"/ 2>/dev/null || true
  log="$BUILD/$t.log"
  if (cd "$BUILD" && "./tests/fuzz/$t" -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=4096 -timeout=10 \
        -print_final_stats=1 "$work") >"$log" 2>&1; then
    echo "$t: $(grep -E '^Done [0-9]+ runs' "$log" || tail -1 "$log"); corpus $(ls "$work" | wc -l) inputs"
  else
    echo "$t: FAILED (see $log)"; tail -30 "$log"; status=1
  fi
done
exit $status
