"""Issue 25, the command lines as a newcomer meets them: --help and --version exit 0 (the version
names the build type and libtorch), every usage line offers only real flags, attnscope-capture
checks every flag before its first request and the model once before its first sample, says when
it falls back to its built-in prompts, ends its progress line, prints "Done!" only when every
sample succeeded (else a summary and exit 1), and a rerun compares each finished file's stored
settings with what it asks (refused, or redone with --recapture_changed)."""
import json
import os
import re
import subprocess

import pytest

from conftest import BUILD, ROOT, binary
from service_fixture import Server, free_port, served, setup_paths

setup_paths(BUILD)
import attnscope  # noqa: E402

PROGRAMS = ("attnscope-capture", "attnscope-server", "attnscope-run")
TRAINED = os.path.join(ROOT, "examples", "tiny_induction")  # has a tokenizer: text prompts work


def run(*args, timeout=120, **kw):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def server(make_checkpoint, tmp_path_factory):
    yield from served(binary("attnscope-server"), make_checkpoint("llama_mha"), tmp_path_factory)


def capture(server, out, *args):
    return run(binary("attnscope-capture"), f"--server={server.target}", f"--output_dir={out}", *args)


@pytest.mark.parametrize("program", PROGRAMS)
def test_help_and_version_exit_0(program):
    p = run(binary(program), "--help")
    assert p.returncode == 0, p.stderr
    assert f"Usage: {program} " in p.stdout and "default:" in p.stdout and "--version" in p.stdout
    assert "--flagfile" not in p.stdout  # Abseil's own flags only with --helpfull
    full = run(binary(program), "--helpfull")
    assert full.returncode == 0 and "--flagfile" in full.stdout
    only = run(binary(program), "--help=element")
    assert only.returncode == 0 and ("--element_type" in only.stdout) == (program != "attnscope-server")
    assert "--max_new_tokens" not in only.stdout
    v = run(binary(program), "--version")
    assert v.returncode == 0, v.stderr
    line = v.stdout.strip()
    assert re.fullmatch(rf"{program} \d+\.\d+\.\d+ \([A-Za-z]+(, -fsanitize=[\w,]+)? build, "
                        r"libtorch \d+\.\d+\S*( \(a torch wheel's\))?\)", line), line
    assert "NDEBUG" not in line


@pytest.mark.parametrize("program", PROGRAMS)
def test_the_usage_line_offers_only_real_flags(program):
    text = run(binary(program), "--help").stdout
    usage = next(line for line in text.splitlines() if line.startswith("Usage: "))
    defined = set(re.findall(r"^    --(\w+) \(", text, re.M))
    offered = set(re.findall(r"--(\w+)", usage))
    assert offered and offered <= defined, offered - defined


def test_every_flag_is_checked_before_the_first_request():
    # Nothing listens on this port: a refusal with exit 2 shows the flag was checked first.
    nowhere = f"--server=127.0.0.1:{free_port()}"
    for bad, words in ((["--form=pooledd"], "--form"), (["--stats=row_entropyy"], "--stats"),
                       (["--kv_policy=snapkvv"], "--kv_policy"), (["--format=hdf5"], "--format"),
                       (["--save_attention", "--rows=9:3"], "--rows")):
        p = run(binary("attnscope-capture"), nowhere, "--prompt_ids=1,2,3", *bad)
        assert p.returncode == 2 and words in p.stderr, (bad, p.returncode, p.stderr)
        assert "cannot reach" not in p.stderr and "Processing" not in p.stdout


def test_capture_flags_without_save_attention_are_named(server, tmp_path):
    p = capture(server, tmp_path, "--prompt_ids=1,2,3", "--max_new_tokens=2", "--form=head_mean",
                "--stats=row_entropy")
    assert p.returncode == 0, p.stderr
    assert "--form, --stats has no effect without --save_attention" in p.stderr
    assert not os.listdir(tmp_path)


