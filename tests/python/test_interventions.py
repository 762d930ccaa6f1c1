"""Interventions (issue 24): head ablations and attention knockouts run by the server beside the
unmodified model, checked against an independent computation: two float64 reference passes over the
same tokens (tests/tools/reference.py), one with the knockout's hidden keys masked or the heads
ablated, KL, top-1 agreement, rank and the full model's mass on the hidden keys from their logits
and attention, to 1e-5; the capture of the intervened run; hostile interventions refused with
precise statuses."""
import json
import os
import subprocess
import sys

import grpc
import numpy as np
import pytest

import reference
from conftest import BUILD, binary
from service_fixture import Server, setup_paths

setup_paths(BUILD)
import attnscope  # noqa: E402

PROMPT = [1, 17, 42, 99, 5, 63, 120, 8, 77, 31, 150, 64, 12, 88]
STEPS = 6


@pytest.fixture(scope="module")
def model(make_checkpoint):
    return make_checkpoint("llama31_gqa")  # 3 layers, 4 query heads over 2 kv heads


@pytest.fixture(scope="module")
def server(model):
    s = Server(binary("attnscope-server"), model, "--max_concurrent=2")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    c = attnscope.Client(server.target, timeout=120)
    yield c
    c.close()


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def knockout_mask(knockouts, layer, heads, T):
    """bool [heads, T, T]: True where a knockout hides key j from row i (j < i only)."""
    mask = np.zeros((heads, T, T), bool)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    for k in knockouts:
        if k.get("layers") and layer not in k["layers"]:
            continue
        rows = np.zeros(T, bool)
        for b, e in k.get("queries") or [(0, T)]:
            rows[b:e] = True
        keys = np.zeros(T, bool)
        for b, e in k["keys"]:
            keys[b:e] = True
        m = rows[:, None] & keys[None, :] & (j < i)
        for h in k.get("heads") or range(heads):
            mask[h] |= m
    return mask


def expected(model, tokens, knockouts=(), ablate=None):
    """Per step t (1-based): (kl, top1_agree, rank, lost [layers, heads]) and the intervened argmax,
    from two float64 passes over prompt + tokens[:-1]."""
    seq = PROMPT + list(tokens[:-1])
    T = len(seq)
    full_logits, full_att = reference.forward(model, seq)
    heads = full_att[0].shape[0]
    hidden = (lambda layer: knockout_mask(knockouts, layer, heads, T)) if knockouts else None
    int_logits, int_att = reference.forward(model, seq, hidden=hidden, ablate=ablate, mean_rows=len(PROMPT))
    out = []
    for t in range(1, len(tokens) + 1):
        row = len(PROMPT) - 2 + t
        lf, li = log_softmax(full_logits[row]), log_softmax(int_logits[row])
        kl = float((np.exp(lf) * (lf - li)).sum())
        agree = int(np.argmax(lf)) == int(np.argmax(li))
        rank = 1 + int((full_logits[row] > full_logits[row][tokens[t - 1]]).sum())
        lost = np.zeros((len(full_att), heads))
        if hidden is not None:
            for layer, a in enumerate(full_att):
                lost[layer] = (a[:, row, :] * hidden(layer)[:, row, :]).sum(-1)
        out.append((kl, agree, rank, lost, int(np.argmax(li))))
    return out, int_att


def check(r, want, tokens):
    table = r.divergence()
    assert list(table["step"]) == list(range(1, len(tokens) + 1))
    lost = r.lost_mass()
    for t, (kl, agree, rank, lost_want, argmax) in enumerate(want):
        assert tokens[t] == argmax  # the intervened model led, greedily
        assert table["kl"][t] == pytest.approx(kl, abs=1e-5)
        assert bool(table["top1_agree"][t]) == agree
        assert table["rank"][t] == rank
        np.testing.assert_allclose(lost[t], lost_want, atol=1e-5)


