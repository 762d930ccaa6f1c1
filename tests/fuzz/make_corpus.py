"""Writes the fuzz targets' seed corpus (tests/fuzz/corpus/<target>/): small valid inputs of each
kind, so that mutations start from what the parsers accept. Files named regression-* beside them
are inputs the fuzzers found (kept as found, each with a test elsewhere). Rerun after a format change:
    /usr/bin/python3 tests/fuzz/make_corpus.py build"""
import json
import os
import struct
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [os.path.join(ROOT, "tests", "tools")]
import checkpoint  # noqa: E402
import stfile  # noqa: E402


def out(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def safetensors():
    d = os.path.join(HERE, "corpus", "safetensors")
    os.makedirs(d, exist_ok=True)
    stfile.write(os.path.join(d, "mixed"), {"a": (np.arange(6, dtype=np.float32).reshape(2, 3), "F32"),
                                            "b": (np.ones(4), "BF16"), "c": (np.arange(3), "I64"),
                                            "d": (np.zeros((0, 5)), "F16")}, metadata={"format": "pt"})
    stfile.write(os.path.join(d, "empty"), {})
    stfile.write(os.path.join(d, "bool"), {"m": (np.array([True, False]), "BOOL")})


def config():
    for variant in ("llama31_gqa", "qwen2_swa", "mistral_hd", "qwen2_f16"):
        if variant in checkpoint.VARIANTS:
            out("config", variant, json.dumps(checkpoint.VARIANTS[variant]))
    out("config", "minimal", json.dumps({"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
                                         "intermediate_size": 16, "num_hidden_layers": 1,
                                         "num_attention_heads": 2}))


def tokenizer():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for word in ["H", "e", "l", "o", "He", "ll", "Hell", "Hello", "\u2581", "\u2581w"]:
        vocab.setdefault(word, len(vocab))
    metaspace = {"model": {"type": "BPE", "vocab": vocab, "merges": ["H e", "l l", "He ll", "Hell o", "\u2581 w"],
                           "byte_fallback": True, "unk_token": "<unk>", "fuse_unk": True},
                 "normalizer": {"type": "Sequence", "normalizers": [
                     {"type": "Prepend", "prepend": "\u2581"},
                     {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
                 "decoder": {"type": "Sequence", "decoders": [
                     {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                     {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1,
                                                                  "stop": 0}]},
                 "added_tokens": [{"id": 1, "content": "<s>", "special": True}],
                 "post_processor": {"type": "TemplateProcessing",
                                    "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                               {"Sequence": {"id": "A", "type_id": 0}}],
                                    "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}}
    out("tokenizer", "metaspace.json", json.dumps(metaspace))
    bytelevel_vocab = {chr(c) if 33 <= c < 127 else f"\u0100{c}": c for c in range(256)}
    bytelevel = {"model": {"type": "BPE", "vocab": bytelevel_vocab, "merges": [], "ignore_merges": True},
                 "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                     {"type": "Split", "pattern": {"Regex": "\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+|\\s+"},
                      "behavior": "Isolated", "invert": False},
                     {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]},
                 "decoder": {"type": "ByteLevel"},
                 "added_tokens": [{"id": 256, "content": "<|end|>", "special": True, "lstrip": False,
                                   "rstrip": False, "single_word": False}]}
    out("tokenizer", "bytelevel.json", json.dumps(bytelevel))


def registry():
    with open(os.path.join(ROOT, "deploy", "models.example.json")) as f:
        out("registry", "example.json", f.read())
    out("registry", "small.json", json.dumps({"llama3.1-8b-128k": {"path": "/m", "max_length": 127500}}))


def auth():
    out("auth", "match", "Bearer s3cret\n# lab tokens\n\t s3cret \r\nother\n")
    out("auth", "scheme", "bearer\tother\nother\n")
    out("auth", "wrong", "Basic s3cret\ns3cret\n")


def shared_ring():
    """First byte: 1 = client side (position, size words), 0 = server side (flags, then operations)."""
    w = lambda *xs: b"".join(struct.pack("<Q", x) for x in xs)  # noqa: E731
    cap = 1 << 16
    out("shared_ring", "client_laps", b"\x01" + w(0, 1001, 1000, cap // 2, cap, cap // 2 + 1, 3 * cap, 0))
    out("shared_ring", "client_bad", b"\x01" + w(5, cap + 2, (1 << 63) - 9, 20, cap - 10, 30))
    # The real region, capacity, key and limit; puts between published read positions.
    out("shared_ring", "server_ok", b"\x00" + w(1 | 2 | 4 | 8, 0 | (cap // 2 << 8), 2 | (cap // 2 << 8), 0,
                                                1, cap // 2, 0 | (cap // 4 << 8), 1, cap, 0 | (cap << 8)))
    out("shared_ring", "server_poked", b"\x00" + w(1 | 2 | 4 | 8 | 16 | (64 << 16)) + b"\xff" * 80 +
        w(0 | (100 << 8), 1, 1 << 62, 2 | (5000 << 8), 0 | (cap << 8)))
    out("shared_ring", "server_names", b"\x00" + w(2 | 4 | 8 | (12 << 56)) + b"/attnscope-x" + w(0))


def request(build):
    sys.path[:0] = [os.path.join(ROOT, "client", "python"), os.path.join(build, "python")]
    from attnscope.client import Client, capture_spec
    from attnscope.v1 import attnscope_pb2 as pb
    reqs = {
        "dense": Client.request(token_ids=[1, 2, 3, 4, 5], max_new_tokens=4, form="dense", layers=[0, 31],
                                heads=[1, 2], phases=["prefill"], element_type="float16"),
        "pooled": Client.request(token_ids=list(range(40)), form="pooled", pool=8, pool_op="max",
                                 query_ranges=[(0, 5), (10, 20)], row_entropy=True, sink_mass=4),
        "top_k": Client.request(token_ids=[7] * 30, form="top_k", capture_top_k=3, last_queries=5,
                                key_score=8, local_mass=4, key_score_variance=True, max_bytes=1 << 20),
        "text": Client.request(prompt="hello", max_length=3, temperature=0.7, top_p=0.9, seed=3,
                               stop_token_ids=[2]),
    }
    for name, r in reqs.items():
        out("request", name, r.SerializeToString())

    def frame(msg):
        b = msg.SerializeToString()
        return struct.pack("<H", len(b)) + b
    sys.path[:0] = [os.path.join(ROOT, "tests", "python")]
    from test_client_hostile_server import good_stream
    for fmt, first in (("safetensors", b"\x00"), ("pickle", b"\x01")):
        out("stream", f"good_{fmt}", first + b"".join(frame(m) for m in good_stream()))
    stat = pb.StreamAttentionResponse(statistic=pb.StatisticChunk(
        kind="row_entropy", phase=pb.PHASE_PREFILL, layer=0, heads=[0, 1], query_begin=0, query_end=4, key_length=4,
        shape=[2, 4], block_bytes=32, data=b"\0" * 32))
    out("stream", "statistic", b"\x00" + b"".join(frame(m) for m in good_stream()[:1] + [stat] + good_stream()[-1:]))
    del capture_spec


def template():
    """Chat-template seeds: the language corners the renderer's test compares with jinja2, and a
    template in the shape of the real ones (a loop over messages, roles, the generation prompt)."""
    sys.path[:0] = [os.path.join(ROOT, "tests", "python")]
    from test_chat_templates import CORNERS
    for i, (text, _) in enumerate(CORNERS):
        out("template", f"corner_{i:02d}", text)
    out("template", "chat", "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
        "<<SYS>>{{ m['content'] | trim }}<</SYS>>{% elif loop.index0 % 2 == 0 %}[INST] {{ m.content }} [/INST]"
        "{% else %} {{ m.content | trim }}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


def chat_config():
    """tokenizer_config.json seeds: a template string with special tokens (string and AddedToken
    forms), named templates, and a template that raises."""
    tmpl = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}<<SYS>>{{ m.content }}<</SYS>>"
            "{% else %}[{{ m.role }}] {{ m.content | trim }}{{ eos_token if m.role == 'assistant' }}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}[assistant] {{ date_string | default('') }}{% endif %}")
    out("chat_config", "string", json.dumps({"chat_template": tmpl, "bos_token": "<s>",
                                             "eos_token": {"content": "</s>", "lstrip": False}}))
    out("chat_config", "named", json.dumps({"chat_template": [{"name": "default", "template": tmpl},
                                                              {"name": "tool_use", "template": "{{ tools }}"}]}))
    out("chat_config", "raises", json.dumps({"chat_template": "{{ raise_exception('no system messages') }}"}))


def cli_dialect():
    """The CLIs' dialects: a whole capture spec, then --ablate, --knockout and --kv_policy lines."""
    out("cli_dialect", "policy", "pooled:4 stats=row_entropy,key_score:16 layers=0,1 heads=2\n"
        "layer=1 heads=0,3 kind=mean;layer=0 heads=1\nlayers=1 heads=2 keys=3:8 queries=10:40;keys=0:2\n"
        "snapkv compression_ratio=0.5 window_size=8 kernel_size=3 adaptive=true alpha_safeguard=0.2")
    out("cli_dialect", "h2o", "top_k:8 phases=decode rows=0:4,9:12 element_type=bfloat16\n\n\n"
        "h2o budget=6 recent_size=1 decode_interval=3 report_scores=true")
    out("cli_dialect", "streaming", "none stats=sink_mass:4,local_mass:64\n\nkeys=1:9\n"
        "streaming_llm n_sink=2 budget=6 decode_interval=2")


if __name__ == "__main__":
    build = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build")
    safetensors()
    config()
    tokenizer()
    registry()
    auth()
    shared_ring()
    request(build)
    template()
    chat_config()
    cli_dialect()
