"""DetectHeads end to end: the server's head scores against TransformerLens' detect_head
definitions computed here, independently, from the float64 numpy reference attention; the probe it
builds; hostile probes refused with precise statuses."""
import grpc
import numpy as np
import pytest

import reference
from conftest import BUILD, binary
from service_fixture import serve, setup_paths

setup_paths(BUILD)
import attnscope  # noqa: E402
from attnscope.client import HEAD_KINDS  # noqa: E402
from attnscope.v1 import attnscope_pb2 as pb  # noqa: E402

def tl_patterns(tokens):
    """TransformerLens' detection patterns (head_detector.py), as matrices [n, n]."""
    t = np.asarray(tokens)
    n = len(t)
    previous = np.eye(n, k=-1)
    duplicate = (t[None, :] == t[:, None]).astype(float)
    np.fill_diagonal(duplicate, 0)
    duplicate = np.tril(duplicate)
    induction = np.zeros_like(duplicate)
    induction[:, 1:] = duplicate[:, :-1]  # shifted one key to the right
    return dict(previous_token=previous, duplicate_token=duplicate, induction=np.tril(induction))


def tl_scores(attentions, tokens, exclude_bos=False, exclude_current_token=False):
    """{kind: [layers, heads]}: "mul" error measure, Σ p·pattern / Σ p after the exclusions;
    sink: the mean of p(i, 0) over rows i >= 1."""
    patterns = tl_patterns(tokens)
    out = {k: np.zeros((len(attentions), attentions[0].shape[0])) for k in HEAD_KINDS}
    for layer, a in enumerate(attentions):
        for head in range(a.shape[0]):
            p = a[head].copy()
            out["sink"][layer, head] = p[1:, 0].mean()
            if exclude_bos:
                p[:, 0] = 0
            if exclude_current_token:
                np.fill_diagonal(p, 0)
            for k, pattern in patterns.items():
                out[k][layer, head] = (p * pattern).sum() / p.sum()
    return out


@pytest.fixture(scope="module")
def model(make_checkpoint):
    return make_checkpoint("llama31_gqa")


@pytest.fixture(scope="module")
def client(model):
    yield from serve(binary("attnscope-server"), model, "--max_concurrent=2")


def test_default_probe_is_bos_and_a_repeated_random_span(client):
    info = client.model_info()
    r = client.detect_heads(span=20, seed=3)
    ids = r.probe_ids
    assert len(ids) == 41 and ids[0] == 1  # the checkpoint's bos_token_id
    assert ids[1:21] == ids[21:]
    assert not set(ids[1:]) & {1, *info.eos_token_ids} and all(0 <= i < info.vocab_size for i in ids)
    assert client.detect_heads(span=20, seed=3).probe_ids == ids
    assert client.detect_heads(span=20, seed=4).probe_ids != ids
    assert len(client.detect_heads().probe_ids) == 65  # span 32 by default


@pytest.mark.parametrize("exclude_bos,exclude_current_token", [(False, False), (True, False), (False, True),
                                                               (True, True)])
def test_scores_match_transformer_lens_definitions_on_the_reference(client, model, exclude_bos,
                                                                    exclude_current_token):
    r = client.detect_heads(span=15, seed=11, exclude_bos=exclude_bos, exclude_current_token=exclude_current_token)
    _, attentions = reference.forward(model, r.probe_ids)
    want = tl_scores(attentions, r.probe_ids, exclude_bos, exclude_current_token)
    for k in HEAD_KINDS:
        assert r[k].shape == (3, 4)
        np.testing.assert_allclose(r[k], want[k], atol=1e-5, err_msg=k)
    table = r.table()
    assert list(table.columns) == ["layer", "head", *HEAD_KINDS] and len(table) == 12
    assert table.loc[(table["layer"] == 2) & (table["head"] == 3), "induction"].item() == pytest.approx(r["induction"][2, 3])


def test_explicit_probe_with_repeats_everywhere(client, model):
    probe = [5, 9, 5, 9, 9, 7, 5, 9, 7, 7, 5]  # many duplicates per row, and no BOS
    r = client.detect_heads(probe_ids=probe)
    assert r.probe_ids == probe
    _, attentions = reference.forward(model, probe)
    want = tl_scores(attentions, probe)
    for k in HEAD_KINDS:
        np.testing.assert_allclose(r[k], want[k], atol=1e-5, err_msg=k)


BAD = [
    (dict(span=0), grpc.StatusCode.INVALID_ARGUMENT, "span = 0 must be in [1, 512]"),
    (dict(span=513), grpc.StatusCode.INVALID_ARGUMENT, "span = 513"),
    (dict(span=-(2 ** 31)), grpc.StatusCode.INVALID_ARGUMENT, "span"),
    (dict(probe_ids=[7]), grpc.StatusCode.INVALID_ARGUMENT, "probe_ids has 1 ids; a probe has 2 to 1025"),
    (dict(probe_ids=[7] * 1026), grpc.StatusCode.INVALID_ARGUMENT, "1026 ids"),
    (dict(probe_ids=[7] * 200_000), grpc.StatusCode.INVALID_ARGUMENT, "200000 ids"),
    (dict(probe_ids=[7, 160]), grpc.StatusCode.OUT_OF_RANGE, "token id 160 at position 1"),
    (dict(probe_ids=[7, -(2 ** 62)]), grpc.StatusCode.OUT_OF_RANGE, "outside the vocabulary"),
    # The model's context is 1024: a probe must fit it.
    (dict(probe_ids=[7] * 1025), grpc.StatusCode.OUT_OF_RANGE, "the probe has 1025 ids, more than the model's context of 1024"),
    (dict(span=512), grpc.StatusCode.OUT_OF_RANGE, "the probe has 1025 ids"),
    (dict(model="another-model"), grpc.StatusCode.NOT_FOUND, "this server serves"),
]


@pytest.mark.parametrize("kwargs,code,text", BAD)
def test_bad_probes(client, kwargs, code, text):
    with pytest.raises(grpc.RpcError) as e:
        client.detect_heads(**kwargs)
    assert e.value.code() == code and text in e.value.details(), e.value.details()


def test_the_longest_probe_of_identical_ids_is_answered(client):
    r = client.detect_heads(probe_ids=[7] * 1024)  # the worst case of the duplicate lists: n^2 / 2 keys
    assert len(r.probe_ids) == 1024
    # Every earlier key is a duplicate: the duplicate-token score is 1 - the diagonal's mass.
    assert np.all(r["duplicate_token"] <= 1 + 1e-6) and np.all(r["duplicate_token"] > 0)

