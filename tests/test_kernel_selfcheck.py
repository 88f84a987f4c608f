"""The fused kernel checks itself before attn_impl="auto" runs it, and a failing kernel is never used.

A GPU is simulated on CPU: "auto" is made to resolve to the kernel as it does on CUDA, the kernel runs
in Triton's interpreter, and the failures a GPU could show (a compile error, a wrong output, a wrong
gradient, an ignored window or soft-cap) are injected by replacing the kernel the check calls.
"""
import os
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")   # before nanopali.kernels is imported (see conftest.py)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed: the fused kernels cannot run")
from triton.runtime.errors import OutOfResources  # noqa: E402

import nanopali.attention as dispatch  # noqa: E402
from nanopali import kernels  # noqa: E402
from nanopali.kernels import dispatch as kernel_policy  # noqa: E402
from nanopali.kernels import selfcheck  # noqa: E402
from nanopali.masking import PrefixLMMask  # noqa: E402

# Letters: B batch, N query heads, K key/value heads, T queries, S keys, H head dim.

DEVICE = torch.device("cpu" if kernels.INTERPRETED else "cuda")
REAL_KERNEL = kernels.flash_attention


@pytest.fixture(autouse=True)
def auto_picks_the_kernel(monkeypatch):
    """"auto" considers the kernel on this device as on a CUDA machine; every test starts with no verdict."""
    monkeypatch.setattr(dispatch, "FUSED_DEVICES", ("cuda", DEVICE.type))
    monkeypatch.delenv(selfcheck.ENV, raising=False)
    selfcheck.VERDICTS.clear()
    yield
    selfcheck.VERDICTS.clear()


def inputs(H=16, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 24, H, generator=g).to(DEVICE, dtype)
    k, v = (torch.randn(2, 2, 24, H, generator=g).to(DEVICE, dtype) for _ in range(2))
    return q, k, v, PrefixLMMask(torch.tensor([0, 3], device=DEVICE), torch.tensor([16, 9], device=DEVICE), 24)


def auto(q, k, v, mask, softcap):
    return dispatch.attention(q, k, v, mask, scale=0.25, softcap=softcap, window=6, impl="auto")


def explicit(impl, q, k, v, mask, softcap):
    return dispatch.attention(q, k, v, mask, scale=0.25, softcap=softcap, window=6, impl=impl)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times 1.1: a kernel whose outputs are right and whose dk is wrong."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return 1.1 * g


BROKEN = {
    "wrong output": lambda q, k, v, *a, **kw: 1.05 * REAL_KERNEL(q, k, v, *a, **kw),
    "wrong dk": lambda q, k, v, *a, **kw: REAL_KERNEL(q, _ScaleGrad.apply(k), v, *a, **kw),
    "ignores the window": lambda *a, window, **kw: REAL_KERNEL(*a, window=None, **kw),
    "ignores the soft-cap": lambda *a, softcap, **kw: REAL_KERNEL(*a, softcap=None, **kw),
    "ignores left pads": lambda q, k, v, start, prefix_end, **kw: REAL_KERNEL(q, k, v, 0 * start, prefix_end, **kw),
}


def test_a_kernel_that_agrees_is_checked_once_per_head_dim_and_then_runs_for_auto(monkeypatch):
    calls = []
    monkeypatch.setattr(selfcheck, "disagreement", lambda *a: calls.append(a) or None)
    q, k, v, mask = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            assert torch.equal(auto(q, k, v, mask, 50.0), explicit("triton", q, k, v, mask, 50.0))
        auto(*inputs(H=32), None)
    assert [(a[1], a[2]) for a in calls] == [(torch.bfloat16, 16), (torch.bfloat16, 32)]


