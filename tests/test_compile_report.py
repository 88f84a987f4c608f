"""The fused kernels compile for real GPUs on a machine without one, and fit each target's shared memory.

Triton compiles for sm_80 / sm_89 / sm_90 with its own ptxas (benchmarks/compile_report.py); a kernel
whose tiles need more shared memory than a block may have would fail to launch on that GPU. The quick
test compiles PaliGemma 2's decoder kernels for sm_89 (L4, L40S: the smallest limit, 99 KiB); the whole
matrix (every model's head dim, forward, backward, decode, bf16 and fp16, three targets) is slow.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed: nothing to compile")

from benchmarks.compile_report import markdown  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_report(tmp_path, *args):
    """Rows of `python -m benchmarks.compile_report` (a process of its own: no interpreter there)."""
    out = tmp_path / "report.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compile_report", "--json", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.returncode, json.loads(out.read_text())


def assert_fits(rows):
    assert rows
    for r in rows:
        where = f"{r['kernel']} of {r['model']} ({r['dtype']}) on {r['arch']}"
        assert r["shared"] <= r["shared_limit"], f"{where}: {r['shared']} B of shared memory > {r['shared_limit']}"
        assert r["registers"] is not None and r["registers"] <= 255, f"{where}: no ptxas report"


def test_the_gemma_2_decoder_kernels_compile_for_sm_89_within_its_shared_memory(tmp_path):
    code, rows = compile_report(tmp_path, "--archs", "89", "--dtypes", "bf16", "--kernels", "fwd", "bwd",
                                "--models", "PaliGemma 2 3B/10B decoder")
    assert {r["kernel"] for r in rows} == {"fwd", "bwd_dkdv", "bwd_dq"}
    assert_fits(rows)
    assert code == 0


def test_a_kernel_over_the_shared_memory_limit_is_marked_in_the_table():
    row = dict(model="m", kernel="fwd", arch="sm_89", dtype="bf16", H=256, G=2, softcap=True, warps=8, stages=2,
               registers=255, spill_stores=0, spill_loads=0, shared=106496, shared_limit=101376)
    assert "**over**" in markdown([row])
    assert "**over**" not in markdown([dict(row, shared=98304)])


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("NANOPALI_SLOW"), reason="~10 minutes of compiling: set NANOPALI_SLOW=1")
def test_every_configuration_compiles_for_sm_80_89_90_within_shared_memory(tmp_path):
    code, rows = compile_report(tmp_path)
    assert len(rows) == 3 * 2 * 4 * 5       # targets x dtypes x models x kernels (fwd, dkdv, dq, decode, combine)
    assert_fits(rows)
    assert code == 0
