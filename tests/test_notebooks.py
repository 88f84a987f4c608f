"""Every notebook in notebooks/ runs top to bottom on a CPU without an error, within its time limit."""
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
TIMEOUT_S = 300   # per cell; the notebooks take 6 s and 15 s in all on two CPU cores


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_executes_top_to_bottom(path, tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="notebook tests need the [test] extra (nbformat)")
    nbclient = pytest.importorskip("nbclient", reason="notebook tests need the [test] extra (nbclient, ipykernel)")
    pytest.importorskip("ipykernel", reason="notebook tests need the [test] extra (ipykernel)")
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        f"{os.path.basename(path)} is committed with outputs; clear them (outputs are stripped in git)"
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})   # files it writes go here
    client.execute()


def test_there_are_notebooks_to_run():
    assert NOTEBOOKS, "notebooks/*.ipynb not found"
