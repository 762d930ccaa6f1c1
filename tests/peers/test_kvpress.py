"""KV policies against kvpress itself (issue 24): for StreamingLLM, H2O (kvpress' observed
attention), SnapKV, PyramidKV and Ada-KV (over SnapKV and StreamingLLM), the server's key scores and
the keys it keeps per (layer, kv head) equal what kvpress' presses compute and keep on the same
checkpoint and prompt (kvpress 0.2.10 and its transformers from PyPI, in the project venv). Then the
divergence the server reports for a policy equals two eager transformers runs on the same tokens, one
with a 4-D attention mask hiding, from every generated row, the keys the policy evicted: KL, top-1
agreement, rank and the full model's mass on the evicted keys, to 1e-5.
Run by the project venv's Python (CTest peer_tests); the server is driven through
tests/tools/serve_requests.py under Debian's /usr/bin/python3 (the venv has no gRPC)."""
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import kvpress

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT = [1] + [int(x) for x in np.random.default_rng(7).integers(4, 160, 39)]  # 40 tokens
STEPS = 6
WINDOW = 8

# (name, the server's kv_policy, the kvpress press, eager attention needed)
CASES = [
    ("streaming_llm", dict(kind="streaming_llm", compression_ratio=0.5, n_sink=4),
     lambda: kvpress.StreamingLLMPress(compression_ratio=0.5, n_sink=4), False),
    ("h2o", dict(kind="h2o", compression_ratio=0.4),
     lambda: kvpress.ObservedAttentionPress(compression_ratio=0.4), True),
    ("snapkv", dict(kind="snapkv", compression_ratio=0.5, window_size=WINDOW, kernel_size=5),
     lambda: kvpress.SnapKVPress(compression_ratio=0.5, window_size=WINDOW, kernel_size=5), False),
    ("pyramidkv", dict(kind="pyramidkv", compression_ratio=0.5, window_size=WINDOW, kernel_size=5, beta=20),
     lambda: kvpress.PyramidKVPress(compression_ratio=0.5, window_size=WINDOW, kernel_size=5, beta=20), False),
    ("adakv_snapkv", dict(kind="snapkv", compression_ratio=0.6, window_size=WINDOW, adaptive=True, alpha_safeguard=0.2),
     lambda: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=0.6, window_size=WINDOW), alpha_safeguard=0.2),
     False),
    ("adakv_streaming_llm", dict(kind="streaming_llm", compression_ratio=0.5, adaptive=True),
     lambda: kvpress.AdaKVPress(kvpress.StreamingLLMPress(compression_ratio=0.5)), False),
]


@pytest.fixture(scope="module")
def model_dir(make_checkpoint):
    return make_checkpoint("llama31_gqa")  # 3 layers, 4 query heads over 2 kv heads, float32


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):
    """What the server returned for each case, and for the same cases with report_scores."""
    tmp = tmp_path_factory.mktemp("kv")
    requests = [dict(token_ids=PROMPT, max_new_tokens=STEPS, ignore_eos=True,
                     kv_policy=dict(policy, report_scores=True)) for _, policy, _, _ in CASES]
    (tmp / "requests.json").write_text(json.dumps(requests))
    subprocess.run(["/usr/bin/python3", os.path.join(ROOT, "tests", "tools", "serve_requests.py"), model_dir,
                    str(tmp / "requests.json"), str(tmp / "out.json")], check=True, timeout=600)
    return dict(zip([c[0] for c in CASES], json.loads((tmp / "out.json").read_text())))


def load(model_dir, eager):
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32,
                                                 attn_implementation="eager" if eager else "sdpa")
    return model.eval()


