"""Issue 25, the Python surface a notebook sees: a refused call raises attnscope.ServerError (the
status, the server's message, the RPC and the stream's request id; no gRPC call object or debug
string), stream_many names the input that failed and keeps the finished results (or returns each
input's result or error), ATTNSCOPE_SERVER and ATTNSCOPE_TOKEN are honoured, and the package
builds with pip without grpcio-tools or network (the system's protoc makes the stubs)."""
import asyncio
import glob
import os
import shutil
import subprocess
import sys
import zipfile

import grpc
import pytest

from conftest import BUILD, ROOT, binary
from service_fixture import Server, served, setup_paths

setup_paths(BUILD)
import attnscope  # noqa: E402

GOOD = [1, 5, 9, 13, 17]
BAD = [1, 999999]  # outside the vocabulary (128 ids)


@pytest.fixture(scope="module")
def server(make_checkpoint, tmp_path_factory):
    yield from served(binary("attnscope-server"), make_checkpoint("llama_mha"), tmp_path_factory)


@pytest.fixture(scope="module")
def client(server):
    with attnscope.Client(server.target) as c:
        yield c


def test_a_refused_stream_raises_a_server_error(client):
    with pytest.raises(attnscope.ServerError) as e:
        client.stream_attention(token_ids=BAD, max_new_tokens=2)
    err = e.value
    assert isinstance(err, grpc.RpcError)  # `except grpc.RpcError` keeps working
    assert err.code() == grpc.StatusCode.OUT_OF_RANGE and err.status == "OUT_OF_RANGE"
    assert err.method == "StreamAttention" and "999999" in err.details() and err.details() == err.message
    assert str(err).startswith("OUT_OF_RANGE: token id 999999") and "StreamAttention" in str(err)
    for text in (str(err), repr(err)):
        assert "debug_error_string" not in text and "Rendezvous" not in text
    assert err.__cause__ is None and err.__suppress_context__  # gRPC's call object is not chained
    assert err.request_id is None  # refused before the header


