"""The Triton RMSNorm (run under the interpreter on a CPU) and the torch path's hand-written backward
(`RMSNormFunction`) against the plain-PyTorch reference.

fp32 is compared with the reference directly. For bf16 and fp16 both the kernel and the reference (run in
that dtype) are compared with the reference computed from the same inputs in fp64: the kernel may be off by
no more than a small multiple of the reference's own rounding error.
"""

import pytest
import torch
from helpers import check_output, poisoned_outputs

from smollm.kernels.core import load_triton
from smollm.kernels.rmsnorm import rms_norm, rms_norm_ref

tr = load_triton("rmsnorm")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# a single row (= a length-1 sequence), small, odd widths and row counts, and TinyLlama's width on a few rows
IMPLS = ["triton", "torch"]   # the torch path trains through RMSNormFunction
SHAPES = [(1, 1, 64), (2, 7, 128), (5, 123, 123), (3, 47, 1000), (2, 3, 2048)]


def run(f, x, w, r, dy, ds, **kw):
    "Outputs and gradients of `f` on fresh leaf copies of the inputs: [y, (s,) dx, (dw,) (dr)]."
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, r)]
    x_, w_, r_ = leaves
    out = f(x_, w_, residual=r_, **kw) if r is not None else f(x_, w_, **kw)
    outs = list(out) if r is not None else [out]
    torch.autograd.backward(outs, [dy, ds][:len(outs)])
    return outs + [t.grad for t in leaves if t is not None]


def compare(shape, dtype, weight=True, residual=False, eps=1e-5, impl="triton"):
    dim = shape[-1]
    x = torch.randn(shape, dtype=dtype)
    w = (1 + 0.5 * torch.randn(dim)).to(dtype) if weight else None
    r = torch.randn(shape, dtype=dtype) if residual else None
    dy, ds = torch.randn(shape, dtype=dtype), (torch.randn(shape, dtype=dtype) if residual else None)
    inputs = [t.clone() for t in (x, w, r, dy, ds) if t is not None]
    with poisoned_outputs():
        got = run(rms_norm, x, w, r, dy, ds, eps=eps, impl=impl)
    for before, after in zip(inputs, [t for t in (x, w, r, dy, ds) if t is not None]):
        assert torch.equal(before, after), "the kernel changed an input"
    ref = run(rms_norm_ref, x, w, r, dy, ds, eps=eps)
    up = lambda t: t.double() if t is not None else None
    gold = run(rms_norm_ref, up(x), up(w), up(r), up(dy), up(ds), eps=eps)
    names = ["y"] + (["s"] if residual else []) + ["dx"] + (["dw"] if weight else []) + (["dr"] if residual else [])
    assert len(got) == len(ref) == len(names)
    for name, g, rf, gd in zip(names, got, ref, gold):
        check_output(g, rf, gd, dtype, f"{name} {tuple(shape)} {dtype}", fp32_tol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_weight(shape, dtype, impl):
    compare(shape, dtype, impl=impl)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_no_weight(shape, dtype, impl):
    compare(shape, dtype, weight=False, impl=impl)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_residual(shape, dtype, impl):
    compare(shape, dtype, residual=True, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_residual_no_weight_eps(impl):
    compare((3, 5, 96), torch.float32, weight=False, residual=True, eps=1e-2, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_residual_one_output_used(impl):
    "Only one output feeds the loss: the other's gradient is None inside the backward."
    x, w, r = torch.randn(4, 3, 40), torch.randn(40), torch.randn(4, 3, 40)
    for which in (0, 1):
        got, ref = [], []
        for f, out in ((rms_norm, got), (rms_norm_ref, ref)):
            xs, ws, rs = (t.clone().requires_grad_() for t in (x, w, r))
            kw = {"impl": impl} if f is rms_norm else {}
            (f(xs, ws, residual=rs, **kw)[which] * torch.arange(40.0)).sum().backward()
            out += [xs.grad, ws.grad, rs.grad]
        for g, rf in zip(got, ref):
            if rf is None:
                assert g is None or not g.any()
            else:
                torch.testing.assert_close(g, rf, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_inputs(impl):
    "x a slice of a wider tensor (rows strided), a transposed x (copied), dy from .sum() (stride 0)."
    big = torch.randn(6, 5, 100, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    for view in (lambda t: t[..., 10:74], lambda t: t[..., :64].transpose(0, 1)):
        grads = []
        for f, kw in ((rms_norm, {"impl": impl}), (rms_norm_ref, {})):
            y = f(view(big), w, **kw)
            grads.append((y, *torch.autograd.grad(y.sum(), (big, w))))
        for g, rf in zip(*grads):
            torch.testing.assert_close(g, rf, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_dtypes(impl):
    "bf16 x with an fp32 weight gives an fp32 y, as the reference's type promotion does; bf16 + fp32 residual too."
    x, r, w = torch.randn(3, 50, dtype=torch.bfloat16), torch.randn(3, 50), torch.randn(50)
    y = rms_norm(x, w, impl=impl)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, rms_norm_ref(x, w), atol=1e-2, rtol=1e-2)
    y, s = rms_norm(x, w.bfloat16(), residual=r, impl=impl)
    y_ref, s_ref = rms_norm_ref(x, w.bfloat16(), residual=r)
    assert (y.dtype, s.dtype) == (y_ref.dtype, s_ref.dtype) == (torch.float32, torch.float32)
    torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(s, s_ref)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_fp64(weight, residual, impl):
    x = torch.randn(2, 2, 9, dtype=torch.float64, requires_grad=True)  # small: gradcheck launches per element
    w = torch.randn(9, dtype=torch.float64, requires_grad=True) if weight else None
    r = torch.randn(2, 2, 9, dtype=torch.float64, requires_grad=True)
    if residual:
        f = lambda x, w, r: rms_norm(x, w, residual=r, impl=impl)
        inputs = (x, w, r)
    else:
        f = lambda x, w: rms_norm(x, w, impl=impl)
        inputs = (x, w)
    assert torch.autograd.gradcheck(f, inputs)


def test_empty():
    x = torch.randn(0, 7, 32)
    assert rms_norm(x, torch.ones(32), impl="triton").shape == (0, 7, 32)
    y, s = rms_norm(x, torch.ones(32), residual=x, impl="triton")
    assert y.shape == s.shape == (0, 7, 32)


def test_bad_input():
    with pytest.raises(ValueError, match=r"weight has shape \(7,\); expected \(8,\)"):
        rms_norm(torch.randn(2, 8), torch.ones(7), impl="triton")
    with pytest.raises(ValueError, match=r"residual has shape \(2, 4\)"):
        rms_norm(torch.randn(2, 8), None, residual=torch.randn(2, 4), impl="triton")
    with pytest.raises(ValueError, match=r"last dim of x is 100000; the Triton kernel handles 1\.\.65536"):
        rms_norm(torch.randn(1, 100_000), None, impl="triton")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [dict(), dict(weight=False), dict(residual=True)], ids=["w", "no_w", "res"])
@pytest.mark.parametrize("shape", [(2, 64, 2048), (1, 33, 5000), (4, 100, 64), (1, 2, 32768)], ids=str)
def test_sweep(shape, dtype, case):
    compare(shape, dtype, **case)