def test_fp32_under_auto_takes_the_exact_path_without_a_check(monkeypatch):
    monkeypatch.setattr(selfcheck, "disagreement", lambda *a: pytest.fail("the check ran"))
    q, k, v, mask = inputs(dtype=torch.float32)
    assert torch.equal(auto(q, k, v, mask, 50.0), explicit("reference", q, k, v, mask, 50.0))
    assert torch.equal(auto(q, k, v, mask, None), explicit("sdpa", q, k, v, mask, None))


def test_the_real_kernel_passes_its_own_check():
    assert selfcheck.disagreement(DEVICE, torch.float32, 16) is None


@pytest.mark.parametrize("fault", list(BROKEN))
def test_the_check_catches_a_kernel_that_is_wrong_in_one_way(monkeypatch, fault):
    monkeypatch.setattr(kernels, "flash_attention", BROKEN[fault])
    assert selfcheck.disagreement(DEVICE, torch.float32, 16) is not None


@pytest.mark.parametrize("softcap, fallback", [(50.0, "reference"), (None, "sdpa")])
def test_a_disagreeing_kernel_is_replaced_by_the_exact_path_with_one_warning(monkeypatch, softcap, fallback):
    monkeypatch.setattr(kernels, "flash_attention", BROKEN["wrong dk"])
    q, k, v, mask = inputs()
    with pytest.warns(RuntimeWarning) as caught:
        outs = [auto(q, k, v, mask, softcap) for _ in range(3)]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "disagrees with reference_attention: dk" in message and "report" in message
    assert "head dim 16" in message and selfcheck.ENV in message
    want = explicit(fallback, q, k, v, mask, softcap)
    assert all(torch.equal(o, want) for o in outs)


def test_a_kernel_that_fails_to_compile_is_replaced_by_sdpa_and_the_error_is_named(monkeypatch):
    def out_of_shared_memory(*args, **kwargs):
        raise OutOfResources(163840, 101376, "shared memory")

    monkeypatch.setattr(kernels, "flash_attention", out_of_shared_memory)
    q, k, v, mask = inputs()
    with pytest.warns(RuntimeWarning, match="failed to compile or run \\(OutOfResources: out of resource: shared"):
        got = auto(q, k, v, mask, None)
    assert torch.equal(got, explicit("sdpa", q, k, v, mask, None))


def test_forcing_on_skips_the_check_and_forcing_off_never_runs_the_kernel(monkeypatch):
    monkeypatch.setattr(selfcheck, "disagreement", lambda *a: pytest.fail("the check ran"))
    q, k, v, mask = inputs()
    monkeypatch.setenv(selfcheck.ENV, "on")
    assert torch.equal(auto(q, k, v, mask, 50.0), explicit("triton", q, k, v, mask, 50.0))
    monkeypatch.setattr(kernels, "flash_attention", lambda *a, **kw: pytest.fail("the kernel ran"))
    monkeypatch.setenv(selfcheck.ENV, "off")
    assert torch.equal(auto(q, k, v, mask, 50.0), explicit("reference", q, k, v, mask, 50.0))


def test_forcing_off_keeps_auto_off_the_kernel_on_cuda(monkeypatch):
    monkeypatch.undo()                      # the real choice, as on a CUDA machine with triton
    monkeypatch.setattr(kernel_policy, "is_supported", lambda device: True)
    monkeypatch.setattr(kernel_policy, "passes", lambda *a: True)   # a kernel that passed its self-check
    cuda = torch.device("cuda")
    assert dispatch.choose("auto", cuda, torch.bfloat16, 16, 2, None) == "triton"
    monkeypatch.setenv(selfcheck.ENV, "off")
    assert dispatch.choose("auto", cuda, torch.bfloat16, 16, 2, None) == "sdpa"
    assert dispatch.choose("auto", cuda, torch.bfloat16, 16, 2, 50.0) == "reference"


def test_an_unknown_forcing_value_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(selfcheck.ENV, "yes")
    with pytest.raises(ValueError, match="NANOPALI_FUSED_ATTENTION='yes': expected one of check, on, off"):
        auto(*inputs(), None)
