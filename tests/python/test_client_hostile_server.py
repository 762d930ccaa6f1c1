"""attnscope-capture against a misbehaving server (a fake one, in this process): every malformed
stream ends in a clear error and exit code 1, never a signal, and no sample file is renamed into
place. Then the same client against a well-behaved fake, so the fake itself is known to be right."""
import os
import subprocess
from concurrent import futures

import grpc
import numpy as np
import pytest

from conftest import BUILD, binary
from service_fixture import setup_paths

setup_paths(BUILD)
from attnscope.v1 import attnscope_pb2 as pb  # noqa: E402
from attnscope.v1 import attnscope_pb2_grpc as pb_grpc  # noqa: E402

P, H, L = 4, 2, 2  # prompt tokens, heads, layers


def header(**capture):
    spec = dict(layers=list(range(L)), heads=list(range(H)), phases=[pb.PHASE_PREFILL, pb.PHASE_DECODE],
                form=pb.FORM_DENSE, element_type=pb.ELEMENT_FLOAT32)
    spec.update(capture)
    return pb.StreamAttentionResponse(header=pb.StreamHeader(
        request_id="1", model=pb.ModelInfo(name="fake", num_layers=L, num_heads=H),
        prompt_token_ids=[1, 2, 3, 4], prompt_pieces=["a", "b", "c", "d"], capture=pb.CaptureSpec(**spec),
        chunk_bytes=1 << 20, max_new_tokens=2))


def dense(layer=0, phase=pb.PHASE_PREFILL, step=0, qb=0, rows=P, keys=P, shape=None, data=None, block_bytes=None,
          byte_offset=0):
    shape = [H, rows, keys] if shape is None else shape
    n = int(np.prod(shape)) if shape else 0
    data = np.full(n, 1.0 / max(keys, 1), "<f4").tobytes() if data is None else data
    return pb.StreamAttentionResponse(attention=pb.AttentionChunk(
        phase=phase, step=step, layer=layer, heads=list(range(H)), query_begin=qb, query_end=qb + rows,
        key_length=keys, form=pb.FORM_DENSE, element_type=pb.ELEMENT_FLOAT32, shape=shape, byte_offset=byte_offset,
        block_bytes=len(data) if block_bytes is None else block_bytes, data=data))


def shared_header():
    h = header()
    h.header.shared_output = True
    return h


def shared(position=0, n=4 * H * P * P, data=b""):
    """An attention chunk that says its values wait in the client's ring."""
    msg = dense(data=b"", block_bytes=4 * H * P * P)
    msg.attention.shared_position = position
    msg.attention.shared_bytes = n
    msg.attention.data = data
    return msg


def token(step, id_):
    return pb.StreamAttentionResponse(token=pb.TokenEvent(step=step, id=id_, piece=f"t{id_}"))


def trailer():
    return pb.StreamAttentionResponse(trailer=pb.StreamTrailer(text="t5t6", token_ids=[5, 6],
                                                               finish_reason=pb.FINISH_LENGTH))


def good_stream():
    out = [header()]
    for layer in range(L):
        out.append(dense(layer))
    out.append(token(1, 5))
    for layer in range(L):
        out.append(dense(layer, pb.PHASE_DECODE, 1, P, rows=1, keys=P + 1))
    out.append(token(2, 6))
    return out + [trailer()]


# name -> the messages a hostile server sends
STREAMS = {
    "shape 1,0,0": [header(), dense(shape=[1, 0, 0], data=b""), trailer()],
    "shape empty": [header(), dense(shape=[], data=b"\0" * 4, block_bytes=4), trailer()],
    "layer not in header": [header(), dense(layer=7), trailer()],
    "attention before header": [dense(), header(), trailer()],
    "statistic before header": [pb.StreamAttentionResponse(statistic=pb.StatisticChunk(
        kind="row_entropy", layer=0, shape=[H, P], block_bytes=H * P * 4, data=b"\0" * (H * P * 4))), trailer()],
    "block_bytes lies": [header(), dense(block_bytes=4 * H * P * P * 10), trailer()],
    "shape lies": [header(), dense(shape=[H, P, P * 1000], data=b"\0" * (4 * H * P * P)), trailer()],
    "truncated block": [header(), dense(data=b"\0" * 16, block_bytes=4 * H * P * P), trailer()],
    "offset past block": [header(), dense(byte_offset=1 << 40), trailer()],
    "huge dimension": [header(), dense(shape=[H, 1 << 40, 1 << 40], data=b""), trailer()],
    "no trailer": good_stream()[:-1],
    "token before header": [token(1, 5), header(), trailer()],
    "second header": [header(), header(), trailer()],
    "header with 0 layers": [pb.StreamAttentionResponse(header=pb.StreamHeader(
        model=pb.ModelInfo(name="fake", num_layers=0, num_heads=0), prompt_token_ids=[1])), trailer()],
    "header layer out of range": [header(layers=[0, 99]), trailer()],
    "row past the sequence": [header(), dense(qb=1 << 30, rows=1), trailer()],
    "statistic kind with a path": [header(), pb.StreamAttentionResponse(statistic=pb.StatisticChunk(
        kind="../../x", layer=0, shape=[H, P], block_bytes=H * P * 4, data=b"\0" * (H * P * 4))), trailer()],
    "statistic shape lies": [header(), pb.StreamAttentionResponse(statistic=pb.StatisticChunk(
        kind="row_entropy", layer=0, shape=[H, P * 1000], block_bytes=H * P * 4, data=b"\0" * (H * P * 4))),
        trailer()],
    "too many tokens": [header()] + [token(i, 5) for i in range(1, 50)] + [trailer()],
    # Same-host output (issue 14): the client checks every announced piece against its ring.
    "shared piece outside the ring": [shared_header(), shared(position=1 << 40), trailer()],
    "shared piece crossing the ring's end": [shared_header(), shared(position=(16 << 20) - 8), trailer()],
    "shared piece larger than the ring": [shared_header(), shared(n=(16 << 20) + 4), trailer()],
    "shared piece going backwards": [shared_header(), shared(position=64), shared(position=0), trailer()],
    "shared piece with bytes on the wire too": [shared_header(), shared(data=b"\0" * 4), trailer()],
    "shared piece on a wire stream": [header(), shared(), trailer()],
}


