"""Sample files are untrusted (shared drives, downloads): loading or viewing one must never run
code, break out of the HTML page, or allocate far beyond what the file holds."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import stfile
from conftest import BUILD, ROOT
from service_fixture import setup_paths

setup_paths(BUILD)
import attnscope  # noqa: E402
from attnscope.sample import SampleError  # noqa: E402
from attnscope.view import html_page  # noqa: E402


class RunsCode:
    """Unpickling this calls os.system: what a crafted .pkl does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def python_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "client", "python"), os.path.join(BUILD, "python")])
    return env


def test_crafted_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "attention_sample_0.pkl"
    with open(path, "wb") as f:
        pickle.dump({0: {"shape": [1, 1, 2, 2], "tensor": RunsCode(marker)}}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load posix.system"):
        attnscope.load(str(path))
    proc = subprocess.run([sys.executable, "-m", "attnscope.view", str(path), "--out", str(tmp_path / "x.png")],
                          capture_output=True, text=True, env=python_env(), timeout=120)
    assert proc.returncode != 0 and "refusing to load" in proc.stderr
    assert not marker.exists()


def test_prototype_pickle_still_loads(tmp_path):
    a = np.tril(np.random.default_rng(0).random((1, 2, 5, 5), dtype=np.float32))
    path = tmp_path / "attention_sample_0.pkl"
    for protocol in (2, 4, 5):
        with open(path, "wb") as f:
            pickle.dump({0: {"shape": list(a.shape), "tensor": a}, 3: {"shape": list(a.shape), "tensor": a}}, f,
                        protocol=protocol)
        s = attnscope.load(str(path))
        assert s.layers == [0, 3]
        np.testing.assert_array_equal(s.attention(3), a[0])


def test_pickle_of_another_layout_is_refused(tmp_path):
    path = tmp_path / "x.pkl"
    with open(path, "wb") as f:
        pickle.dump([1, 2, 3], f)
    with pytest.raises(SampleError):
        attnscope.load(str(path))


def dense_sample(path, pieces, heads=2, extra_meta=None, blocks=None):
    P = len(pieces)
    a = np.tril(np.ones((heads, P, P), np.float32))
    a /= a.sum(-1, keepdims=True)
    meta = {"prompt_token_ids": list(range(P)), "prompt_pieces": pieces, "token_ids": [], "token_pieces": [],
            "capture": {"layers": [0], "form": "FORM_DENSE"}}
    meta.update(extra_meta or {})
    tensors = blocks if blocks is not None else {"attention.prefill.0.0.0": (a, "F32")}
    stfile.write(str(path), tensors, metadata={"attnscope": json.dumps(meta)})


def test_html_page_escapes_token_pieces(tmp_path):
    evil = "</script><script>document.title='pwned'</script>"
    path = tmp_path / "s.safetensors"
    dense_sample(path, ["a", evil, "<!--", "b&c"])
    page = html_page(attnscope.load(str(path)))
    assert page.count("<script>") == 1 and page.count("</script>") == 1
    assert evil not in page and "<!--" not in page
    start = page.index("const D = ") + len("const D = ")
    data = json.loads(page[start:page.index(";\n", start)])
    assert data["tokens"][1] == evil  # the page still shows the piece as text


def test_metadata_cannot_inflate_the_assembled_matrix(tmp_path):
    """Issue 11.12: a 145 kB sample claiming 12,000 tokens drove `view --html` to 4.5 GB."""
    path = tmp_path / "s.safetensors"
    dense_sample(path, ["a", "b"], extra_meta={"prompt_token_ids": list(range(12000))})
    s = attnscope.load(str(path))
    assert s.attention(0).shape == (2, 2, 2)  # from the blocks, not the metadata
    row = np.ones((2, 1, 12001), np.float32)  # one row placed at position 12000: only that row
    dense_sample(path, ["a"], blocks={"attention.prefill.0.0.12000": (row, "F32")})
    s = attnscope.load(str(path))
    assert s.attention(0).shape == (2, 1, 12001) and list(s.positions(0)) == [12000]
    # 3000 one-key rows and one row 200,000 keys wide (1.6 MB of blocks) would assemble to 4.8 GB.
    blocks = {f"attention.decode.0.{i + 1}.{i}": (np.ones((2, 1, 1), np.float32), "F32") for i in range(3000)}
    blocks["attention.decode.0.3001.3000"] = (np.ones((2, 1, 200000), np.float32), "F32")
    dense_sample(path, ["a"], blocks=blocks)
    with pytest.raises(SampleError, match="inconsistent"):
        attnscope.load(str(path)).attention(0)


def raw_safetensors(path, header, data=b""):
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + data)


@pytest.mark.parametrize("header,data,message", [
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, b"\0" * 8, "outside the data"),
    ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "outside the data"),
    ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "does not fill"),
    ({"t": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype 'C64'"),
    ({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "shape"),
    ({"t": {"shape": [1]}}, b"", "lacks dtype"),
    ([1, 2], b"", "not a JSON object"),
])
def test_numpy_reader_refuses_malformed_headers(tmp_path, header, data, message):
    from attnscope.sample import _read_safetensors
    path = tmp_path / "x.safetensors"
    raw_safetensors(path, header, data)
    with pytest.raises(SampleError, match=message):
        _read_safetensors(str(path))


def test_numpy_reader_header_length_past_the_file(tmp_path):
    from attnscope.sample import _read_safetensors
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as f:
        f.write((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(SampleError, match="does not fit"):
        _read_safetensors(str(path))


def test_numpy_reader_reads_bool(tmp_path):
    from attnscope.sample import _read_safetensors
    path = tmp_path / "x.safetensors"
    stfile.write(str(path), {"mask": (np.array([True, False, True]), "BOOL")})
    tensors, _ = _read_safetensors(str(path))
    assert tensors["mask"].tolist() == [True, False, True]
