import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "tools"))

import checkpoint  # noqa: E402
import stfile  # noqa: E402

# The client's block naming, loaded on its own: importing the attnscope package here would fix its
# path before the tests add the generated stubs (build/python) to it.
_spec = importlib.util.spec_from_file_location(
    "attnscope_blocks", os.path.join(ROOT, "client", "python", "attnscope", "blocks.py"))
_blocks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_blocks)
parse_block_name = _blocks.parse_block_name

BUILD = os.environ.get("ATTNSCOPE_BUILD_DIR", os.path.join(ROOT, "build"))


def need_reference(present, message):
    """The reference tokenizer data (npm) must be there: skipped on a developer machine without it,
    a failure under CI=true, so that CI cannot pass without the oracle ever running."""
    if present:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {message}")
    pytest.skip(message)


def binary(name):
    for sub in ("tools", "server", "client/cpp", "bench", ""):
        path = os.path.join(BUILD, sub, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{name} not built under {BUILD}")


class Run:
    """One attnscope-run invocation and what it stored."""

    def __init__(self, summary, tensors):
        self.summary = summary
        self.t = tensors
        self.tokens = list(summary["tokens"])
        self.prompt = [int(i) for i in tensors["prompt"]] if "prompt" in tensors else None

    def blocks(self, kind, phase, layer):
        """{(step, query_begin): array} for attention ("attention") or a statistic (its kind)."""
        out = {}
        stat = None if kind == "attention" else kind
        for name, arr in self.t.items():
            parsed = parse_block_name(name)
            if parsed is None or parsed[1]:
                continue
            key = parsed[0]
            if key.stat == stat and key.phase == phase and key.layer == layer:
                out[(key.step, key.query_begin)] = arr
        return out

    def full_attention(self, layer, num_heads):
        """Prefill blocks and decode rows assembled into [heads, T, T] over prompt + tokens[:-1]."""
        P = len(self.prompt)
        T = P + len(self.tokens) - 1
        a = np.full((num_heads, T, T), np.nan)
        for (step, qb), blk in self.blocks("attention", "prefill", layer).items():
            a[:, qb:qb + blk.shape[1], :P] = blk
        for (step, qb), blk in self.blocks("attention", "decode", layer).items():
            assert qb == P + step - 1, (qb, P, step)
            a[:, qb, :blk.shape[2]] = blk[:, 0]
        for r in range(T):
            a[:, r, r + 1:] = np.where(np.isnan(a[:, r, r + 1:]), 0.0, a[:, r, r + 1:])
        return a


@pytest.fixture(scope="session")
def run_engine(tmp_path_factory):
    def run(model_dir, prompt, max_new=6, out=True, extra=()):
        out_path = str(tmp_path_factory.mktemp("run") / "out.safetensors") if out else ""
        cmd = [binary("attnscope-run"), f"--model_dir={model_dir}", "--prompt_ids=" + ",".join(map(str, prompt)),
               f"--max_new_tokens={max_new}", f"--out={out_path}", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        tensors = stfile.read(out_path)[0] if out else {}
        return Run(summary, tensors)
    return run


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    cache = {}

    def make(variant, seed=0, shards=1):
        key = (variant, seed, shards)
        if key not in cache:
            d = str(tmp_path_factory.mktemp(variant))
            cache[key] = checkpoint.make(variant, d, seed=seed, shards=shards)
        return cache[key]
    return make


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true no test may skip, whatever called pytest.skip: a skip there is a failure that
    says why, so that CI cannot pass with a check that never ran."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"CI=true and the test skipped: {report.longrepr}"
