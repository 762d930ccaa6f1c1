"""Issue 26, detached jobs: a StreamAttention request submitted as a job runs without its client,
its sample stored by the server and fetched later whole (equal to a streamed capture of the same
request); jobs and results belong to their token (others get NOT_FOUND); results expire; quotas
refuse at submit or before a byte is stored; a full disk fails the job without a partial file; a
restart keeps finished results and fails the interrupted; SIGTERM ends a running job with a
status; and a storm of submissions, polls, cancels and fetches leaves the server correct."""
import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from conftest import BUILD, ROOT, binary
from service_fixture import Server, setup_paths

setup_paths(BUILD)
import attnscope  # noqa: E402
from attnscope.v1 import attnscope_pb2 as pb  # noqa: E402

STORM_SECONDS = float(os.environ.get("ATTNSCOPE_STORM_SECONDS", "20")) / 2
PROMPT = [1, 17, 42, 99, 7, 23, 64, 5, 88, 31, 12, 77]
SPEC = dict(token_ids=PROMPT, max_new_tokens=6, ignore_eos=True, form="dense", row_entropy=True)


@pytest.fixture(scope="module")
def model(make_checkpoint):
    return make_checkpoint("llama31_gqa")  # 3 layers, 4 heads


def start(model, tmp_path, *flags, jobs="jobs", **kw):
    return Server(binary("attnscope-server"), model, f"--jobs_dir={tmp_path / jobs}", *flags,
                  log_path=str(tmp_path / f"server-{time.time_ns()}.log"), **kw)


def tokens_file(tmp_path, *tokens):
    path = tmp_path / "tokens"
    path.write_text("\n".join(tokens) + "\n")
    return f"--auth_tokens_file={path}"


def refused_at_submit(server, code, words):
    with attnscope.Client(server.target) as c:
        with pytest.raises(attnscope.ServerError) as e:
            c.submit(**SPEC)
    assert e.value.code() == code and words in e.value.message, e.value


def same_sample(a, b):
    """Every tensor equal, and the metadata but the timings."""
    assert sorted(a.tensors) == sorted(b.tensors)
    for name in a.tensors:
        np.testing.assert_array_equal(np.asarray(a.tensors[name]), np.asarray(b.tensors[name]), err_msg=name)
    strip = lambda m: {k: v for k, v in m.items() if k != "timings"}  # noqa: E731
    assert strip(a.metadata) == strip(b.metadata)


def test_a_job_outlives_its_client_and_equals_a_streamed_capture(model, tmp_path):
    s = start(model, tmp_path)
    try:
        # A client process that submits, prints the id and is killed at once.
        code = ("import sys, os, signal, attnscope\n"
                f"c = attnscope.Client({s.target!r})\n"
                f"j = c.submit(**{SPEC!r})\n"
                "print(j.id, flush=True)\n"
                "os.kill(os.getpid(), signal.SIGKILL)\n")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "client", "python"),
                                                            os.path.join(BUILD, "python")])}
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        assert p.returncode == -signal.SIGKILL, p.stderr
        job_id = p.stdout.strip()
        with attnscope.Client(s.target) as c:
            job = c.job(job_id)
            job.wait(progress=False, timeout=120)
            info = job.info()
            assert info["status"] == "completed" and info["tokens"] == 6 and info["prompt_tokens"] == len(PROMPT)
            assert info["expires_unix_ms"] > info["finished_unix_ms"] > 0
            fetched = job.result(str(tmp_path / "fetched.safetensors"))
            stored = tmp_path / "jobs" / f"{job_id}.safetensors"
            digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()  # noqa: E731
            assert digest(tmp_path / "fetched.safetensors") == digest(stored)  # byte for byte
            assert info["result_bytes"] == stored.stat().st_size
            streamed = c.stream_attention(**SPEC).to_sample()
            same_sample(fetched, streamed)
            # attnscope-capture's file of the same request: the same tensors and metadata.
            out = tmp_path / "capture"
            cap = subprocess.run([binary("attnscope-capture"), f"--server={s.target}", f"--output_dir={out}",
                                  "--save_attention", "--prompt_ids=" + ",".join(map(str, PROMPT)),
                                  "--max_new_tokens=6", "--stats=row_entropy"], capture_output=True, text=True,
                                 timeout=120)
            assert cap.returncode == 0, cap.stderr
            same_sample(fetched, attnscope.load(str(out / "attention_sample_0.safetensors")))
            # A transfer resumed from an offset carries the rest of the file.
            size = stored.stat().st_size
            tail = b"".join(ch.data for ch in c.stub.FetchResult(pb.FetchResultRequest(job_id=job_id,
                                                                                    offset=size - 100)))
            assert tail == open(stored, "rb").read()[-100:]
            for bad in (-1, size + 1):
                with pytest.raises(grpc.RpcError) as e:
                    list(c.stub.FetchResult(pb.FetchResultRequest(job_id=job_id, offset=bad)))
                assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE
            assert [j.id for j in c.jobs()] == [job_id]
    finally:
        s.stop()
    assert s.proc.returncode == 0, s.read_log()[-3000:]