KNOCKOUTS = [
    [dict(keys=[(1, 6)])],  # every layer and head
    [dict(layers=[1], heads=[0, 3], keys=[(2, 5), (9, 11)])],
    [dict(layers=[0, 2], keys=[(0, 1)], queries=[(10, 14)]), dict(layers=[2], heads=[1], keys=[(3, 13)],
                                                                   queries=[(15, 30)])],
]


@pytest.mark.parametrize("knockouts", KNOCKOUTS)
def test_knockout_divergence_matches_two_reference_passes(client, model, knockouts):
    r = client.stream_attention(token_ids=PROMPT, max_new_tokens=STEPS, ignore_eos=True, knockout=knockouts)
    tokens = r.generated_ids
    assert len(tokens) == STEPS
    want, _ = expected(model, tokens, knockouts=knockouts)
    check(r, want, tokens)
    assert r.lost_mass().max() > 1e-3  # the hidden keys carried attention in the full model


@pytest.mark.parametrize("ablate", [
    [dict(layer=0, heads=[1], kind="zero")],
    [dict(layer=1, heads=[0, 2], kind="mean"), dict(layer=2, heads=3, kind="zero")],
])
def test_head_ablation_divergence_matches_two_reference_passes(client, model, ablate):
    r = client.stream_attention(token_ids=PROMPT, max_new_tokens=STEPS, ignore_eos=True, ablate=ablate)
    tokens = r.generated_ids
    spec = {(a["layer"], h): a["kind"] for a in ablate for h in np.atleast_1d(a["heads"])}
    want, _ = expected(model, tokens, ablate=spec)
    check(r, want, tokens)
    assert np.all(r.lost_mass() == 0)  # an ablation hides no key
    assert max(w[0] for w in want) > 1e-4  # and it changed the distribution


def test_the_capture_is_the_intervened_run(client, model):
    knockouts = [dict(layers=[1], heads=[2], keys=[(3, 8)])]
    r = client.stream_attention(token_ids=PROMPT, max_new_tokens=3, ignore_eos=True, knockout=knockouts,
                                layers=[1], form="dense")
    _, int_att = expected(model, r.generated_ids, knockouts=knockouts)
    a = r.attention(1)  # [heads, T, T]: prefill and decode rows
    T = a.shape[1]
    np.testing.assert_allclose(a, int_att[1][:, :T, :T], atol=1e-5)
    assert np.all(a[2, 8:, 3:8] == 0)


def test_capture_reference_gives_the_full_models_rows_on_the_intervened_tokens(client, model):
    # The intervened model leads (its tokens), the captures are the unmodified model's: the float64
    # pass without the knockout over the same tokens, prefill and decode rows, and its row entropy.
    knockouts = [dict(layers=[1], heads=[2], keys=[(3, 8)])]
    r = client.stream_attention(token_ids=PROMPT, max_new_tokens=STEPS, ignore_eos=True, knockout=knockouts,
                                capture_reference=True, form="dense", row_entropy=True)
    _, int_att = expected(model, r.generated_ids, knockouts=knockouts)
    _, full_att = reference.forward(model, PROMPT + r.generated_ids[:-1])
    for layer in range(3):
        a = r.attention(layer)
        T = a.shape[1]
        np.testing.assert_allclose(a, full_att[layer][:, :T, :T], atol=1e-5)
        p = np.clip(full_att[layer][:, :T, :T], 1e-30, None)
        entropy = -(full_att[layer][:, :T, :T] * np.log(p)).sum(-1)
        pos, values = r.statistic("row_entropy", layer)
        assert list(pos) == list(range(T))
        np.testing.assert_allclose(values, entropy, atol=1e-4)
    assert np.abs(r.attention(1)[2, 8:, 3:8]).max() > 1e-3  # what the knockout hid, seen
    assert not np.allclose(int_att[1][2, 8:, 3:8], r.attention(1)[2, 8:, 3:8])
    assert len(r.divergence()) == STEPS  # the divergence still compares the two runs


