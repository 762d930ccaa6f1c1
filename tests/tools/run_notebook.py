"""Executes a notebook headless (nbclient + ipykernel) in a working folder; any cell error fails.

    /usr/bin/python3 tests/tools/run_notebook.py NOTEBOOK WORKDIR [OUT.ipynb]

The kernel inherits the environment (PYTHONPATH, ATTNSCOPE_SERVER); the executed notebook, with
its outputs, is written to OUT (default WORKDIR/<name>)."""
import os
import sys

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def main(path, workdir, out=None):
    nb = nbformat.read(path, as_version=4)
    os.makedirs(workdir, exist_ok=True)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": workdir}})
    out = out or os.path.join(workdir, os.path.basename(path))
    try:
        client.execute()
    except CellExecutionError as e:
        nbformat.write(nb, out)
        print(f"run_notebook: {path} failed (executed copy: {out}):\n{e}", file=sys.stderr)
        return 1
    nbformat.write(nb, out)
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                 if "image/png" in o.get("data", {}))
    print(f"run_notebook: {path}: {len(nb.cells)} cells ran, {images} pictures; executed copy {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