def test_jobs_belong_to_their_token(model, tmp_path):
    s = start(model, tmp_path, tokens_file(tmp_path, "alice-token", "bob-token"))
    try:
        alice = attnscope.Client(s.target, token="alice-token")
        bob = attnscope.Client(s.target, token="bob-token")
        job = alice.submit(**SPEC).wait(progress=False, timeout=120)
        for call in (lambda: bob.job(job.id), lambda: bob.stub.CancelJob(pb.JobRequest(job_id=job.id),
                                                                        metadata=bob.metadata),
                     lambda: list(bob.stub.FetchResult(pb.FetchResultRequest(job_id=job.id), metadata=bob.metadata))):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value  # not PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as unknown:
            bob.job("0" * 32)
        assert unknown.value.details().replace("0" * 32, job.id) == e.value.details() or \
            unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert bob.jobs() == [] and [j.id for j in alice.jobs()] == [job.id]
        assert alice.job(job.id).status() == "completed"
        with pytest.raises(attnscope.ServerError) as anonymous:
            attnscope.Client(s.target).jobs()
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # The token is not stored; its owner hash is, and survives a restart.
        records = [json.loads(p.read_text()) for p in (tmp_path / "jobs").glob("*.json")]
        assert all("alice-token" not in json.dumps(r) for r in records)
        alice.close()
        bob.close()
    finally:
        s.stop()
    s2 = start(model, tmp_path, tokens_file(tmp_path, "alice-token", "bob-token"))
    try:
        with attnscope.Client(s2.target, token="alice-token") as alice:
            assert alice.job(job.id).result().attention(0).shape[0] == 4
        with attnscope.Client(s2.target, token="bob-token") as bob:
            assert bob.jobs() == []
    finally:
        s2.stop()


def test_a_result_past_its_time_to_live_is_gone(model, tmp_path):
    s = start(model, tmp_path, "--jobs_ttl_s=1")
    try:
        with attnscope.Client(s.target) as c:
            job = c.submit(**SPEC).wait(progress=False, timeout=120)
            stored = tmp_path / "jobs" / f"{job.id}.safetensors"
            assert stored.exists()
            time.sleep(1.5)
            with pytest.raises(attnscope.ServerError) as e:
                c.job(job.id)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert not stored.exists() and not (tmp_path / "jobs" / f"{job.id}.json").exists()
    finally:
        s.stop()


def test_quotas_refuse_at_submit_or_before_anything_is_stored(model, tmp_path):
    s = start(model, tmp_path)
    try:
        with attnscope.Client(s.target) as c:
            a = c.submit(**SPEC).wait(progress=False, timeout=120).info()
            b = c.submit(**SPEC).wait(progress=False, timeout=120).info()
    finally:
        s.stop()
    used = a["result_bytes"] + b["result_bytes"]
    # The two results fill the quota: the next job is refused at submit.
    s = start(model, tmp_path, f"--jobs_token_quota_bytes={used}")
    try:
        refused_at_submit(s, grpc.StatusCode.RESOURCE_EXHAUSTED, "quota")
    finally:
        s.stop()
    # Room for less than the estimate: the job fails before it stores a byte.
    s = start(model, tmp_path, f"--jobs_token_quota_bytes={used + a['estimated_bytes'] // 2}")
    try:
        with attnscope.Client(s.target) as c:
            job = c.submit(**SPEC)
            with pytest.raises(attnscope.ServerError) as e:
                job.wait(progress=False, timeout=120)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert not (tmp_path / "jobs" / f"{job.id}.safetensors").exists()
            assert not list((tmp_path / "jobs").glob("*.partial"))
            with pytest.raises(grpc.RpcError) as fetch:
                list(c.stub.FetchResult(pb.FetchResultRequest(job_id=job.id)))
            assert fetch.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        s.stop()


