"""The capture client and the Python package end to end, against a real server."""
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import reference
from conftest import BUILD, ROOT, binary, need_reference
from service_fixture import Server, setup_paths

setup_paths(BUILD)
import attnscope  # noqa: E402

PROMPT = [1, 17, 42, 99, 7, 23, 64, 5, 88, 31, 12, 77]
NEW = 5


@pytest.fixture(scope="module")
def model(make_checkpoint):
    return make_checkpoint("llama31_gqa")


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    s = Server(binary("attnscope-server"), model, log_path=str(tmp_path_factory.mktemp("log") / "server.log"))
    yield s
    s.stop()


def capture(server, out_dir, *args, check=True):
    proc = subprocess.run([binary("attnscope-capture"), f"--server={server.target}", f"--output_dir={out_dir}",
                           "--save_attention", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def stored(server, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("attention_data")
    ids = ",".join(map(str, PROMPT))
    a = capture(server, out, f"--prompt_ids={ids}", f"--max_new_tokens={NEW}", "--format=safetensors")
    b = capture(server, out, f"--prompt_ids={ids}", f"--max_new_tokens={NEW}", "--format=pickle")
    return out, a.stdout + b.stdout


def test_prints_like_the_prototype(stored):
    _, stdout = stored
    assert f"Processing sample 0, input length: {len(PROMPT)}" in stdout
    assert "Generated: " in stdout
    assert "Saved attention data for sample 0 with 3 layers" in stdout
    assert stdout.strip().endswith("Done!")


def test_both_formats_hold_the_engines_attention(stored, model):
    out, _ = stored
    st = attnscope.load(os.path.join(out, "attention_sample_0.safetensors"))
    pk = attnscope.load(os.path.join(out, "attention_sample_0.pkl"))
    generated = st.metadata["token_ids"]
    assert len(generated) == NEW and st.metadata["prompt_token_ids"] == PROMPT
    _, ref = reference.forward(model, PROMPT + generated[:-1])
    assert st.layers == [0, 1, 2] and pk.layers == [0, 1, 2]
    for layer in range(3):
        np.testing.assert_allclose(st.attention(layer), ref[layer], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(pk.attention(layer), st.attention(layer))


def test_pickle_is_the_prototypes_structure(stored):
    out, _ = stored
    with open(os.path.join(out, "attention_sample_0.pkl"), "rb") as f:
        data = pickle.load(f)  # plain pickle + numpy, nothing of attnscope
    T = len(PROMPT) + NEW - 1
    assert type(data) is dict and list(data) == [0, 1, 2]
    for layer, entry in data.items():
        assert type(layer) is int and set(entry) == {"shape", "tensor"}
        assert entry["shape"] == [1, 4, T, T]
        assert type(entry["tensor"]) is np.ndarray and entry["tensor"].dtype == np.float32
        assert entry["tensor"].shape == (1, 4, T, T)


def test_safetensors_reads_with_plain_numpy_reader(stored):
    out, _ = stored
    sys.path.insert(0, os.path.join(ROOT, "tests", "tools"))
    import stfile
    tensors, meta = stfile.read(os.path.join(out, "attention_sample_0.safetensors"))
    assert "attention.prefill.0.0.0" in tensors and "attention.decode.2.1.12" in tensors and "token_ids" in tensors
    assert tensors["attention.prefill.0.0.0"].shape == (4, len(PROMPT), len(PROMPT))
    assert '"generated_text"' in meta["attnscope"]


def test_rerun_skips_and_overwrite_redoes(server, stored):
    out, _ = stored
    ids = ",".join(map(str, PROMPT))
    again = capture(server, out, f"--prompt_ids={ids}", f"--max_new_tokens={NEW}")
    assert "Skipping sample 0" in again.stdout
    redo = capture(server, out, f"--prompt_ids={ids}", f"--max_new_tokens={NEW}", "--overwrite")
    assert "Saved attention data for sample 0" in redo.stdout


def test_killed_client_leaves_no_complete_looking_file(server, tmp_path):
    out = tmp_path / "data"
    ids = ",".join(map(str, PROMPT * 80))  # 960 tokens: a 47 MB dense capture, killed right after its header
    cmd = [binary("attnscope-capture"), f"--server={server.target}", f"--output_dir={out}", f"--prompt_ids={ids}",
           "--max_new_tokens=60", "--save_attention"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("Processing sample 0")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    names = os.listdir(out)
    assert "attention_sample_0.safetensors" not in names, names
    assert all(n.endswith(".partial") for n in names), names
    done = capture(server, out, f"--prompt_ids={','.join(map(str, PROMPT))}", "--max_new_tokens=3")
    assert "Saved attention data for sample 0" in done.stdout
    assert "attention_sample_0.safetensors" in os.listdir(out)


def test_capture_options_reach_the_server(server, tmp_path):
    ids = ",".join(map(str, PROMPT))
    capture(server, tmp_path, f"--prompt_ids={ids}", "--max_new_tokens=3", "--layers=1", "--heads=0,2",
            "--form=pooled:4", "--element_type=float16", "--stats=row_entropy")
    s = attnscope.load(tmp_path / "attention_sample_0.safetensors")
    names = sorted(s.tensors)
    assert "attention.prefill.1.0.0" in names and not any(n.startswith("layer.") for n in names)
    assert s.tensors["attention.prefill.1.0.0"].shape == (2, 3, 3)
    assert s.tensors["attention.prefill.1.0.0"].dtype == np.float16
    assert any(n.startswith("statistic.row_entropy.prefill.1") for n in names)
    bad = capture(server, tmp_path / "x", f"--prompt_ids={ids}", "--layers=7", check=False)
    assert bad.returncode != 0 and "layer 7 requested" in bad.stderr


def test_a_sample_saved_from_python_equals_one_from_the_cpp_client(server, tmp_path):
    """Issue 22: one metadata schema. The same capture stored by attnscope-capture and by
    StreamResult.save() holds the same metadata (timings aside) and the same tensors."""
    ids = ",".join(map(str, PROMPT))
    capture(server, tmp_path, f"--prompt_ids={ids}", "--max_new_tokens=3", "--layers=1", "--heads=0,2",
            "--form=pooled:4:max", "--element_type=float16", "--stats=row_entropy,sink_mass:2,key_score:4",
            "--rows=last:6", "--phases=prefill,decode")
    from_cpp = attnscope.load(tmp_path / "attention_sample_0.safetensors")
    with attnscope.Client(server.target) as c:
        r = c.stream_attention(token_ids=PROMPT, max_new_tokens=3, layers=[1], heads=[0, 2], form="pooled", pool=4,
                               pool_op="max", element_type="float16", row_entropy=True, sink_mass=2, key_score=4,
                               last_queries=6, phases=("prefill", "decode"))
    from_python = attnscope.load(r.save(str(tmp_path / "python.safetensors")))
    a, b = dict(from_cpp.metadata), dict(from_python.metadata)
    assert a.pop("timings").keys() == b.pop("timings").keys()
    assert a == b
    assert a["format_version"] == 2 and "capture_spec" not in a
    capture_spec = a["capture"]
    assert capture_spec["form"] == "FORM_POOLED" and capture_spec["pool_op"] == "POOL_MAX"
    # int64 values are strings in the proto's JSON mapping
    assert capture_spec["statistics"] == {"row_entropy": True, "sink_mass": "2", "local_mass": "0", "key_score": "4",
                                          "key_score_variance": False}
    assert from_cpp.pool_op == from_python.pool_op == "max" and from_cpp.heads == from_python.heads == [0, 2]
    assert sorted(from_cpp.tensors) == sorted(from_python.tensors)
    for name in from_cpp.tensors:
        np.testing.assert_array_equal(from_cpp.tensors[name], from_python.tensors[name], err_msg=name)


def test_viewer_pngs_differ_between_layers_and_heads(stored, tmp_path):
    out, _ = stored
    sample = os.path.join(out, "attention_sample_0.safetensors")
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "client", "python")}
    images = {}
    for name, args in {"l0h0": ["--layer", "0", "--head", "0"], "l2h0": ["--layer", "2", "--head", "0"],
                       "l0h3": ["--layer", "0", "--head", "3"], "layers": ["--compare-layers", "0,1,2"],
                       "heads": ["--compare-heads", "--layer", "1"]}.items():
        png = tmp_path / f"{name}.png"
        subprocess.run([sys.executable, "-m", "attnscope.view", sample, *args, "--out", str(png)], env=env,
                       check=True, capture_output=True)
        import matplotlib.image as mpimg
        images[name] = mpimg.imread(str(png))
        assert images[name].std() > 0.01, f"{name} is blank"
    assert not np.array_equal(images["l0h0"], images["l2h0"])
    assert not np.array_equal(images["l0h0"], images["l0h3"])
    # --export-pickle writes the prototype's layout from a safetensors sample.
    pk = tmp_path / "export.pkl"
    subprocess.run([sys.executable, "-m", "attnscope.view", sample, "--export-pickle", str(pk)], env=env, check=True)
    with open(pk, "rb") as f:
        assert pickle.load(f)[1]["shape"] == [1, 4, len(PROMPT) + NEW - 1, len(PROMPT) + NEW - 1]


def test_html_page_in_headless_chromium(stored, tmp_path):
    browser = shutil.which("chromium")
    if browser is None:
        need_reference(False, "chromium is not installed (apt-get install chromium)")
    out, _ = stored
    page = tmp_path / "page.html"
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "client", "python")}
    subprocess.run([sys.executable, "-m", "attnscope.view", os.path.join(out, "attention_sample_0.safetensors"),
                    "--html", str(page)], env=env, check=True, capture_output=True)
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
                           "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    T = len(PROMPT) + NEW - 1
    assert f'data-count="{T}"' in dom, dom[:500]
    assert dom.count("<span") >= T
    console_errors = [l for l in proc.stderr.splitlines() if "CONSOLE" in l and ("Error" in l or "Uncaught" in l)]
    assert not console_errors, console_errors


def test_capture_client_small_things(server, tmp_path):
    """Issue 11.12: --format pickle with --max_new_tokens 0 failed every sample; a missing --tls_ca
    was ignored; the output folder was not created recursively. Issue 21.A3: --max_new_tokens 0
    silently generated 16 tokens; it is the prompt only (one forward pass), as in transformers."""
    ids = ",".join(map(str, PROMPT))
    out = tmp_path / "a" / "b" / "c"
    proc = capture(server, out, f"--prompt_ids={ids}", "--max_new_tokens=0", "--format=pickle")
    with open(out / "attention_sample_0.pkl", "rb") as f:
        data = pickle.load(f)
    P = len(PROMPT)
    assert data[0]["shape"] == [1, 4, P, P] and data[0]["tensor"].shape == (1, 4, P, P)
    assert "Generated: \n" in proc.stdout, proc.stdout
    proc = capture(server, tmp_path / "x", f"--prompt_ids={ids}", f"--tls_ca={tmp_path}/missing.pem", check=False)
    assert proc.returncode == 2 and "--tls_ca" in proc.stderr and "missing.pem" in proc.stderr


def test_dataset_lines_of_the_wrong_type_are_a_clear_error(server, tmp_path):
    """Issue 11.9: a --dataset line {"context": 5, "input": "x"} ended in an uncaught JSON exception (abort)."""
    for line, text in [('{"context": 5, "input": "x"}', "must be strings"), ('{"prompt": ["x"]}', "must be a string"),
                       ('[1, 2]', "not a JSON object"), ('{"other": 1}', "needs 'prompt'")]:
        data = tmp_path / "data.jsonl"
        data.write_text('{"prompt": "fine"}\n' + line + "\n")
        proc = capture(server, tmp_path / "out", f"--dataset={data}", check=False)
        assert proc.returncode == 2 and f"{data}:2: " in proc.stderr and text in proc.stderr, (line, proc.stderr)
