"""Issue 24 on a model with real circuits (examples/tiny_induction, trained by
tools/train_tiny_model.py): the server's induction detector finds an induction head in layer 1;
with the unmodified model leading (it copies the span), ablating that head or knocking out the
first copy from it multiplies the loss on the repeated half by a large factor, while ablating the
layer-1 head the detector scores lowest barely changes it."""
import os

import numpy as np
import pytest

from conftest import BUILD, binary
from service_fixture import serve, setup_paths

setup_paths(BUILD)
import attnscope  # noqa: E402

MODEL = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "tiny_induction")
BOS = 256
SPAN = [int(x) for x in np.random.default_rng(5).integers(32, 127, 31)]  # printable bytes, as trained
PROMPT = [BOS] + SPAN + SPAN[:1]  # the second copy has begun: the model should go on copying


@pytest.fixture(scope="module")
def client():
    yield from serve(binary("attnscope-server"), MODEL)


@pytest.fixture(scope="module")
def heads(client):
    return client.detect_heads(probe_ids=[BOS] + SPAN + SPAN)


def losses(client, **intervention):
    """(full, intervened): mean nats per byte of the rest of the second copy, the full model leading."""
    r = client.stream_attention(token_ids=PROMPT, max_new_tokens=len(SPAN) - 1, ignore_eos=True,
                                reference_leads=True, **intervention)
    assert r.generated_ids == SPAN[1:]  # the unmodified model copies
    table = r.divergence()
    return -table["logprob_full"].mean(), -table["logprob_intervened"].mean()


def test_the_detector_finds_the_induction_and_previous_token_heads(heads):
    induction, previous = np.asarray(heads["induction"]), np.asarray(heads["previous_token"])
    layer, head = np.unravel_index(np.argmax(induction), induction.shape)
    assert layer == 1 and induction[layer, head] > 0.4
    assert induction[0].max() < 0.1  # layer 0 cannot do induction alone
    assert previous[0].max() > 0.4 and previous[1].max() < 0.1  # it feeds layer 1 the previous byte


def test_ablating_the_induction_head_breaks_copying_and_an_unrelated_head_does_not(client, heads):
    induction = np.asarray(heads["induction"])
    top = int(np.argmax(induction[1]))
    low = int(np.argmin(induction[1]))
    full, ablated = losses(client, ablate=[dict(layer=1, heads=[top])])
    assert full < 0.2
    assert ablated > 10 * full
    _, unrelated = losses(client, ablate=[dict(layer=1, heads=[low], kind="zero")])
    assert unrelated < 2 * full
    _, knocked = losses(client, knockout=[dict(layers=[1], heads=[top], keys=[(1, 1 + len(SPAN))],
                                               queries=[(1 + len(SPAN), len(PROMPT) + len(SPAN))])])
    assert knocked > 10 * full