def test_a_full_disk_fails_the_job_without_a_partial_file(model, tmp_path):
    def small_files():  # writes past 200 kB fail with EFBIG (SIGXFSZ ignored) in the server
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    s = Server(binary("attnscope-server"), model, f"--jobs_dir={tmp_path / 'jobs'}",
               log_path=str(tmp_path / "small.log"), preexec_fn=small_files)
    try:
        with attnscope.Client(s.target) as c:
            job = c.submit(token_ids=PROMPT * 8, max_new_tokens=40, ignore_eos=True, form="dense")
            with pytest.raises(attnscope.ServerError) as e:
                job.wait(progress=False, timeout=120)
            assert e.value.code() != grpc.StatusCode.OK and job.status() == "failed"
            assert not (tmp_path / "jobs" / f"{job.id}.safetensors").exists()
            assert not list((tmp_path / "jobs").glob("*.partial"))
            assert c.submit(**SPEC).wait(progress=False, timeout=120).status() == "completed"  # still serving
    finally:
        s.stop()


def test_a_restart_keeps_finished_results_and_fails_the_interrupted(model, tmp_path):
    s = start(model, tmp_path)
    with attnscope.Client(s.target) as c:
        done = c.submit(**SPEC).wait(progress=False, timeout=120)
        long = c.submit(token_ids=PROMPT, max_new_tokens=1000, ignore_eos=True, row_entropy=True)
        deadline = time.time() + 60
        while long.status() != "running" and time.time() < deadline:
            time.sleep(0.02)
    s.proc.kill()  # no chance to record anything
    s.proc.wait()
    s.stop()
    s = start(model, tmp_path)
    try:
        with attnscope.Client(s.target) as c:
            assert c.job(done.id).status() == "completed"
            same_sample(c.job(done.id).result(), c.stream_attention(**SPEC).to_sample())
            info = c.job(long.id).info()
            assert info["status"] == "failed" and "interrupted" in info["error_message"]
            assert not (tmp_path / "jobs" / f"{long.id}.safetensors").exists()
            assert not list((tmp_path / "jobs").glob("*.partial"))
    finally:
        s.stop()


def test_sigterm_ends_a_running_job_with_a_status_and_no_half_file(model, tmp_path):
    s = start(model, tmp_path)
    with attnscope.Client(s.target) as c:
        job = c.submit(token_ids=PROMPT * 4, max_new_tokens=900, ignore_eos=True, form="dense")
        deadline = time.time() + 60
        while c.job(job.id).info()["tokens"] < 5 and time.time() < deadline:
            time.sleep(0.02)
    s.stop()  # SIGTERM, then waits
    assert s.proc.returncode == 0, s.read_log()[-3000:]
    record = json.loads((tmp_path / "jobs" / f"{job.id}.json").read_text())
    assert record["info"]["status"] == "JOB_FAILED" and "shut down" in record["info"]["error_message"]
    assert not (tmp_path / "jobs" / f"{job.id}.safetensors").exists()
    assert not list((tmp_path / "jobs").glob("*.partial"))


def test_cancel_a_queued_and_a_running_job(model, tmp_path):
    s = start(model, tmp_path, "--max_concurrent=1")
    try:
        with attnscope.Client(s.target) as c:
            running = c.submit(token_ids=PROMPT, max_new_tokens=1000, ignore_eos=True, row_entropy=True)
            queued = c.submit(**SPEC)
            assert queued.info()["queue_position"] in (0, 1)
            assert queued.cancel() == "cancelled"
            deadline = time.time() + 60
            while running.status() != "running" and time.time() < deadline:
                time.sleep(0.02)
            running.cancel()
            with pytest.raises(attnscope.ServerError) as e:
                running.wait(progress=False, timeout=60)
            assert e.value.code() == grpc.StatusCode.CANCELLED and running.status() == "cancelled"
            assert not list((tmp_path / "jobs").glob("*.safetensors"))
    finally:
        s.stop()


