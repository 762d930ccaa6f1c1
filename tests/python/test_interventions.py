"""Interventions (issue 24): head ablations and attention knockouts run by the server beside the
unmodified model, checked against an independent computation: two float64 reference passes over the
same tokens (tests/tools/reference.py), one with the knockout's hidden keys masked or the heads
ablated, KL, top-1 agreement, rank and the full model's mass on the hidden keys from their logits
and attention, to 1e-5; the capture of the intervened run; hostile interventions refused with
precise statuses."""
import grpc
import numpy as np
import pytest

import reference
from conftest import BUILD, binary
from service_fixture import serve, setup_paths

setup_paths(BUILD)
import attnscope  # noqa: E402

PROMPT = [1, 17, 42, 99, 5, 63, 120, 8, 77, 31, 150, 64, 12, 88]
STEPS = 6


@pytest.fixture(scope="module")
def model(make_checkpoint):
    return make_checkpoint("llama31_gqa")  # 3 layers, 4 query heads over 2 kv heads


@pytest.fixture(scope="module")
def client(model):
    yield from serve(binary("attnscope-server"), model, "--max_concurrent=2")


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
