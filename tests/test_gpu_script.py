"""`bench.py gpu` runs every part and keeps going past a failing one (checked on CPU in its dry run).

The dry run is the GPU script at tiny sizes on CPU with the kernels in Triton's interpreter: every part
(device, self-check, kernel vs reference, attention, decode, quantized decode, a training step) runs,
so the script a lent GPU will run cannot rot between loans.
"""
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before nanopali.kernels is imported (see conftest.py)

import pytest  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed: the fused kernels cannot run")

from benchmarks import gpu, gpu_parts  # noqa: E402
from nanopali import kernels  # noqa: E402

if not kernels.INTERPRETED:
    pytest.skip("nanopali.kernels was imported without TRITON_INTERPRET=1: the dry run needs the interpreter",
                allow_module_level=True)


def test_the_dry_run_runs_every_part_and_writes_one_json_and_one_markdown_table(tmp_path):
    report = gpu.run(list(gpu.PARTS), str(tmp_path), budget_s=600, dry_run=True, isolate=False,
                     log=lambda *a, **k: None)
    failed = {name: p.get("error") for name, p in report["parts"].items() if p["status"] != "ok"}
    assert not failed
    written = json.loads((tmp_path / "gpu.json").read_text())
    assert list(written["parts"]) == list(gpu.PARTS) and written["dry_run"]
    table = (tmp_path / "gpu.md").read_text()
    for name, part in written["parts"].items():
        assert part["results"], f"{name} measured nothing"
        assert f"| {name} | " in table
    kernel_rows = written["parts"]["kernel"]["results"]
    assert all(r["note"].endswith("ok") for r in kernel_rows), kernel_rows


def test_a_failing_part_is_recorded_and_the_next_part_still_runs(tmp_path, monkeypatch):
    def broken(dry_run):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu_parts, "device", broken)
    monkeypatch.setattr(gpu_parts, "selfcheck", lambda dry_run: [dict(what="bf16 H=32", value=1.0, unit="s")])
    report = gpu.run(["device", "selfcheck"], str(tmp_path), budget_s=600, dry_run=True, isolate=False,
                     log=lambda *a, **k: None)
    assert report["parts"]["device"]["status"] == "failed"
    assert "illegal memory access" in report["parts"]["device"]["error"]
    assert report["parts"]["selfcheck"]["status"] == "ok"
    assert "| device | failed after" in (tmp_path / "gpu.md").read_text()


def test_a_part_in_its_own_process_that_cannot_run_comes_back_as_a_failure(tmp_path):
    part = gpu.run_isolated("device", timeout=120)         # no GPU here: the part itself fails, cleanly
    assert part["status"] == "failed" and "Traceback" in part["error"]
