"""Same-host output through shared memory (issue 14): the same results as the wire from both
clients, the fallback when the server cannot use a region, and careless or hostile clients
(other people's regions, stalled or truncated rings, cancel storms) costing the server nothing."""
import os
import pickle
import random
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest

import stfile
from conftest import BUILD, binary
from service_fixture import Server, free_port, metrics, setup_paths

setup_paths(BUILD)
import attnscope  # noqa: E402
from attnscope import shared  # noqa: E402
from attnscope.v1 import attnscope_pb2 as pb  # noqa: E402

PROMPT = [1, 17, 42, 99, 7, 23, 64, 5, 88, 31, 12, 77]
STORM_SECONDS = float(os.environ.get("ATTNSCOPE_STORM_SECONDS", "20")) / 2

pytestmark = pytest.mark.skipif(not shared.available(), reason="no /dev/shm on this machine")


@pytest.fixture(scope="module")
def model(make_checkpoint):
    return make_checkpoint("llama31_gqa")  # 3 layers, 4 heads


def start(model, tmp_path, *args, name="server.log"):
    mport = free_port()
    s = Server(binary("attnscope-server"), model, f"--metrics_listen=127.0.0.1:{mport}", *args,
               log_path=str(tmp_path / name))
    s.mport = mport
    return s


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    s = start(model, tmp_path_factory.mktemp("log"))
    yield s
    s.stop()


def our_regions():
    return sorted(e for e in os.listdir("/dev/shm") if e.startswith(f"attnscope-{os.getpid()}-"))


@pytest.mark.parametrize("capture", [
    dict(form="dense"),
    dict(form="dense", element_type="float16", row_entropy=True, sink_mass=2),
    dict(form="top_k", capture_top_k=3, element_type="bfloat16"),
    dict(form="pooled", pool=4, last_queries=5),
], ids=["dense", "float16_stats", "top_k", "pooled"])
def test_shared_memory_gives_the_wires_results(server, capture):
    elsewhere = set(our_regions())  # other tests' clients in this process that the GC has not closed yet
    wire = attnscope.Client(server.target, shared_memory=0)
    near = attnscope.Client(server.target, shared_memory=shared.MIN_CAPACITY)  # many laps
    kw = dict(token_ids=PROMPT * 8, max_new_tokens=4, ignore_eos=True, **capture)
    a = wire.stream_attention(**kw)
    b = near.stream_attention(**kw)
    assert not a.shared_output and b.shared_output, near.shared_refused
    assert a.attention.keys() == b.attention.keys() and a.attention
    for k in a.attention:
        np.testing.assert_array_equal(a.attention[k], b.attention[k])
    assert a.indices.keys() == b.indices.keys()
    for k in a.indices:
        np.testing.assert_array_equal(a.indices[k], b.indices[k])
    assert a.statistics.keys() == b.statistics.keys()
    for k in a.statistics:
        np.testing.assert_array_equal(a.statistics[k], b.statistics[k])
    assert a.generated_ids == b.generated_ids and a.tokens == b.tokens
    assert a.trailer.bytes_sent == b.trailer.bytes_sent
    # Attention travelled as places only: no message carries its bytes.
    assert b.max_message_bytes < 4096
    # The ring is reused by the next stream, and removed when the client closes.
    regions = set(our_regions()) - elsewhere
    assert len(regions) == 1
    near.stream_attention(**kw)
    assert set(our_regions()) - elsewhere == regions
    near.close()
    wire.close()
    assert not set(our_regions()) - elsewhere


