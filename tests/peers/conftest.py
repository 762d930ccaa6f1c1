"""The peer tests run under the project venv's Python (deploy/python-env.sh: torch and transformers
from PyPI), with the fixtures of tests/python (loaded under another module name: both files are
called conftest)."""
import importlib.util
import os

_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python", "conftest.py")
_spec = importlib.util.spec_from_file_location("attnscope_python_conftest", _path)
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)

run_engine = _conftest.run_engine
make_checkpoint = _conftest.make_checkpoint
pytest_runtest_makereport = _conftest.pytest_runtest_makereport