def kvpress_choice(model_dir, make_press, eager):
    """Per layer: (scores [kv_heads, n], kept [kv_heads, n] bool) as kvpress computes and keeps them
    at the end of the prefill."""
    model = load(model_dir, eager)
    press = make_press()
    scorer = press.press if isinstance(press, kvpress.AdaKVPress) else press
    scores = {}
    original_score = scorer.score

    def recording_score(module, *args, **kwargs):
        s = original_score(module, *args, **kwargs)
        scores[module.layer_idx] = s[0].detach().to(torch.float64).numpy().copy()
        return s

    scorer.score = recording_score
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        full = DynamicCache()
        model(ids, past_key_values=full, output_attentions=eager)
        cache = DynamicCache()
        with press(model):
            model(ids, past_key_values=cache, output_attentions=eager)
    n = len(PROMPT)
    out = []
    for layer, attn in enumerate(model.model.layers):
        kv_heads = full.key_cache[layer].shape[1]
        kept = np.zeros((kv_heads, n), bool)
        if isinstance(press, kvpress.AdaKVPress):
            _, heads, positions = attn.self_attn.masked_key_indices
            kept[:] = True
            kept[heads.numpy(), positions.numpy()] = False
        else:
            # Which original positions the compressed cache's keys came from (gather copies them).
            k_full, k_kept = full.key_cache[layer][0], cache.key_cache[layer][0]
            for h in range(kv_heads):
                match = (k_kept[h][:, None, :] == k_full[h][None, :, :]).all(-1)  # (kept, n)
                assert (match.sum(1) == 1).all()
                kept[h, match.int().argmax(1).numpy()] = True
        out.append((scores[layer], kept))
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_scores_and_kept_keys_equal_kvpress(case, model_dir, served):
    name, _, make_press, eager = case
    theirs = kvpress_choice(model_dir, make_press, eager)
    ours = {d["layer"]: d for d in served[name]["decisions"]}
    assert sorted(ours) == list(range(len(theirs)))
    for layer, (scores, kept) in enumerate(theirs):
        got_scores = np.array(ours[layer]["scores"])
        got_kept = np.array(ours[layer]["kept"], bool)
        if "snapkv" in name or name == "pyramidkv":
            # The window's keys are always kept: kvpress >= 0.3 pads their scores with the maximum
            # + 1 (as attnscope does), 0.2.10 (the last for transformers < 4.54) with the maximum.
            np.testing.assert_allclose(got_scores[:, -WINDOW:], got_scores[:, :-WINDOW].max() + 1, rtol=1e-6)
            scores[:, -WINDOW:] = got_scores[:, -WINDOW:]
        np.testing.assert_allclose(got_scores, scores, rtol=1e-5, atol=1e-6, err_msg=f"{name} layer {layer}")
        assert (got_kept == kept).all(), f"{name} layer {layer}: kept\n{got_kept.astype(int)}\nkvpress\n{kept.astype(int)}"
        print(f"{name} layer {layer}: kept per kv head {got_kept.sum(1).tolist()}, max |score diff| "
              f"{np.abs(got_scores - scores).max():.1e}")


def masked_forward(model, seq, hidden):
    """Eager transformers over seq with a 4-D float mask (1, heads, T, T): causal, plus `hidden`
    [layer][heads, T, T] (True: hidden) for each layer. Returns logits (T, vocab) float64 and the
    attention of each layer."""
    T = len(seq)
    causal = torch.full((T, T), float("-inf")).triu(1)
    masks = [causal.masked_fill(torch.from_numpy(h), float("-inf"))[None] for h in hidden]
    handles = []
    for layer, block in enumerate(model.model.layers):  # each layer its own mask
        def pre(module, args, kwargs, mask=masks[layer]):
            kwargs["attention_mask"] = mask
            return args, kwargs
        handles.append(block.self_attn.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(torch.tensor([seq]), output_attentions=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out.logits[0].to(torch.float64).numpy(), [a[0].to(torch.float64).numpy() for a in out.attentions]


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("name", ["streaming_llm", "snapkv", "pyramidkv", "adakv_snapkv"])
def test_divergence_equals_two_masked_transformers_runs(name, model_dir, served):
    r = served[name]
    tokens = r["generated_ids"]
    seq = PROMPT + tokens[:-1]
    T, P = len(seq), len(PROMPT)
    model = load(model_dir, eager=True)
    heads = model.config.num_attention_heads
    group = heads // model.config.num_key_value_heads
    none = [np.zeros((heads, T, T), bool) for _ in model.model.layers]
    hidden = []
    for d in sorted(r["decisions"], key=lambda d: d["layer"]):
        evicted = ~np.array(d["kept"], bool).repeat(group, 0)  # (heads, P)
        h = np.zeros((heads, T, T), bool)
        h[:, P:, :P] = evicted[:, None, :]  # every generated row loses the evicted prompt keys
        hidden.append(h)
    full_logits, full_att = masked_forward(model, seq, none)
    int_logits, _ = masked_forward(model, seq, hidden)
    for t in range(1, STEPS + 1):
        row = P - 2 + t
        lf, li = log_softmax(full_logits[row]), log_softmax(int_logits[row])
        assert tokens[t - 1] == int(np.argmax(li))  # the intervened model led, greedily
        assert r["kl"][t - 1] == pytest.approx(float((np.exp(lf) * (lf - li)).sum()), abs=1e-5)
        assert r["top1_agree"][t - 1] == (int(np.argmax(lf)) == int(np.argmax(li)))
        assert r["rank"][t - 1] == 1 + int((full_logits[row] > full_logits[row][tokens[t - 1]]).sum())
        lost = np.array([(a[:, row, :] * hidden[layer][:, row, :]).sum(-1) for layer, a in enumerate(full_att)])
        np.testing.assert_allclose(np.array(r["lost_mass"][t - 1]), lost, atol=1e-5)
    assert max(r["kl"]) > 1e-4 and np.array(r["lost_mass"]).max() > 1e-3
