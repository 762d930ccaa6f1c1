#!/usr/bin/env bash
# The project's Python virtual environment (.venv at the repository root, ignored by git): the PyPI
# packages the libtorch 2.x build links against (the `torch` wheel carries libtorch: headers and
# shared libraries under torch/) and the peers the tests and benchmarks compare with (eager and sdpa
# transformers). Interpreter: Debian's /usr/bin/python3 (python3-venv). Pinned versions; pip's cache
# keeps the ~5 GB of wheels (torch for Linux is a CUDA build; it runs on the CPU) between runs.
# Idempotent: a venv whose pins match is kept.
#   deploy/python-env.sh            create or update .venv; prints nothing else on success
#   deploy/python-env.sh --prefix   also print the wheel's torch folder (for -DATTNSCOPE_TORCH_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ATTNSCOPE_VENV:-$PWD/.venv}"
PINS=(torch==2.8.0 transformers==4.53.3 numpy==1.26.4 pytest==8.3.4 safetensors==0.4.5
      datasets==2.21.0 pandas==2.2.3 pyarrow==17.0.0 cachetools==5.5.2 requests==2.32.3)
# kvpress (tests/peers/test_kvpress.py) without its declared dependencies: 0.2.10 is the last for
# transformers < 4.54 and declares numpy >= 2, which it does not need (the pins above keep 1.26.4);
# datasets, cachetools and requests are what its package imports.
NODEPS=(kvpress==0.2.10)
STAMP="$VENV/attnscope-pins"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "${PINS[*]} ${NODEPS[*]}" ]; then
  echo "python-env: creating $VENV with ${PINS[*]} ${NODEPS[*]}" >&2
  rm -rf "$VENV"
  /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PINS[@]}" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "${NODEPS[@]}" >&2
  echo "${PINS[*]} ${NODEPS[*]}" >"$STAMP"
fi
if [ "${1:-}" = "--prefix" ]; then
  "$VENV/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))'
fi