def test_without_a_jobs_dir_and_hostile_requests(model, tmp_path):
    s = Server(binary("attnscope-server"), model, log_path=str(tmp_path / "plain.log"))
    try:
        refused_at_submit(s, grpc.StatusCode.FAILED_PRECONDITION, "--jobs_dir")
    finally:
        s.stop()
    s = start(model, tmp_path, "--jobs_per_token=2", "--max_concurrent=1")
    try:
        with attnscope.Client(s.target) as c:
            with pytest.raises(attnscope.ServerError) as e:
                c.job("x" * 100_000)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND and len(e.value.message) < 200
            for bad in (dict(token_ids=[1, 999999]), dict(token_ids=PROMPT, max_new_tokens=-1)):
                job = c.submit(**bad)  # resolved on the scheduler: the job fails with the stream's status
                with pytest.raises(attnscope.ServerError) as failed:
                    job.wait(progress=False, timeout=60)
                assert failed.value.code() in (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.INVALID_ARGUMENT)
            c.submit(token_ids=PROMPT, max_new_tokens=1000, ignore_eos=True)
            c.submit(**SPEC)
            with pytest.raises(attnscope.ServerError) as many:
                c.submit(**SPEC)
            assert many.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "unfinished" in many.value.message
            for j in c.jobs():
                j.cancel()
    finally:
        s.stop()


