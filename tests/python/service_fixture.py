"""Starts attnscope-server processes on loopback for tests."""
import os
import re
import urllib.request
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def setup_paths(build):
    for p in (os.path.join(ROOT, "client", "python"), os.path.join(build, "python")):
        if p not in sys.path:
            sys.path.insert(0, p)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(port):
    """The server's Prometheus counters and gauges ({name: value}, unlabelled series)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(attnscope_\w+) (\S+)$", text, re.M)}


class Server:
    """One attnscope-server on a free loopback port. Ready means ready: the constructor returns once
    the server printed "listening on HOST:PORT", which it does only after every listener it was
    asked for (gRPC, metrics) is bound and health says SERVING; it never waits for a time."""

    def __init__(self, binary, model_dir, *args, log_path=None, env=None, timeout=120, preexec_fn=None):
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="attnscope-server-", suffix=".log")
            os.close(fd)
            self._own_log = True
        else:
            self._own_log = False
        self.log_path = log_path
        self.log = open(log_path, "w")
        # Port 0: the kernel picks a free port at bind time, so no other process can take it first.
        self.proc = subprocess.Popen([binary, f"--model_dir={model_dir}", "--listen=127.0.0.1:0", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env=None if env is None else {**os.environ, **env}, preexec_fn=preexec_fn)
        deadline = time.time() + timeout
        while True:
            found = re.search(r"^listening on 127\.0\.0\.1:(\d+)$", self.read_log(), re.M)
            if found:
                self.port = int(found.group(1))
                self.target = f"127.0.0.1:{self.port}"
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.read_log()}")
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"server did not say it listens within {timeout} s: {self.read_log()}")
            time.sleep(0.05)

    def read_log(self):
        if self.log.closed and self._own_log:
            return ""
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if not self.log.closed:
            self.log.close()
            if self._own_log:
                os.unlink(self.log_path)


def serve(server_binary, model_dir, *flags, timeout=120):
    """A server on `model_dir` and a Python client of it, for a module fixture to yield from:
    `yield from serve(binary("attnscope-server"), model, "--max_concurrent=2")`."""
    import attnscope  # setup_paths has run: the caller imported attnscope already

    s = Server(server_binary, model_dir, *flags)
    c = attnscope.Client(s.target, timeout=timeout)
    try:
        yield c
    finally:
        c.close()
        s.stop()


def served(server_binary, model_dir, tmp_path_factory, *flags):
    """A Server on `model_dir` logging into a fresh temporary folder, for a module fixture to yield
    from: `yield from served(binary("attnscope-server"), model, tmp_path_factory)`."""
    s = Server(server_binary, model_dir, *flags, log_path=str(tmp_path_factory.mktemp("log") / "server.log"))
    try:
        yield s
    finally:
        s.stop()