def test_a_wrong_model_fails_once_before_any_sample(server, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(3)))
    p = capture(server, tmp_path / "out", f"--dataset={data}", "--model=llama-9000")
    assert p.returncode == 1
    assert p.stderr.count("llama-9000") == 1 and "serves '" in p.stderr, p.stderr
    assert "Processing" not in p.stdout and "Done!" not in p.stdout


def test_done_only_when_every_sample_succeeded(server, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "text needs a tokenizer, which this model lacks"}) + "\n")
    p = capture(server, tmp_path / "out", "--prompt_ids=1,2,3", f"--dataset={data}", "--max_new_tokens=2",
                "--save_attention")
    assert p.returncode == 1
    assert "Done!" not in p.stdout
    assert "Sample 1 failed" in p.stderr and "1 of 2 samples failed (1); 1 stored, 0 skipped" in p.stderr, p.stderr
    assert "Saved attention data for sample 0" in p.stdout


def test_builtin_prompts_are_announced_and_the_progress_line_ends(tmp_path):
    s = Server(binary("attnscope-server"), TRAINED)
    try:
        p = run(binary("attnscope-capture"), f"--server={s.target}", f"--output_dir={tmp_path}", "--max_new_tokens=2")
    finally:
        s.stop()
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("No --prompt, --prompt_file, --prompt_ids or --dataset given: using the 3 built-in")
    assert p.stdout.rstrip().endswith("Done!")


def test_the_progress_line_ends_and_shows_the_estimate(server, tmp_path):
    ids = ",".join(str(1 + i % 100) for i in range(240))
    p = run(binary("attnscope-capture"), f"--server={server.target}", f"--output_dir={tmp_path}", "--save_attention",
            f"--prompt_ids={ids}", "--max_new_tokens=16", "--form=dense", "--progress_s=0")
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stderr.split("\n") if "received" in line]
    assert lines, p.stderr
    assert re.search(r"received [\d.]+ MB of about [\d.]+ MB, \d+ tokens$", lines[-1].split("\r")[-1]), lines[-1]
    assert p.stderr.endswith("\n")  # ended: the next line starts on its own


def test_a_rerun_compares_the_stored_settings(server, tmp_path):
    args = ("--prompt_ids=1,2,3,4", "--max_new_tokens=3", "--save_attention")
    first = capture(server, tmp_path, *args)
    assert first.returncode == 0, first.stderr
    path = tmp_path / "attention_sample_0.safetensors"
    mtime = path.stat().st_mtime_ns
    same = capture(server, tmp_path, *args)
    assert same.returncode == 0 and "Skipping sample 0" in same.stdout and "Done!" in same.stdout
    other = capture(server, tmp_path, *args, "--form=head_mean", "--stats=row_entropy")
    assert other.returncode == 1 and "Done!" not in other.stdout
    assert "capture.form: stored FORM_DENSE, asked FORM_HEAD_MEAN" in other.stderr, other.stderr
    assert "capture.statistics.row_entropy: stored false, asked true" in other.stderr
    assert "--recapture_changed" in other.stderr and path.stat().st_mtime_ns == mtime
    prompt = capture(server, tmp_path, "--prompt_ids=1,2,3,5", "--max_new_tokens=4", "--save_attention")
    assert prompt.returncode == 1 and "prompt_ids: stored [1,2,3,4], asked [1,2,3,5]" in prompt.stderr
    assert "max_new_tokens: stored 3 tokens" in prompt.stderr
    redo = capture(server, tmp_path, *args, "--form=head_mean", "--recapture_changed")
    assert redo.returncode == 0 and "Redoing sample 0: made with other settings" in redo.stdout, redo.stderr
    assert attnscope.load(str(path)).form == "head_mean"
    again = capture(server, tmp_path, *args, "--form=head_mean")
    assert again.returncode == 0 and "Skipping sample 0" in again.stdout