def test_reference_leads_and_unary_generate(client, model):
    knockouts = [dict(keys=[(1, 10)])]
    r = client.stream_attention(token_ids=PROMPT, max_new_tokens=STEPS, ignore_eos=True, knockout=knockouts,
                                reference_leads=True)
    full = reference.forward(model, PROMPT + r.generated_ids[:-1])[0]
    assert r.generated_ids == [int(np.argmax(full[len(PROMPT) - 1 + t])) for t in range(STEPS)]
    assert list(r.divergence()["rank"]) == [1] * STEPS  # the full model chose every token
    g = client.generate(token_ids=PROMPT, max_new_tokens=STEPS, ignore_eos=True, knockout=knockouts)
    s = client.stream_attention(token_ids=PROMPT, max_new_tokens=STEPS, ignore_eos=True, knockout=knockouts)
    assert [e.kl for e in g.divergence] == pytest.approx(list(s.divergence()["kl"]), abs=1e-6)
    plain = client.stream_attention(token_ids=PROMPT, max_new_tokens=STEPS, ignore_eos=True)
    assert plain.divergence_events == []


BAD = [
    (dict(capture_reference=True), grpc.StatusCode.INVALID_ARGUMENT, "interventions.capture_reference needs an intervention"),
    (dict(reference_leads=True), grpc.StatusCode.INVALID_ARGUMENT, "interventions.reference_leads needs an intervention"),
    (dict(ablate=[dict(layer=3, heads=[0])]), grpc.StatusCode.OUT_OF_RANGE, "ablations[0]: layer 3 requested, model has 3 layers"),
    (dict(ablate=[dict(layer=0, heads=[4])]), grpc.StatusCode.OUT_OF_RANGE, "ablations[0].heads: head 4"),
    (dict(ablate=[dict(layer=0, heads=[])]), grpc.StatusCode.INVALID_ARGUMENT, "ablations[0].heads is empty"),
    (dict(ablate=[dict(layer=0, heads=[0] * 5)]), grpc.StatusCode.INVALID_ARGUMENT, "interventions.ablations[0].heads has 5 entries"),
    (dict(ablate=[dict(layer=0, heads=[0])] * 1025), grpc.StatusCode.INVALID_ARGUMENT, "interventions.ablations has 1025 entries"),
    (dict(knockout=[dict(keys=[(0, 1)])] * 65), grpc.StatusCode.INVALID_ARGUMENT, "interventions.knockouts has 65 entries"),
    (dict(knockout=[dict(keys=[(i, i + 1) for i in range(5000)])]), grpc.StatusCode.INVALID_ARGUMENT, "5000 ranges together, more than 256"),
    (dict(knockout=[dict(keys=[])]), grpc.StatusCode.INVALID_ARGUMENT, "knockouts[0].keys is empty"),
    (dict(knockout=[dict(keys=[(5, 5)])]), grpc.StatusCode.INVALID_ARGUMENT, "knockouts[0].keys: range [5, 5) is empty"),
    (dict(knockout=[dict(keys=[(-3, 2)])]), grpc.StatusCode.INVALID_ARGUMENT, "range [-3, 2)"),
    (dict(knockout=[dict(keys=[(0, 15)])]), grpc.StatusCode.OUT_OF_RANGE, "knockouts[0].keys: range [0, 15) ends past the prompt (14)"),
    (dict(knockout=[dict(keys=[(0, 2 ** 40)])]), grpc.StatusCode.OUT_OF_RANGE, "ends past the prompt"),
    (dict(knockout=[dict(keys=[(0, 2)], queries=[(0, 2 ** 40)])]), grpc.StatusCode.OUT_OF_RANGE, "ends past the model's context (1024)"),
    (dict(knockout=[dict(layers=[7], keys=[(0, 2)])]), grpc.StatusCode.OUT_OF_RANGE, "knockouts[0].layers: layer 7"),
    (dict(knockout=[dict(heads=[-1], keys=[(0, 2)])]), grpc.StatusCode.OUT_OF_RANGE, "knockouts[0].heads: head -1"),
    (dict(knockout=[dict(layers=[0] * 4, keys=[(0, 2)])]), grpc.StatusCode.INVALID_ARGUMENT, "layers has 4 entries"),
]


