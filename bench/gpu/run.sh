#!/usr/bin/env bash
# The GPU check, in one command on the GPU machine (see BENCHMARKS.md): builds attnscope against the
# machine's CUDA libtorch 2.x with gRPC & co. from carried Debian packages (.gpu_debs/, made by
# `bench/gpu/fetch_debs.sh`), runs the engine's tests on CUDA, the fidelity check (CPU reference,
# numpy reference, transformers eager) and the head-to-head benchmark. Logs and figures go to $OUT.
# Every stage runs even if an earlier one failed; DEADLINE_S bounds the whole run.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/attnscope-gpu-out}"
mkdir -p "$OUT"
START=$(date +%s)
export DEADLINE=$((START + ${DEADLINE_S:-540}))
exec > >(tee "$OUT/log.txt") 2>&1

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c 'import torch, transformers; print("torch", torch.__version__, "cxx11abi", torch._C._GLIBCXX_USE_CXX11_ABI, "transformers", transformers.__version__)'
gcc --version | head -1; cmake --version | head -1; ldd --version | head -1

echo "== unpack carried packages"
PREFIX=/tmp/attnscope-prefix
mkdir -p "$PREFIX"
for f in .gpu_debs/*.deb; do dpkg -x "$f" "$PREFIX"; done
export LD_LIBRARY_PATH="$PREFIX/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
export LIBRARY_PATH="$PREFIX/usr/lib/x86_64-linux-gnu"  # libraries gRPC's CMake names bare (-lre2)
TORCH_CMAKE=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
TORCH_LIB=$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB:$LD_LIBRARY_PATH"

echo "== build ($(( $(date +%s) - START )) s)"
# Through deploy/build.sh, the script CI and the container images build with.
GPU_CMAKE=(-DCMAKE_PREFIX_PATH="$TORCH_CMAKE;$PREFIX/usr;$PREFIX/usr/lib/x86_64-linux-gnu/cmake"
           -DProtobuf_PROTOC_EXECUTABLE="$PREFIX/usr/bin/protoc" -DATTNSCOPE_PYTHON=python3 -DATTNSCOPE_BUILD_BENCH=OFF)
gpu_build() {  # C++ standard, targets
  JOBS=16 ATTNSCOPE_GENERATOR=Ninja bash deploy/build.sh --build-dir build-gpu --targets "$2" -- \
    -DCMAKE_CXX_STANDARD="$1" "${GPU_CMAKE[@]}"
}
TARGETS="attnscope-run attnscope_engine_tests attnscope-server attnscope-capture attnscope-tokenize"
built=0
for std in 17 20; do
  rm -rf build-gpu
  if gpu_build "$std" "$TARGETS" > "$OUT/build_$std.txt" 2>&1; then
    echo "built with C++$std"; built=1; break
  fi
  echo "C++$std build failed:"; grep -m 20 -E "error|Error" "$OUT/build_$std.txt" | cut -c1-300
  # Without gRPC, at least the engine.
  if gpu_build "$std" "attnscope-run attnscope_engine_tests" > "$OUT/build_engine_$std.txt" 2>&1; then
    echo "engine-only build with C++$std"; built=2; break
  fi
done
[ "$built" -gt 0 ] || { echo "no build"; exit 1; }

echo "== engine tests on the CUDA build ($(( $(date +%s) - START )) s)"
timeout 120 build-gpu/tests/attnscope_engine_tests --gtest_brief=1 2>&1 | tail -5
# The fused fast path (libtorch 2 only) against float64 over pos0 0/20/36 (prefill, masked
# continuation, decode) and windows 0/5/64: each line prints its maximum difference.
timeout 60 build-gpu/tests/attnscope_engine_tests --gtest_filter='*AttentionPaths*' 2>&1 \
  | grep -E "max \||FAILED|PASSED|SKIPPED" | tee "$OUT/fast_path.txt" | tail -12

if [ -z "${SKIP_FIDELITY:-}" ]; then
  echo "== fidelity ($(( $(date +%s) - START )) s)"
  timeout 150 python3 bench/gpu/fidelity.py --build build-gpu --out "$OUT" 2>&1 | tail -40
fi

echo "== head to head ($(( $(date +%s) - START )) s)"
python3 bench/gpu/headtohead.py --build build-gpu --out "$OUT" ${HEADTOHEAD_ARGS:-} 2>&1 | tail -60
echo "== done in $(( $(date +%s) - START )) s"