def test_job_storm_leaves_the_server_correct(model, tmp_path):
    """12 clients submitting, polling with 10-200 ms deadlines, cancelling and fetching (some
    fetches cut off) for a while; then every completed result equals a streamed capture."""
    s = start(model, tmp_path, "--max_queue=256", "--max_concurrent=2", "--jobs_per_token=100000")
    c = attnscope.Client(s.target)
    stop = time.time() + STORM_SECONDS
    ids, lock, counts = [], threading.Lock(), {"calls": 0, "errors": 0}

    def client(seed):
        rng = random.Random(seed)
        while time.time() < stop:
            try:
                r = rng.random()
                if r < 0.3 or not ids:
                    info = c.stub.SubmitJob(c.request(**SPEC), timeout=rng.choice([0.01, 0.2, 30]))
                    with lock:
                        ids.append(info.job_id)
                else:
                    with lock:
                        job_id = rng.choice(ids)
                    if r < 0.55:
                        c.stub.GetJob(pb.JobRequest(job_id=job_id), timeout=rng.choice([0.01, 0.05, 0.2]))
                    elif r < 0.65:
                        c.stub.CancelJob(pb.JobRequest(job_id=job_id), timeout=rng.choice([0.05, 30]))
                    elif r < 0.7:
                        c.stub.ListJobs(pb.ListJobsRequest(), timeout=rng.choice([0.01, 30]))
                    else:
                        stream = c.stub.FetchResult(pb.FetchResultRequest(job_id=job_id, offset=rng.randint(0, 3000)),
                                                    timeout=rng.choice([0.01, 0.05, 30]))
                        for i, _ in enumerate(stream):
                            if rng.random() < 0.3:
                                stream.cancel()
                                break
            except grpc.RpcError as e:
                assert e.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
                                    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
                                    grpc.StatusCode.OUT_OF_RANGE), e
                with lock:
                    counts["errors"] += 1
            with lock:
                counts["calls"] += 1

    try:
        workers = [threading.Thread(target=client, args=(i,)) for i in range(12)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        assert s.proc.poll() is None, s.read_log()[-3000:]
        jobs = c.jobs()
        for job in jobs:  # the backlog the storm left is cancelled, then the queue drains
            if job.status() in ("queued", "running", "received"):
                job.cancel()
        deadline = time.time() + 120
        while any(j.status() in ("queued", "running", "received") for j in jobs) and time.time() < deadline:
            time.sleep(0.1)
        want = c.stream_attention(**SPEC).to_sample()
        checked = 0
        for job in jobs:
            if job.status() == "completed" and checked < 5:
                same_sample(job.result(), want)
                checked += 1
        print(f"job storm: {counts['calls']} calls, {counts['errors']} ended by status, {len(ids)} jobs, "
              f"{checked} results checked")
        assert counts["calls"] > 50 and checked > 0
        assert not list((tmp_path / "jobs").glob("*.partial"))
        c.close()
    finally:
        s.stop()
    assert s.proc.returncode == 0, s.read_log()[-3000:]


def test_capture_detach_and_fetch(model, tmp_path):
    s = start(model, tmp_path)
    try:
        args = [binary("attnscope-capture"), f"--server={s.target}", "--save_attention",
                "--prompt_ids=" + ",".join(map(str, PROMPT)), "--max_new_tokens=6", "--stats=row_entropy"]
        out = tmp_path / "out"
        detach = subprocess.run(args + [f"--output_dir={out}", "--detach"], capture_output=True, text=True,
                                timeout=120)
        assert detach.returncode == 0, detach.stderr
        (line,) = (out / "jobs.txt").read_text().splitlines()
        index, job_id = line.split()
        assert index == "0" and f"Submitted sample 0 as job {job_id}" in detach.stdout
        fetch = subprocess.run(args + [f"--output_dir={out}", "--fetch=all"], capture_output=True, text=True,
                               timeout=120)
        assert fetch.returncode == 0 and "Done!" in fetch.stdout, fetch.stderr
        streamed = subprocess.run(args + [f"--output_dir={tmp_path / 'streamed'}"], capture_output=True, text=True,
                                  timeout=120)
        assert streamed.returncode == 0, streamed.stderr
        same_sample(attnscope.load(str(out / "attention_sample_0.safetensors")),
                    attnscope.load(str(tmp_path / "streamed" / "attention_sample_0.safetensors")))
        again = subprocess.run(args + [f"--output_dir={out}", "--fetch=all"], capture_output=True, text=True,
                               timeout=120)
        assert again.returncode == 0 and "Skipping job" in again.stdout
        bogus = subprocess.run(args + [f"--output_dir={out}", "--fetch=" + "f" * 32], capture_output=True,
                               text=True, timeout=120)
        assert bogus.returncode == 1 and "no job" in bogus.stderr and "Done!" not in bogus.stdout
        both = subprocess.run(args + [f"--output_dir={out}", "--fetch=all", "--detach"], capture_output=True,
                              text=True, timeout=60)
        assert both.returncode == 2 and "--detach" in both.stderr
    finally:
        s.stop()


def test_a_job_id_prefix_names_the_server_and_survives_a_restart(model, tmp_path):
    """Behind a front door with several servers of a model (deploy/gpus.py's Envoy), a job's calls
    are routed by its id's prefix, which the clients send as x-attnscope-job."""
    s = start(model, tmp_path, "--jobs_id_prefix=llama-gpu3")
    try:
        with attnscope.Client(s.target) as c:
            job = c.submit(**SPEC).wait(progress=False, timeout=120)
            assert job.id.startswith("llama-gpu3-") and len(job.id) == len("llama-gpu3-") + 32
            assert ("x-attnscope-job", job.id) in job._metadata
    finally:
        s.stop()
    s = start(model, tmp_path, "--jobs_id_prefix=llama-gpu3")
    try:
        with attnscope.Client(s.target) as c:
            same_sample(c.job(job.id).result(), c.stream_attention(**SPEC).to_sample())
    finally:
        s.stop()
    bad = subprocess.run([binary("attnscope-server"), f"--model_dir={model}", "--listen=127.0.0.1:0",
                          f"--jobs_dir={tmp_path / 'jobs'}", "--jobs_id_prefix=Bad/Name"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0 and "--jobs_id_prefix" in bad.stderr


def test_an_asyncio_clients_jobs_share_one_blocking_client(model, tmp_path):
    import asyncio
    s = start(model, tmp_path)
    try:
        async def go():
            async with attnscope.AsyncClient(s.target) as c:
                first, second = await c.submit(**SPEC), await c.submit(**SPEC)
                return c, first, second
        c, first, second = asyncio.run(go())
        assert first.client is second.client and first.client is c._blocking
        same_sample(first.wait(progress=False, timeout=120).result(), second.wait(progress=False).result())
        first.client.close()
    finally:
        s.stop()