SNAP = dict(kind="snapkv", window_size=4)
BAD += [
    (dict(kv_policy=dict(kind="h2o")), grpc.StatusCode.INVALID_ARGUMENT, "kv_policy (h2o): set exactly one of compression_ratio"),
    (dict(kv_policy=dict(kind="h2o", budget=0)), grpc.StatusCode.INVALID_ARGUMENT, "set exactly one of"),
    (dict(kv_policy=dict(kind="h2o", budget=3, compression_ratio=0.5)), grpc.StatusCode.INVALID_ARGUMENT, "set exactly one of"),
    (dict(kv_policy=dict(kind="h2o", budget=2 ** 40)), grpc.StatusCode.OUT_OF_RANGE, "budget 1099511627776 keys is more than the prompt's 14"),
    (dict(kv_policy=dict(kind="h2o", budget=-1)), grpc.StatusCode.INVALID_ARGUMENT, "budget -1 is negative"),
    (dict(kv_policy=dict(kind="h2o", compression_ratio=1.0)), grpc.StatusCode.INVALID_ARGUMENT, "compression_ratio 1 is outside (0, 1)"),
    (dict(kv_policy=dict(kind="h2o", compression_ratio=float("nan"))), grpc.StatusCode.INVALID_ARGUMENT, "is outside (0, 1)"),
    (dict(kv_policy=dict(kind="h2o", budget=4, recent_size=14)), grpc.StatusCode.INVALID_ARGUMENT, "recent_size 14 must be in [0, 14)"),
    (dict(kv_policy=dict(kind="streaming_llm", budget=4, n_sink=-2)), grpc.StatusCode.INVALID_ARGUMENT, "n_sink -2 must be in [0, 14)"),
    (dict(kv_policy=dict(SNAP, budget=4, window_size=14)), grpc.StatusCode.INVALID_ARGUMENT, "window_size 14 must be in [1, 14)"),
    (dict(kv_policy=dict(SNAP, budget=4, window_size=0)), grpc.StatusCode.INVALID_ARGUMENT, "window_size 0 must be in [1, 14)"),
    (dict(kv_policy=dict(SNAP, budget=4, kernel_size=4)), grpc.StatusCode.INVALID_ARGUMENT, "kernel_size 4 must be odd"),
    (dict(kv_policy=dict(SNAP, budget=4, kernel_size=2 ** 40 + 1)), grpc.StatusCode.INVALID_ARGUMENT, "must be odd, from 1 to 1023"),
    (dict(kv_policy=dict(kind="pyramidkv", window_size=4, budget=4, beta=0.5)), grpc.StatusCode.INVALID_ARGUMENT, "beta 0.5 must be in [1, 1e6]"),
    (dict(kv_policy=dict(kind="pyramidkv", window_size=4, budget=4, adaptive=True)), grpc.StatusCode.INVALID_ARGUMENT, "pyramidkv sets its own per layer"),
    (dict(kv_policy=dict(SNAP, budget=4, adaptive=True, alpha_safeguard=1.5)), grpc.StatusCode.INVALID_ARGUMENT, "alpha_safeguard 1.5 is outside [0, 1]"),
]


@pytest.mark.parametrize("kwargs,code,text", BAD)
def test_bad_interventions(client, kwargs, code, text):
    for call in (client.generate, client.stream_attention):
        with pytest.raises(grpc.RpcError) as e:
            call(token_ids=PROMPT, max_new_tokens=2, **kwargs)
        assert e.value.code() == code and text in e.value.details(), e.value.details()


