#!/usr/bin/env bash
# Runs every test: installs what is missing (Debian packages, npm tokenizer data), builds, then CTest (C++ GoogleTest suites and the
# Python tests against the independent numpy reference), then the sanitizer build (tests/sanitize.sh),
# then the CPU container image built with podman and smoke-tested (CTest entry image_check, alone:
# it keeps both cores busy for its build).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
bash deploy/fetch-tokenizers.sh
bash tests/format_check.sh
bash deploy/build.sh
ctest --test-dir build --output-on-failure -j 2 -E '^image_check$'
# The same C++ suites, fuzz targets and service tests against an ASan + UBSan build.
bash tests/sanitize.sh
ctest --test-dir build --output-on-failure -R '^image_check$'
