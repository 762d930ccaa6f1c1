"""One vocabulary (issue 22): every name a user types or reads for a statistic comes from the one
table (the proto's Statistic enum, core/capture_spec.h kStatistics), the keywords before 0.2 still
work with a DeprecationWarning, and a notebook's Shift-Tab shows the capture keywords by name."""
import inspect
import os
import subprocess
import sys
import warnings

import pytest

from conftest import BUILD, ROOT, binary
from service_fixture import setup_paths

setup_paths(BUILD)
import attnscope  # noqa: E402
from attnscope import client as cl  # noqa: E402
from attnscope.v1 import attnscope_pb2 as pb  # noqa: E402

NAMES = ["row_entropy", "sink_mass", "local_mass", "key_score", "key_score_variance"]


def test_the_statistic_names_are_the_enum_the_fields_and_the_cli_items():
    assert list(cl.STATISTICS) == NAMES
    assert sorted(f.name for f in pb.Statistics.DESCRIPTOR.fields) == sorted(NAMES)  # field numbers from 0.1
    for name in NAMES:  # same name, same number: the enum value is the field number's sibling
        assert pb.Statistic.Value("STATISTIC_" + name.upper()) == cl.STATISTICS[name]
    for tool in ("attnscope-run", "attnscope-capture"):
        out = subprocess.run([binary(tool), "--help"], capture_output=True, text=True, timeout=60)
        text = out.stdout + out.stderr
        assert "--element_type" in text, tool
        for name in NAMES:
            assert name in text, (tool, name)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "client", "python"), os.path.join(BUILD, "python")]))
    viewer = subprocess.run([sys.executable, "-m", "attnscope.view", "--help"], capture_output=True, text=True,
                            timeout=60, env=env)
    assert viewer.returncode == 0, viewer.stderr
    for name in NAMES:
        assert name in viewer.stdout, ("viewer", name)
    assert "--dtype" in subprocess.run([binary("attnscope-run"), "--help"], capture_output=True, text=True,
                                       timeout=60).stdout  # the compute type, as on the server


def test_the_dialect_python_writes_uses_the_names():
    spec = cl.capture_spec(form="pooled", pool=4, pool_op="max", row_entropy=True, sink_mass=4, local_mass=32,
                           key_score=64, key_score_variance=True, element_type="float16", last_queries=8)
    assert cl.capture_spec_text(spec) == ("pooled:4:max stats=row_entropy,sink_mass:4,local_mass:32,key_score:64,"
                                          "key_score_variance phases=prefill,decode rows=last:8 element_type=float16")


@pytest.mark.parametrize("old,new", [("sink_tokens", "sink_mass"), ("local_window", "local_mass"),
                                     ("key_score_window", "key_score")])
def test_keywords_before_0_2_warn_and_mean_the_same(old, new):
    with pytest.warns(DeprecationWarning, match=f"{old}= is now {new}="):
        spec = attnscope.Client.request(token_ids=[1, 2], **{old: 7})
    assert getattr(spec.capture.statistics, new) == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name is silent
        assert getattr(attnscope.Client.request(token_ids=[1, 2], **{new: 7}).capture.statistics, new) == 7
    with pytest.raises(TypeError, match=f"not both"), pytest.warns(DeprecationWarning):
        cl.capture_spec(**{old: 7, new: 7})


def test_an_unknown_keyword_names_the_statistics():
    with pytest.raises(TypeError, match="row_entropy, sink_mass, local_mass, key_score, key_score_variance"):
        cl.capture_spec(sink=4)


@pytest.mark.parametrize("cls", [attnscope.Client, attnscope.AsyncClient])
@pytest.mark.parametrize("method", ["generate", "stream_attention", "stream_many"])
def test_shift_tab_shows_every_capture_keyword(cls, method):
    params = inspect.signature(getattr(cls, method)).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for name in NAMES + ["form", "layers", "heads", "phases", "last_queries", "element_type", "pool", "pool_op",
                         "capture_top_k", "max_bytes", "prompt", "max_new_tokens"]:
        assert name in params, (method, name)
    for name in cl.STATISTICS:  # a statistic added to the proto's enum must be a keyword too
        assert name in params, (method, name)
    assert params["sink_mass"].default == 0 and params["row_entropy"].default is False
    assert "sink_tokens" not in params  # the deprecated spellings are not advertised