def test_an_unknown_ablation_kind_or_key_is_refused_by_the_client(client):
    with pytest.raises(ValueError, match="kind 'half'"):
        client.request(token_ids=PROMPT, ablate=[dict(layer=0, heads=[0], kind="half")])
    with pytest.raises(TypeError, match="unknown key"):
        client.request(token_ids=PROMPT, knockout=[dict(key=[(0, 1)])])
    req = client.request(token_ids=PROMPT, ablate=[dict(layer=0, heads=[0])])
    req.interventions.ablations[0].kind = 7  # past the enum: the server refuses it
    with pytest.raises(grpc.RpcError) as e:
        client.stub.Generate(req, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "kind 7" in e.value.details()


def test_an_unknown_kv_policy_kind_or_key_is_refused(client):
    with pytest.raises(ValueError, match="kind 'lru'"):
        client.request(token_ids=PROMPT, kv_policy=dict(kind="lru", budget=4))
    with pytest.raises(TypeError, match="unknown key"):
        client.request(token_ids=PROMPT, kv_policy=dict(kind="h2o", window=4))
    req = client.request(token_ids=PROMPT, kv_policy=dict(kind="h2o", budget=4))
    req.interventions.kv_policy.kind = 9
    with pytest.raises(grpc.RpcError) as e:
        client.stub.Generate(req, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "kind 9 is not a KvPolicyKind" in e.value.details()
    # Scores are bounded per request (layers x kv heads x keys <= 2^21, engine_test checks the
    # refusal); a 1000-token prompt on this model asks for 6000.
    long = [5] * 1000
    big = client.request(token_ids=long, max_new_tokens=1, kv_policy=dict(kind="h2o", budget=4, report_scores=True))
    ok = client.stub.Generate(big, timeout=60)  # 3 layers x 2 kv heads x 1000 keys: fine
    assert len(ok.kv_decisions) == 3 and len(ok.kv_decisions[0].scores) == 2000


def h2o_expected(model, keep_recent=0, budget=6):
    """h2o's choice from the float64 reference attention of the prompt: the attention each key
    receives summed over the rows and divided by the rows that see it, mean over the kv head's query
    heads; the top `budget` kept per kv head."""
    _, att = reference.forward(model, PROMPT)
    n = len(PROMPT)
    out = []
    for a in att:  # [heads, n, n]
        s = (a.sum(1) / np.arange(n, 0, -1)).reshape(2, -1, n).mean(1)
        if keep_recent:
            s[:, n - keep_recent:] = s.max() + 1
        kept = np.zeros_like(s, bool)
        np.put_along_axis(kept, np.argsort(-s, 1)[:, :budget], True, 1)
        out.append((s, kept))
    return out


def test_h2o_scores_equal_the_float64_reference_and_both_rpcs_agree(client, model):
    policy = dict(kind="h2o", budget=6, recent_size=2, report_scores=True)
    r = client.stream_attention(token_ids=PROMPT, max_new_tokens=STEPS, ignore_eos=True, kv_policy=policy)
    assert [d.layer for d in r.kv_decisions] == [0, 1, 2]
    for layer, (scores, kept) in enumerate(h2o_expected(model, keep_recent=2)):
        np.testing.assert_allclose(r.key_scores(layer), scores, rtol=1e-5, atol=1e-6)
        assert (r.kept(layer) == kept).all()
        assert r.kept(layer)[:, -2:].all()  # the recent keys
    # 3 layers x 2 kv heads x 8 evicted keys x (k and v) x head_dim 16 x 4 bytes
    assert r.bytes_freed() == 3 * 2 * 8 * 2 * 16 * 4
    assert r.divergence()["kl"][0] == 0  # the first token comes from the prefill, before the decision
    assert r.lost_mass()[1:].max() > 1e-3
    g = client.generate(token_ids=PROMPT, max_new_tokens=STEPS, ignore_eos=True, kv_policy=policy)
    assert [list(d.kept) for d in g.kv_decisions] == [list(d.kept) for d in r.kv_decisions]
    assert [e.kl for e in g.divergence] == pytest.approx(list(r.divergence()["kl"]), abs=1e-6)


def test_a_policy_divergence_matches_two_reference_passes(client, model):
    r = client.stream_attention(token_ids=PROMPT, max_new_tokens=STEPS, ignore_eos=True,
                                kv_policy=dict(kind="snapkv", window_size=4, kernel_size=3, budget=7))
    T, P = len(PROMPT) + STEPS - 1, len(PROMPT)
    evicted = [~r.kept(layer).repeat(2, 0) for layer in range(3)]  # kv head -> its 2 query heads

    def hidden(layer):
        h = np.zeros((4, T, T), bool)
        h[:, P:, :P] = evicted[layer][:, None, :]
        return h

    check_against_hidden(r, model, hidden, STEPS)


def check_against_hidden(r, model, hidden, steps):
    """The run's tokens, KL and lost mass against two float64 passes, one with hidden(layer) masked."""
    P = len(PROMPT)
    seq = PROMPT + r.generated_ids[:-1]
    full_logits, full_att = reference.forward(model, seq)
    int_logits, _ = reference.forward(model, seq, hidden=hidden)
    table, lost = r.divergence(), r.lost_mass()
    for t in range(1, steps + 1):
        row = P - 2 + t
        lf, li = log_softmax(full_logits[row]), log_softmax(int_logits[row])
        assert r.generated_ids[t - 1] == int(np.argmax(li))
        assert table["kl"][t - 1] == pytest.approx(float((np.exp(lf) * (lf - li)).sum()), abs=1e-5)
        want = np.array([(a[:, row, :] * hidden(layer)[:, row, :]).sum(-1) for layer, a in enumerate(full_att)])
        np.testing.assert_allclose(lost[t - 1], want, atol=1e-5)


# The CLIs' spelling of one intervention of each kind and of a policy; the Python client's below.
CLI_FLAGS = ["--knockout=layers=1 heads=0,3 keys=2:5,9:11", "--ablate=layer=2 heads=1 kind=mean",
             "--kv_policy=snapkv window_size=4 kernel_size=3 budget=7"]
PY_KWARGS = dict(knockout=[dict(layers=[1], heads=[0, 3], keys=[(2, 5), (9, 11)])],
                 ablate=[dict(layer=2, heads=[1], kind="mean")],
                 kv_policy=dict(kind="snapkv", window_size=4, kernel_size=3, budget=7))


def test_the_clis_flags_run_what_the_python_client_runs(server, client, model, run_engine, tmp_path):
    """attnscope-run and attnscope-capture take --knockout, --ablate and --kv_policy in one dialect
    with the capture spec: the same run as the Python client's keywords, its divergence in the
    summary, the stored sample's metadata and the line attnscope-capture prints."""
    r = client.stream_attention(token_ids=PROMPT, max_new_tokens=STEPS, ignore_eos=True, **PY_KWARGS)
    kl = list(r.divergence()["kl"])
    assert max(kl) > 1e-4

    local = run_engine(model, PROMPT, max_new=STEPS, out=False, extra=["--ignore_eos", *CLI_FLAGS])
    assert local.tokens == r.generated_ids
    assert local.summary["interventions"]["kv_policy"].startswith("snapkv ")
    assert [d["kl"] for d in local.summary["divergence"]] == pytest.approx(kl, abs=1e-6)
    assert [d["layer"] for d in local.summary["kv_decisions"]] == [0, 1, 2]
    assert sum(d["bytes_freed"] for d in local.summary["kv_decisions"]) == r.bytes_freed() > 0

    ids = ",".join(map(str, PROMPT))
    proc = subprocess.run([binary("attnscope-capture"), f"--server={server.target}", f"--output_dir={tmp_path}",
                           f"--prompt_ids={ids}", f"--max_new_tokens={STEPS}", "--save_attention", "--layers=1",
                           *CLI_FLAGS], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = client.stream_attention(token_ids=PROMPT, max_new_tokens=STEPS, **PY_KWARGS)  # stops at eos, as it does
    kl = list(r.divergence()["kl"])
    assert "Divergence from the unmodified model: mean KL" in proc.stdout
    assert f"/{len(kl)} steps, KV policy frees" in proc.stdout
    stored = attnscope.load(tmp_path / "attention_sample_0.safetensors")
    np.testing.assert_allclose(stored.divergence()["kl"], kl, atol=1e-6)
    np.testing.assert_allclose(stored.lost_mass(), r.lost_mass(), atol=1e-6)
    for layer in range(3):
        assert (stored.kept(layer) == r.kept(layer)).all()
    assert stored.bytes_freed() == r.bytes_freed()
    # The Python client stores the same lists (one metadata schema).
    meta = r.metadata()
    assert [d["kept"] for d in meta["kv_decisions"]] == [d["kept"] for d in stored.metadata["kv_decisions"]]
    assert json.loads(json.dumps(meta["divergence"]))[0].keys() == stored.metadata["divergence"][0].keys()
    for flag in ("--divergence", "--lost-mass", "--kept"):  # the viewer's command line on the stored sample
        png = tmp_path / f"view{flag}.png"
        shown = subprocess.run([sys.executable, "-m", "attnscope.view", str(tmp_path / "attention_sample_0.safetensors"),
                                flag, "--out", str(png)], capture_output=True, text=True, timeout=300,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert shown.returncode == 0 and png.stat().st_size > 5000, shown.stderr

    bad = subprocess.run([binary("attnscope-capture"), f"--server={server.target}", f"--output_dir={tmp_path / 'x'}",
                          f"--prompt_ids={ids}", "--knockout=layers=1 keys=5:3"], capture_output=True, text=True)
    assert bad.returncode != 0 and "knockout keys: '5:3' is empty or negative" in bad.stderr
    lonely = subprocess.run([binary("attnscope-capture"), f"--server={server.target}", f"--output_dir={tmp_path / 'y'}",
                             f"--prompt_ids={ids}", "--reference_leads"], capture_output=True, text=True)
    assert lonely.returncode != 0 and "--reference_leads needs an intervention" in lonely.stderr


@pytest.mark.parametrize("policy", [dict(kind="streaming_llm", n_sink=2, budget=6, decode_interval=2),
                                    dict(kind="h2o", budget=6, recent_size=1, decode_interval=3),
                                    dict(kind="h2o", budget=6, adaptive=True, decode_interval=3)])
def test_decisions_every_n_decode_steps_compact_the_cache_and_match_two_reference_passes(client, model, policy):
    """decode_interval: the policy decides after the prefill and after every N decode steps among
    the keys still held; each decision brings every kv head back to its budget, the evicted keys
    leave the cache (cache_bytes), and the run equals a float64 pass with each decision's evicted
    keys hidden from the rows after it."""
    steps = 8
    r = client.stream_attention(token_ids=PROMPT, max_new_tokens=steps, ignore_eos=True, kv_policy=policy)
    every = policy["decode_interval"]
    want_steps = [0] + list(range(every, steps, every))
    assert sorted({d.step for d in r.kv_decisions}) == want_steps
    P, T = len(PROMPT), len(PROMPT) + steps - 1
    hidden_from = np.full((3, 4, T), T + 1)  # layer, query head, key -> first row hiding it
    for d in r.kv_decisions:
        n = d.kv_heads * d.keys
        kept = np.unpackbits(np.frombuffer(d.kept, np.uint8), bitorder="little")[:n].reshape(d.kv_heads, d.keys)
        # Ada-KV shares the layer's 2 x 6 keys between its heads (the smaller one padded)
        assert (sum(d.kept_per_head) == 12) if policy.get("adaptive") else (list(d.kept_per_head) == [6, 6])
        assert d.cache_bytes < 2 * 2 * 16 * 4 * T  # fewer slots than the full cache's
        row = P if d.step == 0 else P + d.step  # the decision after step s fed position P + s - 1
        ev = np.repeat(~kept.astype(bool), 2, 0)
        cur = hidden_from[d.layer, :, :d.keys]
        hidden_from[d.layer, :, :d.keys] = np.where(ev & (cur > row), row, cur)

    if policy.get("adaptive"):  # heads keep unequal counts: the compacted cache pads the smaller
        assert any(len(set(d.kept_per_head)) > 1 for d in r.kv_decisions)

    def hidden(layer):
        i = np.arange(T)[None, :, None]
        return hidden_from[layer][:, None, :] <= i

    check_against_hidden(r, model, hidden, steps)


def test_decode_interval_is_refused_for_window_policies_and_out_of_range(client):
    for policy, text in [(dict(SNAP, budget=4, decode_interval=2), "decode_interval applies to streaming_llm and h2o"),
                         (dict(kind="h2o", budget=4, decode_interval=2 ** 40), "must be in [1, 1048576]"),
                         (dict(kind="h2o", budget=4, decode_interval=-1), "must be in [1, 1048576]")]:
        with pytest.raises(grpc.RpcError) as e:
            client.stream_attention(token_ids=PROMPT, max_new_tokens=2, kv_policy=policy)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in e.value.details(), e.value.details()


def test_the_viewer_marks_evicted_cells_where_the_intervened_capture_is_zero_and_the_lost_mass_lies(
        client, model, tmp_path):
    """r.evicted(layer, head, rows, cols) from the decisions: the intervened run's weights there are 0,
    and the reference run's (capture_reference) mass there on each step's last row is the server's
    lost mass; every intervention picture draws, the heatmap with its evicted overlay."""
    import matplotlib
    matplotlib.use("Agg")
    from attnscope import view
    steps = 8
    kw = dict(token_ids=PROMPT, max_new_tokens=steps, ignore_eos=True, form="dense",
              kv_policy=dict(kind="h2o", budget=6, recent_size=1, decode_interval=3))
    r = client.stream_attention(**kw)
    ref = client.stream_attention(capture_reference=True, **kw)
    assert ref.generated_ids == r.generated_ids and r.decision_steps() == [0, 3, 6]
    lost, P = r.lost_mass(), len(PROMPT)
    for layer in range(3):
        a, full = r.attention(layer), ref.attention(layer)
        T = a.shape[1]
        for head in range(4):
            gone = r.evicted(layer, head, np.arange(T), np.arange(T))
            assert gone[:P].sum() == 0 and gone[P:].any()
            assert np.all(a[head][gone] == 0)
            for t in range(2, steps + 1):  # step t's logits come from row P + t - 2
                row = P + t - 2
                assert full[head, row][gone[row]].sum() == pytest.approx(float(lost[t - 1, layer, head]), abs=1e-5)
    assert lost[1:].max() > 1e-3
    fig = view.heatmap(ref, 1, 2)
    assert len(fig.axes[0].get_images()) == 2  # the weights and the evicted overlay
    for name, fig in [("heatmap", fig), ("divergence", view.divergence_figure(r)), ("lost", view.lost_mass_map(r, 4)),
                      ("kept", view.kept_figure(r, 1)), ("all", view.intervention_figure(r))]:
        fig.savefig(tmp_path / f"{name}.png", dpi=60)
        assert (tmp_path / f"{name}.png").stat().st_size > 5000
    with pytest.raises(KeyError, match="step 9 is outside"):
        view.lost_mass_map(r, 9)
    plain = client.stream_attention(token_ids=PROMPT, max_new_tokens=2)
    assert not plain.evicted(1, 0, np.arange(4), np.arange(4)).any()
    with pytest.raises(ValueError, match="without interventions"):
        view.divergence_figure(plain)
