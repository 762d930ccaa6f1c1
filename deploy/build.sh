#!/usr/bin/env bash
# Configures and builds attnscope into ./build (Release, 2 jobs by default). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS="${JOBS:-2}"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release
cmake --build build -j "$JOBS"
