#!/usr/bin/env bash
# The sanitizer build: AddressSanitizer + UndefinedBehaviorSanitizer (gcc), into build-asan/. Runs
# the C++ suites, the fuzz targets (seeds + mutants) and the service tests (real server processes,
# the cancel/deadline storm, hostile servers for the capture client) against it. Any sanitizer
# report fails the run, also one from a server process whose test passed.
#   bash tests/sanitize.sh            (deploy/test.sh runs it after the main suite)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUILD="${ATTNSCOPE_ASAN_BUILD_DIR:-$ROOT/build-asan}"
JOBS="${JOBS:-2}"
REPORTS="$BUILD/sanitizer-reports"

cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" \
  -DATTNSCOPE_SANITIZE=address,undefined -DATTNSCOPE_BUILD_BENCH=OFF -DATTNSCOPE_FUZZ_ITERATIONS=5000 >/dev/null
cmake --build "$BUILD" -j "$JOBS"

rm -rf "$REPORTS"
mkdir -p "$REPORTS"
# Leaks: libtorch and gRPC keep process-lifetime singletons that LeakSanitizer would list at every
# exit; a leak per request still shows as growth in the slow-reader and storm tests.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:log_path=$REPORTS/asan:strict_string_checks=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$REPORTS/ubsan"

status=0
ctest --test-dir "$BUILD" --output-on-failure -j "$JOBS" -E '^(python_tests|demo|deploy_check|k8s_check|image_check)$' || status=1
ATTNSCOPE_BUILD_DIR="$BUILD" ATTNSCOPE_SANITIZED=1 ATTNSCOPE_STORM_SECONDS="${ATTNSCOPE_STORM_SECONDS:-20}" \
  /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/python/test_service.py \
  tests/python/test_service_hardening.py tests/python/test_client_hostile_server.py \
  tests/python/test_clients.py tests/python/test_chat_families.py tests/python/test_chat_templates.py \
  tests/python/test_shared_output.py tests/python/test_head_detector.py tests/python/test_interventions.py \
  tests/python/test_trained_model.py tests/python/test_capture_cli.py tests/python/test_jobs.py || status=1

if compgen -G "$REPORTS/*" >/dev/null; then
  echo "sanitize: reports in $REPORTS:" >&2
  for f in "$REPORTS"/*; do echo "== $f" >&2; head -60 "$f" >&2; done
  status=1
fi
[ $status -eq 0 ] && echo "sanitize: ASan+UBSan build passed (C++ suites, fuzz targets, service tests), no reports"
exit $status
