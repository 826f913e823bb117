"""The notebooks in notebooks/, executed with nbclient against real mkts servers (each notebook starts its own
from `$MKTS_BIN` through notebooks/mkts_server.py). A cell that raises — every notebook asserts its key
results — fails the test. Also: the notebooks are committed without outputs.
"""
from __future__ import annotations

import subprocess
import sys
import time

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO, mkts_bin

NOTEBOOKS = REPO / "notebooks"
EXPECTED = {"quickstart.ipynb", "sql_analytics.ipynb", "migrating_from_pymarketstore.ipynb", "plugins.ipynb"}


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory, monkeypatch_module):
    """A `python3` kernel spec for this interpreter (the venv), with MKTS_BIN in the kernel's environment."""
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("jupyter")
    binary = mkts_bin()
    install(prefix=str(prefix), kernel_name="python3", env={"MKTS_BIN": binary})
    monkeypatch_module.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    monkeypatch_module.setenv("MKTS_BIN", binary)
    return binary


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_the_notebooks_are_there():
    assert {p.name for p in NOTEBOOKS.glob("*.ipynb")} == EXPECTED


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_env, tmp_path):
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(NOTEBOOKS)}})
    t0 = time.monotonic()
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / path.name)  # the executed notebook, outputs included, for a look after a failure
    elapsed = time.monotonic() - t0
    print(f"{path.name}: {elapsed:.1f} s")  # reported, not asserted: timings belong in benches/
    kernel = nb.metadata.get("kernelspec", {}).get("name")
    assert kernel == "python3", kernel


def test_notebooks_are_committed_without_outputs():
    r = subprocess.run([sys.executable, str(NOTEBOOKS / "strip.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
