"""Every notebook in notebooks/ runs top to bottom on a CPU without an error, and the outputs committed with
it (so that its figures render on the repository page) are the ones it produces now.

notebook_outputs.py says what is compared and why; `python tests/notebook_outputs.py --write` regenerates
the committed outputs after a change (notebooks/README.md).
"""
import os

import pytest

import notebook_outputs   # tests/ is on sys.path, as for hf_reference in conftest.py

NOTEBOOKS = notebook_outputs.NOTEBOOKS
REGENERATE = "python tests/notebook_outputs.py --write"


def _needs_jupyter():
    pytest.importorskip("nbformat", reason="notebook tests need the [test] extra (nbformat)")
    pytest.importorskip("nbclient", reason="notebook tests need the [test] extra (nbclient, ipykernel)")
    pytest.importorskip("ipykernel", reason="notebook tests need the [test] extra (ipykernel)")
    pytest.importorskip("matplotlib", reason="notebook tests need the [test] extra (matplotlib)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom_and_prints_what_is_committed(path):
    _needs_jupyter()
    import nbformat

    executed = notebook_outputs.execute(path)   # raises CellExecutionError, with the cell, on any error
    diff = notebook_outputs.difference(nbformat.read(path, as_version=4), executed)
    assert not diff, (f"{os.path.basename(path)}'s committed outputs are not what it prints now; "
                      f"regenerate them with `{REGENERATE}`:\n{diff}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_committed_notebook_shows_its_figures_and_stays_small(path):
    _needs_jupyter()
    import nbformat

    nb = nbformat.read(path, as_version=4)
    drawn = [c for c in nb.cells if c.cell_type == "code" and "plt.show()" in c.source]
    with_png = [c for c in drawn if any("image/png" in o.get("data", {}) for o in c.outputs)]
    assert drawn and len(with_png) == len(drawn), \
        f"{len(drawn) - len(with_png)} figure cell(s) of {os.path.basename(path)} committed without a PNG"
    size = os.path.getsize(path)
    assert size <= notebook_outputs.MAX_BYTES, \
        f"{os.path.basename(path)} is {size / 1000:.0f} kB, over {notebook_outputs.MAX_BYTES // 1000} kB"


def test_durations_are_masked_and_other_numbers_are_kept():
    masked = notebook_outputs.DURATION.sub("<duration> s", "step 50/300 | loss 0.41 | 12.3 s | 3 shapes | 7 s")
    assert masked == "step 50/300 | loss 0.41 | <duration> s | 3 shapes | <duration> s"


def test_there_are_notebooks_to_run():
    assert NOTEBOOKS, "notebooks/*.ipynb not found"