def test_a_unary_call_raises_a_server_error(client):
    with pytest.raises(attnscope.ServerError) as e:
        client.detect_heads(span=1 << 30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.method == "DetectHeads"
    assert "debug_error_string" not in str(e.value)


def test_an_error_after_the_header_names_the_request(make_checkpoint):
    """A deadline that passes mid-stream: the error carries the id the header gave the stream (a
    shorter deadline may pass before the header on a busy machine, a longer one after the end)."""
    s = Server(binary("attnscope-server"), make_checkpoint("llama31_gqa"))  # 1024 positions
    seen = []
    try:
        for timeout in (0.3, 1.0, 3.0, 9.0):
            with attnscope.Client(s.target, timeout=timeout) as c:
                try:
                    c.stream_attention(token_ids=GOOD, max_new_tokens=1000, ignore_eos=True, form="dense")
                except attnscope.ServerError as e:
                    seen.append(e)
                    if e.request_id is not None:
                        break
    finally:
        s.stop()
    assert seen and all(e.code() == grpc.StatusCode.DEADLINE_EXCEEDED for e in seen), seen
    err = seen[-1]
    assert err.request_id and err.request_id.isdigit(), seen
    assert f"request {err.request_id}" in str(err)


def test_stream_many_names_the_failed_input_and_keeps_the_results(client):
    inputs = [GOOD, {"token_ids": BAD, "max_new_tokens": 3}, GOOD[:3]]
    with pytest.raises(attnscope.ServerError) as e:
        client.stream_many(inputs, max_new_tokens=2, progress=False)
    err = e.value
    assert err.input_index == 1 and "input 1" in str(err)
    assert any("input 1 of 3 failed" in n and "999999" in n for n in err.__notes__), err.__notes__
    assert isinstance(err.results[0], attnscope.StreamResult) and err.results[0].generated_ids
    assert err.results[1:] == [None, None]  # the failed one, and the one not run

    out = client.stream_many(inputs, max_new_tokens=2, progress=False, on_error="return")
    assert [type(o).__name__ for o in out] == ["StreamResult", "ServerError", "StreamResult"]
    assert out[1].input_index == 1 and out[1].code() == grpc.StatusCode.OUT_OF_RANGE
    assert len(out[2].generated_ids) == 2
    with pytest.raises(ValueError, match="on_error"):
        client.stream_many(inputs, on_error="ignore")


def test_async_stream_many_the_same(server):
    async def go():
        async with attnscope.AsyncClient(server.target) as c:
            out = await c.stream_many([GOOD, BAD, GOOD], max_new_tokens=2, progress=False, on_error="return")
            with pytest.raises(attnscope.ServerError) as e:
                await c.stream_many([GOOD, BAD], max_new_tokens=2, progress=False)
            with pytest.raises(attnscope.ServerError) as unary:
                await c.detect_heads(span=1 << 30)
            return out, e.value, unary.value
    out, err, unary = asyncio.run(go())
    assert [type(o).__name__ for o in out] == ["StreamResult", "ServerError", "StreamResult"]
    assert out[1].input_index == 1 and err.input_index == 1 and len(err.results) == 2
    assert err.results[1] is None
    assert "debug_error_string" not in str(err) and err.__cause__ is None
    assert unary.method == "DetectHeads" and unary.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_environment_names_the_server_and_the_token(make_checkpoint, tmp_path, monkeypatch):
    tokens = tmp_path / "tokens"
    tokens.write_text("secret-one\n")
    s = Server(binary("attnscope-server"), make_checkpoint("llama_mha"), f"--auth_tokens_file={tokens}")
    try:
        monkeypatch.setenv("ATTNSCOPE_SERVER", s.target)
        monkeypatch.setenv("ATTNSCOPE_TOKEN", "secret-one")
        with attnscope.Client() as c:
            assert c.target == s.target and c.model_info().num_layers > 0

        async def aio():
            async with attnscope.AsyncClient() as c:
                return (await c.model_info()).num_layers
        assert asyncio.run(aio()) > 0
        monkeypatch.setenv("ATTNSCOPE_TOKEN", "wrong")
        with attnscope.Client() as c, pytest.raises(attnscope.ServerError) as e:
            c.model_info()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with attnscope.Client(token="secret-one") as c:  # an argument wins over the environment
            assert c.model_info().num_layers > 0
        # attnscope-capture reads the same two variables.
        capture = [binary("attnscope-capture"), "--prompt_ids=1,2,3", "--max_new_tokens=2",
                   f"--output_dir={tmp_path / 'out'}"]
        for token, ok in (("secret-one", True), ("wrong", False)):
            p = subprocess.run(capture, capture_output=True, text=True, timeout=120,
                               env={**os.environ, "ATTNSCOPE_SERVER": s.target, "ATTNSCOPE_TOKEN": token})
            assert (p.returncode == 0) == ok, p.stdout + p.stderr
            assert ("Generated:" in p.stdout) == ok
            assert ok or "UNAUTHENTICATED" in p.stderr or "token" in p.stderr.lower(), p.stderr
    finally:
        s.stop()
    monkeypatch.delenv("ATTNSCOPE_SERVER")
    assert attnscope.Client().target == "127.0.0.1:50051"


def test_the_package_builds_without_grpcio_tools_or_network(tmp_path):
    """pip's build without isolation (no grpcio-tools, no index) makes the stubs with protoc."""
    if shutil.which("protoc") is None or shutil.which("grpc_python_plugin") is None:
        pytest.fail("protoc and grpc_python_plugin are missing (deploy/install-deps.sh installs them)")
    src = tmp_path / "src"
    shutil.copytree(os.path.join(ROOT, "proto"), src / "proto")
    shutil.copytree(os.path.join(ROOT, "client", "python"), src / "client" / "python",
                    ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                        "-w", str(tmp_path / "wheel"), str(src / "client" / "python")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    (wheel,) = glob.glob(str(tmp_path / "wheel" / "*.whl"))
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    check = ("import attnscope; from attnscope.v1 import attnscope_pb2_grpc; "
             "r = attnscope.Client.request(token_ids=[1, 2], max_new_tokens=1, form='dense'); "
             "print(attnscope.__file__, r.max_new_tokens, attnscope.ServerError.__name__)")
    p = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(str(tmp_path / "site")) and " 1 ServerError" in p.stdout
