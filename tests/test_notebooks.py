"""Every notebook in notebooks/ runs top to bottom without error (its cells assert their claims).

Executed with nbclient on the ``python3`` kernel of this environment (ipykernel), with a
timeout per cell. The kernel is started with XLA's CPU backend optimizations turned down
(``XLA_FLAGS``): the notebooks compile many tiny programs, which then compile about 2.5x
faster, and float64 results stay equal to round-off. Committed notebooks keep no outputs.
"""

import os
import pathlib
import time

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def test_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} >= {"custom_evolution.ipynb", "gradient_verification.ipynb", "rda_operator.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: clear the outputs before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    monkeypatch.setenv("XLA_FLAGS", f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip())
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell (an assert included)
    print(f"{path.name}: {time.perf_counter() - t0:.1f} s")
