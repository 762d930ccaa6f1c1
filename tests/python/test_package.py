"""The Python package's layout (issue 22): no import circle (the pictures depend on nothing else in
the package), a missing optional dependency says what is missing while any other ImportError
surfaces, and the blocking and asyncio clients share each RPC."""
import os
import subprocess
import sys

from conftest import BUILD, ROOT

PACKAGE = os.path.join(ROOT, "client", "python")


def run(code, stubs=True):
    path = [PACKAGE] + ([os.path.join(BUILD, "python")] if stubs else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_the_modules_import_top_down():
    # What each module pulls in of the package, imported alone in a fresh interpreter.
    code = ("import sys\n"
            "import attnscope.{0}\n"
            "print(sorted(k for k in sys.modules if k.startswith('attnscope.') and k != 'attnscope.{0}'))")
    allowed = {  # beyond the package's __init__ (sample, results, blocks) and the stubs
        "view": set(),
        "results": set(),
        "sample": {"attnscope.blocks", "attnscope.results"},
    }
    base = {"attnscope.sample", "attnscope.results", "attnscope.blocks", "attnscope.client", "attnscope.shared",
            "attnscope.errors",
            "attnscope.v1", "attnscope.v1.attnscope_pb2", "attnscope.v1.attnscope_pb2_grpc"}
    for module, extra in allowed.items():
        p = run(code.format(module))
        assert p.returncode == 0, p.stderr
        loaded = set(eval(p.stdout.strip()))
        assert loaded <= base | extra, (module, loaded - base - extra)
    # view never imports sample or the client at module level: its source names neither.
    source = open(os.path.join(PACKAGE, "attnscope", "view.py")).read()
    assert "from .sample" not in source and "from attnscope.sample" not in source and "import client" not in source


def test_without_the_stubs_samples_load_and_the_client_says_what_is_missing():
    p = run("import attnscope\nprint(attnscope.load.__name__)\ntry:\n    attnscope.Client\n"
            "except ImportError as e:\n    print('missing:', e)", stubs=False)
    assert p.returncode == 0, p.stderr
    assert "load" in p.stdout and "missing: attnscope.Client needs grpcio, protobuf and the generated stubs" in p.stdout


def test_another_import_error_is_not_swallowed(tmp_path):
    # A broken module inside the package (here: a stub module that raises) must surface as it is.
    broken = tmp_path / "attnscope" / "v1"
    broken.mkdir(parents=True)
    (broken / "attnscope_pb2.py").write_text("import no_such_module_at_all\n")
    (broken / "attnscope_pb2_grpc.py").write_text("")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PACKAGE, str(tmp_path)]))
    p = subprocess.run([sys.executable, "-c", "import attnscope"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode != 0 and "no_such_module_at_all" in p.stderr, p.stderr


def test_the_asyncio_client_defines_only_what_differs():
    p = run("import attnscope\nprint(sorted(k for k in vars(attnscope.AsyncClient) if not k.startswith('__')))")
    assert p.returncode == 0, p.stderr
    own = set(eval(p.stdout.strip()))
    assert own == {"_channels", "_unary", "stream_attention", "stream_many", "close"}, own
