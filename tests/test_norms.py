"""RMSNorm against its formula, y = x / sqrt(mean(x^2) + eps) * w, at the eps models use (1e-5, 1e-6) on inputs
whose mean square is about 1e-5: there eps inside the square root and eps outside it differ by 5 to 40%, so a
misplaced eps cannot hide in the tolerance. Every implementation: the `smollm.norms.RMSNorm` module, and the op
`smollm.kernels.rms_norm` in plain PyTorch (with autograd its hand-written backward, `RMSNormFunction`, and the
fused op torch runs without it) and in Triton
(under the interpreter without a GPU); forward and backward.

The last tests plant the bug (eps outside the root) and require the checks to fail.
"""
import pytest
import torch
import torch.func

import smollm.kernels.rmsnorm as rmsnorm_mod
from smollm.kernels import rms_norm
from smollm.norms import RMSNorm

EPS = [1e-5, 1e-6]
SHAPE = (3, 5, 96)


def formula(x, w, eps):
    "The definition, in fp64."
    x, w = x.double(), w.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def eps_outside(x, w, eps, residual=None):
    "The planted bug: x / (sqrt(mean(x^2)) + eps) * w, with the signature of `rms_norm_ref`."
    s = x if residual is None else x + residual
    y = s / (s.float().pow(2).mean(-1, keepdim=True).sqrt() + eps) * w
    return y if residual is None else (y, s)


def small_inputs(seed=0):
    "x (SHAPE) with a mean square near 1e-5, w near 1, and an output gradient."
    g = torch.Generator().manual_seed(seed)
    x = 10 ** -2.5 * torch.randn(SHAPE, generator=g)
    w = 1 + 0.3 * torch.randn(SHAPE[-1], generator=g)
    return x, w, torch.randn(SHAPE, generator=g)


def module(impl):
    "The RMSNorm module running `impl`, with `w` in place of its weight (so that gradients reach `w`)."
    def f(x, w, eps):
        n = RMSNorm(x.shape[-1], eps=eps)
        n.impl = impl
        return torch.func.functional_call(n, {"weight": w}, (x,))
    return f


IMPLS = {
    "module_torch": module("torch"),
    "module_triton": module("triton"),
    "op_torch": lambda x, w, eps: rms_norm(x, w, eps, impl="torch"),
    "op_triton": lambda x, w, eps: rms_norm(x, w, eps, impl="triton"),
}


def check_forward(f, eps):
    x, w, _ = small_inputs()
    assert abs(x.pow(2).mean().item() - 1e-5) < 3e-6   # the regime where eps's place shows
    want = formula(x, w, eps)
    with torch.no_grad():                               # the inference path (torch's fused op for fp32)
        torch.testing.assert_close(f(x, w, eps).double(), want, atol=1e-4, rtol=1e-4)
    y = f(x.clone().requires_grad_(), w, eps)          # the training path (RMSNormFunction on a CPU)
    torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-4)


def check_backward(f, eps):
    x, w, dy = small_inputs()
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    dx, dw = torch.autograd.grad(f(xl, wl, eps), (xl, wl), dy)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    dx_want, dw_want = torch.autograd.grad(formula(x64, w64, eps), (x64, w64), dy.double())
    # dx ~ 1/rms ~ 300: compare relative to its size
    torch.testing.assert_close(dx.double(), dx_want, atol=1e-4 * dx_want.abs().max().item(), rtol=1e-4)
    torch.testing.assert_close(dw.double(), dw_want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("eps", EPS, ids=str)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_rms_norm_forward_matches_formula(impl, eps):
    check_forward(IMPLS[impl], eps)


@pytest.mark.parametrize("eps", EPS, ids=str)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_rms_norm_backward_matches_formula(impl, eps):
    check_backward(IMPLS[impl], eps)


def test_eps_placement_is_measurable():
    "At these inputs the two placements differ by far more than the tolerance, for both values of eps."
    x, w, _ = small_inputs()
    for eps in EPS:
        inside, outside = formula(x, w, eps), eps_outside(x.double(), w.double(), eps)
        assert ((inside - outside).abs() / inside.abs().clamp(min=1e-3)).median() > 0.04


@pytest.mark.parametrize("eps", EPS, ids=str)
@pytest.mark.parametrize("check", [check_forward, check_backward], ids=["forward", "backward"])
def test_eps_outside_the_root_fails(check, eps, monkeypatch):
    """The planted bug, in what the module and the op run on a CPU with autograd (RMSNormFunction, and the reference
    it stands for): the checks fail."""
    monkeypatch.setattr(rmsnorm_mod, "rms_norm_ref", eps_outside)
    monkeypatch.setattr(rmsnorm_mod.RMSNormFunction, "apply", staticmethod(eps_outside))
    for impl in ("module_torch", "op_torch"):
        with pytest.raises(AssertionError):
            check(IMPLS[impl], eps)
    with pytest.raises(AssertionError):
        check(lambda x, w, e: eps_outside(x, w, e), eps)   # and called directly
