#!/usr/bin/env bash
# The one build script. CI and developers build everything into ./build; the container images
# (Dockerfile, both the CPU and the CUDA stage) build the programs only; the GPU check
# (bench/gpu/run.sh) builds its targets against the machine's libtorch. What the GPU machine and the
# images build is what this script builds. Idempotent.
#   deploy/build.sh [--product] [--build-dir DIR] [--targets "T1 T2 ..."] [-- CMAKE_ARGS...]
#     --product   programs only (no tests, benchmarks or fuzz targets)
# Environment: JOBS (default 2), ATTNSCOPE_GENERATOR (a CMake generator, e.g. Ninja).
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS="${JOBS:-2}"
DIR=build
PRODUCT=0
TARGETS=""
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --product) PRODUCT=1 ;;
    --build-dir) DIR="$2"; shift ;;
    --targets) TARGETS="$2"; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "usage: deploy/build.sh [--product] [--build-dir DIR] [--targets \"T ...\"] [-- CMAKE_ARGS...]" >&2
       exit 2 ;;
  esac
  shift
done
ARGS=(-DCMAKE_BUILD_TYPE=Release)
if [ "$PRODUCT" = 1 ]; then ARGS+=(-DATTNSCOPE_BUILD_TESTS=OFF -DATTNSCOPE_BUILD_BENCH=OFF); fi
if [ -n "${ATTNSCOPE_GENERATOR:-}" ]; then ARGS+=(-G "$ATTNSCOPE_GENERATOR"); fi
cmake -S . -B "$DIR" "${ARGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
if [ -n "$TARGETS" ]; then
  # shellcheck disable=SC2086  # a list of target names
  cmake --build "$DIR" -j "$JOBS" --target $TARGETS
else
  cmake --build "$DIR" -j "$JOBS"
fi