@pytest.mark.parametrize("fmt", ["safetensors", "pickle"])
def test_capture_client_files_are_identical_either_way(server, tmp_path, fmt):
    before = metrics(server.mport)["attnscope_shared_streams_total"]
    files = []
    for name, flags in (("wire", ["--shared_memory_bytes=0"]), ("shared", ["--shared_memory_bytes=65536"])):
        out = tmp_path / name
        p = subprocess.run([binary("attnscope-capture"), f"--server={server.target}", f"--output_dir={out}",
                            "--prompt_ids=" + ",".join(map(str, PROMPT * 6)), "--max_new_tokens=5",
                            f"--format={fmt}", "--stats=row_entropy", "--save_attention", *flags],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "shared memory" not in p.stderr
        files.append(out / f"attention_sample_0.{'pkl' if fmt == 'pickle' else 'safetensors'}")
    if fmt == "pickle":
        a, b = (pickle.loads(f.read_bytes()) for f in files)
        assert a.keys() == b.keys() and a
        for layer in a:
            assert a[layer]["shape"] == b[layer]["shape"]
            np.testing.assert_array_equal(a[layer]["tensor"], b[layer]["tensor"])
    else:
        (ta, ma), (tb, mb) = (stfile.read(str(f)) for f in files)
        assert ta.keys() == tb.keys() and len(ta) > 10
        for name in ta:
            np.testing.assert_array_equal(ta[name], tb[name])
    assert metrics(server.mport)["attnscope_shared_streams_total"] == before + 1


def test_server_that_cannot_use_the_region_falls_back_to_the_wire(model, tmp_path):
    s = start(model, tmp_path, "--max_shared_bytes=0")
    try:
        c = attnscope.Client(s.target)
        r = c.stream_attention(token_ids=PROMPT, max_new_tokens=2, form="dense")
        assert not r.shared_output and r.attention
        assert "--max_shared_bytes=0" in c.shared_refused
        assert metrics(s.mport)["attnscope_shared_refused_total"] == 1
        # Once refused, the client stops asking.
        c.stream_attention(token_ids=PROMPT, max_new_tokens=2, form="dense")
        assert metrics(s.mport)["attnscope_shared_refused_total"] == 1
        c.close()
        p = subprocess.run([binary("attnscope-capture"), f"--server={s.target}", f"--output_dir={tmp_path / 'o'}",
                            "--prompt_ids=1,2,3", "--max_new_tokens=2", "--save_attention"], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "does not use shared memory" in p.stderr and "--max_shared_bytes=0" in p.stderr
    finally:
        s.stop()


def test_other_peoples_regions_and_bad_names(server):
    c = attnscope.Client(server.target, shared_memory=0)
    victim = shared.SharedRing(shared.MIN_CAPACITY)
    try:
        before = bytes(victim._map[:])
        # Naming someone else's region without its key: refused, nothing written there.
        req = c.request(token_ids=PROMPT, max_new_tokens=2, form="dense")
        req.shared_output.CopyFrom(pb.SharedOutput(name=victim.name, capacity=victim.capacity, key=b"k" * 16))
        msgs = list(c.stub.StreamAttention(req, timeout=60))
        assert not msgs[0].header.shared_output
        assert any(m.attention.data for m in msgs)
        assert bytes(victim._map[:]) == before
        # Issue 21.C12: the refusal says nothing about other people's regions: a wrong key, a wrong
        # size and a name that does not exist read the same to the client; the details are logged.
        refusals = {"wrong key": msgs[0].header.shared_output_refused}
        for what, name, capacity in [("wrong size", victim.name, victim.capacity * 2),
                                     ("no such name", "/attnscope-nobody-has-this-one", victim.capacity)]:
            req.shared_output.CopyFrom(pb.SharedOutput(name=name, capacity=capacity, key=b"k" * 16))
            refusals[what] = list(c.stub.StreamAttention(req, timeout=60))[0].header.shared_output_refused
        assert len(set(refusals.values())) == 1, refusals
        text = refusals["wrong key"]
        assert "could not be used" in text and victim.name not in text and "key does not match" not in text
        log = server.read_log()
        assert f"the key does not match the shared region {victim.name}" in log
        assert "/attnscope-nobody-has-this-one" in log
        for name, key, text in [("/dev/shm/x", b"k" * 16, "/attnscope-"), ("/attnscope-../../etc/passwd", b"k" * 16,
                                "/attnscope-"), (victim.name, b"short", "16 bytes")]:
            req.shared_output.CopyFrom(pb.SharedOutput(name=name, capacity=victim.capacity, key=key))
            with pytest.raises(grpc.RpcError) as e:
                list(c.stub.StreamAttention(req, timeout=60))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in e.value.details()
        # A capacity beyond the server's limit, or not the region's size: the wire.
        req.shared_output.CopyFrom(pb.SharedOutput(name=victim.name, capacity=1 << 40, key=victim.key))
        msgs = list(c.stub.StreamAttention(req, timeout=60))
        assert not msgs[0].header.shared_output and "--max_shared_bytes" in msgs[0].header.shared_output_refused
    finally:
        victim.close()


def test_stalled_and_truncated_rings_cost_the_server_nothing(model, tmp_path):
    s = start(model, tmp_path, "--max_concurrent=1", "--stall_timeout_s=1")
    try:
        c = attnscope.Client(s.target, shared_memory=0)
        big = dict(token_ids=list(range(1, 151)) * 2, max_new_tokens=2, ignore_eos=True, form="dense")
        # A client that asks for shared output and never reads the ring: stopped after the stall
        # timeout, slot freed.
        ring = shared.SharedRing(shared.MIN_CAPACITY)
        req = c.request(**big)
        req.shared_output.CopyFrom(ring.request_field())
        t0 = time.time()
        with pytest.raises(grpc.RpcError) as e:
            list(c.stub.StreamAttention(req, timeout=120))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "shared region" in e.value.details() and time.time() - t0 < 30
        assert metrics(s.mport)["attnscope_stalled_streams_total"] == 1
        ring.close()
        # A client that shrinks its region mid-stream: no SIGBUS, the stream ends, the server serves on.
        ring = shared.SharedRing(shared.MIN_CAPACITY)
        req.shared_output.CopyFrom(ring.request_field())
        call = c.stub.StreamAttention(req, timeout=120)
        assert next(call).header.shared_output
        os.truncate("/dev/shm" + ring.name, 0)
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        # Cut short under the server's writes into its mapping (a SIGBUS absorbed), or seen when
        # it reads the client's position.
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value
        assert "shared region" in e.value.details()
        print("truncated ring:", e.value.details())
        ring.close()
        r = c.stream_attention(token_ids=PROMPT, max_new_tokens=2, form="dense")
        assert r.attention and s.proc.poll() is None
    finally:
        s.stop()
    assert s.proc.returncode == 0, s.read_log()[-3000:]


def test_cancel_storm_with_shared_rings(model, tmp_path):
    """The storm of issue 11.1 with shared output: 8 clients open dense streams into their rings,
    read a few pieces, then cancel, let a short deadline expire, or stop reading the ring."""
    s = start(model, tmp_path, "--max_queue=64", "--stall_timeout_s=2")
    try:
        c = attnscope.Client(s.target, shared_memory=0)
        kw = dict(token_ids=PROMPT * 10, max_new_tokens=8, ignore_eos=True, form="dense")
        before = c.stream_attention(**kw)
        stop = time.time() + STORM_SECONDS
        counts = {"streams": 0}
        lock = threading.Lock()

        def storm(seed):
            rng = random.Random(seed)
            while time.time() < stop:
                ring = shared.SharedRing(shared.MIN_CAPACITY)
                req = c.request(**kw)
                req.shared_output.CopyFrom(ring.request_field())
                call = c.stub.StreamAttention(req, timeout=rng.choice([0.05, 0.2, 30]))
                try:
                    for i, m in enumerate(call):
                        if m.WhichOneof("event") == "attention" and rng.random() < 0.9:
                            ring.take(m.attention)
                        if i >= rng.randint(0, 40):
                            break
                except grpc.RpcError as e:
                    assert e.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
                                        grpc.StatusCode.RESOURCE_EXHAUSTED), e
                except ValueError:
                    pass  # a piece skipped on purpose leaves the next one out of order
                call.cancel()
                ring.close()
                with lock:
                    counts["streams"] += 1

        threads = [threading.Thread(target=storm, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert s.proc.poll() is None, s.read_log()[-3000:]
        near = attnscope.Client(s.target)
        after = near.stream_attention(**kw)
        assert after.shared_output
        for k in before.attention:
            np.testing.assert_array_equal(before.attention[k], after.attention[k])
        near.close()
        print(f"shared storm: {counts['streams']} streams in {STORM_SECONDS:.0f} s")
        assert counts["streams"] > 20
    finally:
        s.stop()
    assert s.proc.returncode == 0, s.read_log()[-3000:]


def test_a_slow_shared_reader_gives_its_slot_up_to_waiting_requests(model, tmp_path):
    """Issue 21.C4: a reader that keeps just inside the stall rule held the only slot for as long as
    it liked while a 1-token Generate waited. Now a same-host stream that has spent more than the
    stall timeout, and most of its time, waiting for its reader while others queue is stopped; with
    nobody waiting it may read as slowly as it likes."""
    import threading
    s = start(model, tmp_path, "--max_concurrent=1", "--stall_timeout_s=1")
    try:
        c = attnscope.Client(s.target, shared_memory=0)

        def slow_stream(prompt_tokens):
            ring = shared.SharedRing(shared.MIN_CAPACITY)
            req = c.request(token_ids=[i % 150 + 1 for i in range(prompt_tokens)], max_new_tokens=2, ignore_eos=True,
                            form="dense")
            req.shared_output.CopyFrom(ring.request_field())
            pieces = 0
            try:
                for msg in c.stub.StreamAttention(req, timeout=300):
                    if msg.HasField("attention"):
                        ring.take(msg.attention)  # a whole piece at a time, well within 1 s
                        pieces += 1
                        time.sleep(0.05)
            finally:
                ring.close()
            return pieces

        assert slow_stream(150) > 8  # alone: slow but never stopped
        done = {}

        def waiting_request():
            deadline = time.time() + 120
            while metrics(s.mport)["attnscope_running_generations"] < 1 and time.time() < deadline:
                time.sleep(0.01)
            done["tokens"] = len(c.generate(token_ids=PROMPT, max_new_tokens=1).token_ids)

        waiter = threading.Thread(target=waiting_request)
        waiter.start()
        with pytest.raises(grpc.RpcError) as e:
            slow_stream(300)
        waiter.join()
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value
        assert "waiting for the client to read, while other requests waited" in e.value.details()
        assert done["tokens"] == 1
    finally:
        s.stop()