class Fake(pb_grpc.AttentionServiceServicer):
    stream = []
    seen = []  # (method, metadata dict, request) of each call

    def GetModelInfo(self, request, context):
        Fake.seen.append(("GetModelInfo", dict(context.invocation_metadata()), request))
        return pb.ModelInfo(name="fake", num_layers=L, num_heads=H, device="cpu")

    def StreamAttention(self, request, context):
        Fake.seen.append(("StreamAttention", dict(context.invocation_metadata()), request))
        yield from Fake.stream


@pytest.fixture(scope="module")
def fake():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_AttentionServiceServicer_to_server(Fake(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def run_capture(target, out_dir, *extra):
    return subprocess.run([binary("attnscope-capture"), f"--server={target}", f"--output_dir={out_dir}",
                           "--prompt_ids=1,2,3,4", "--max_new_tokens=2", "--save_attention", *extra],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("fmt", ["safetensors", "pickle"])
@pytest.mark.parametrize("case", sorted(STREAMS))
def test_malformed_stream_is_a_clean_error(fake, tmp_path, case, fmt):
    Fake.stream = STREAMS[case]
    proc = run_capture(fake, tmp_path, f"--format={fmt}")
    assert proc.returncode == 1, (case, proc.returncode, proc.stdout, proc.stderr)  # not a signal, not success
    assert "malformed" in proc.stderr or "trailer" in proc.stderr, proc.stderr
    assert [f for f in os.listdir(tmp_path) if not f.endswith(".partial")] == [], os.listdir(tmp_path)


@pytest.mark.parametrize("fmt", ["safetensors", "pickle"])
def test_well_formed_fake_stream_is_saved(fake, tmp_path, fmt):
    import attnscope
    Fake.stream = good_stream()
    proc = run_capture(fake, tmp_path, f"--format={fmt}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ext = "pkl" if fmt == "pickle" else "safetensors"
    s = attnscope.load(str(tmp_path / f"attention_sample_0.{ext}"))
    a = s.attention(1)
    assert a.shape == (H, P + 1, P + 1)
    np.testing.assert_allclose(a[:, :P, :P], 1.0 / P)
    np.testing.assert_allclose(a[:, P, :], 1.0 / (P + 1))


def test_capture_names_its_model_and_its_ring_to_the_server(fake, tmp_path):
    """Issue 16: a multi-model front door routes by x-attnscope-model, which the client sets from
    --model on every call; issue 14: the stream asks for same-host output with a fresh ring."""
    Fake.stream, Fake.seen = good_stream(), []
    proc = run_capture(fake, tmp_path, "--model=fake")
    assert proc.returncode == 0, proc.stderr
    assert [m for m, _, _ in Fake.seen] == ["GetModelInfo", "StreamAttention"]
    for _, metadata, _ in Fake.seen:
        assert metadata.get("x-attnscope-model") == "fake"
    request = Fake.seen[1][2]
    assert request.shared_output.name.startswith(f"/attnscope-") and len(request.shared_output.key) == 16
    assert request.shared_output.capacity == 16 << 20
    import attnscope
    c = attnscope.Client(fake, model="fake", shared_memory=0)
    Fake.seen = []
    c.stream_attention(token_ids=[1, 2, 3, 4], max_new_tokens=2, form="dense")
    assert Fake.seen[0][1].get("x-attnscope-model") == "fake" and Fake.seen[0][2].model == "fake"
