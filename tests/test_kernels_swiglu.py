"""The Triton SwiGLU (run under the interpreter on a CPU) against the plain-PyTorch reference.

fp32 is compared with the reference directly. For bf16 and fp16 both the kernel and the reference (run in
that dtype) are compared with the reference computed from the same inputs in fp64: the kernel may be off by
no more than a small multiple of the reference's own rounding error, plus an ulp or two.
"""

import pytest
import torch
from helpers import check_output, poisoned_outputs

from smollm.kernels.core import load_triton
from smollm.kernels.swiglu import swiglu, swiglu_ref

tr = load_triton("swiglu")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# a single row (= a length-1 sequence), odd sizes, and TinyLlama's hidden width (5632) on a few rows
SHAPES = [(1, 1, 64), (2, 7, 128), (5, 123, 123), (3, 47, 1000), (1, 3, 5632)]
# how gate and up are laid out: separate tensors, the halves of one fused projection (strided rows), a
# strided gate with a contiguous up (different row strides), or transposed views whose dims cannot merge
# into rows (copied first)
LAYOUTS = ["contiguous", "chunks", "mixed", "transposed"]


def make(shape, dtype, layout):
    "Leaf tensors holding gate and up, and a function of them returning the (gate, up) views."
    if layout == "contiguous":
        return [torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)], lambda g, u: (g, u)
    if layout == "chunks":
        return [torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype)], lambda gu: gu.chunk(2, -1)
    if layout == "mixed":
        n = shape[-1]
        return [torch.randn(*shape[:-1], 3 * n, dtype=dtype), torch.randn(shape, dtype=dtype)], lambda g, u: (g[..., n:2 * n], u)
    t = (shape[1], shape[0], shape[2])
    return [torch.randn(t, dtype=dtype), torch.randn(t, dtype=dtype)], lambda g, u: (g.transpose(0, 1), u.transpose(0, 1))


def run(f, leaves, views, dh, **kw):
    "Output and the gradients of the leaves holding gate and up."
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    h = f(*views(*leaves), **kw)
    h.backward(dh)
    return [h] + [t.grad for t in leaves]


# every layout in bf16; the two common ones (separate tensors, a fused projection's halves) in every dtype
CASES = [(d, lay) for d in DTYPES for lay in LAYOUTS if d == torch.bfloat16 or lay in ("contiguous", "chunks")]


@pytest.mark.parametrize("dtype,layout", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_swiglu(shape, dtype, layout):
    leaves, views = make(shape, dtype, layout)
    dh = torch.randn(shape, dtype=dtype)
    before = [t.clone() for t in leaves + [dh]]
    with poisoned_outputs():
        got = run(swiglu, leaves, views, dh, impl="triton")
    assert all(torch.equal(a, b) for a, b in zip(before, leaves + [dh])), "the kernel changed an input"
    ref = run(swiglu_ref, leaves, views, dh)
    gold = run(swiglu_ref, [t.double() for t in leaves], views, dh.double())
    assert len(got) == len(ref) == len(gold)
    for name, g, rf, gd in zip(["h", "d leaf 0", "d leaf 1"], got, ref, gold):
        check_output(g, rf, gd, dtype, f"{name} {shape} {dtype} {layout}", fp32_tol=1e-5)


def test_large_and_small_gates():
    "Saturated sigmoids (|g| up to 30) must give finite values and gradients."
    g = torch.linspace(-30, 30, 301, dtype=torch.float32)
    u = torch.randn(301)
    got = run(swiglu, [g, u], lambda g, u: (g, u), torch.ones(301), impl="triton")
    ref = run(swiglu_ref, [g, u], lambda g, u: (g, u), torch.ones(301))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "chunks", "mixed"])
def test_gradcheck_fp64(layout):
    leaves, views = make((2, 1, 5), torch.float64, layout)
    leaves = [t.requires_grad_() for t in leaves]
    assert torch.autograd.gradcheck(lambda *ts: swiglu(*views(*ts), impl="triton"), leaves)


def test_other_shapes():
    "Any shape: a scalar, a vector, 4-D; a dh that is not contiguous (from .sum())."
    for shape in [(), (7,), (2, 3, 4, 5)]:
        g, u = torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True)
        h = swiglu(g, u, impl="triton")
        assert h.shape == shape
        torch.testing.assert_close(h, swiglu_ref(g, u))
        got = torch.autograd.grad(h.sum(), (g, u))
        ref = torch.autograd.grad(swiglu_ref(g, u).sum(), (g, u))
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b)


def test_mixed_dtypes_and_empty():
    g, u = torch.randn(3, 10, dtype=torch.bfloat16), torch.randn(3, 10)
    h = swiglu(g, u, impl="triton")
    assert h.dtype == torch.float32
    # the reference rounds silu(gate) to bf16 before the fp32 product; the kernel does not
    torch.testing.assert_close(h, swiglu_ref(g, u), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(h, swiglu_ref(g.float(), u), atol=1e-5, rtol=1e-5)
    assert swiglu(torch.randn(0, 4), torch.randn(0, 4), impl="triton").shape == (0, 4)


def test_bad_input():
    with pytest.raises(ValueError, match=r"gate has shape \(2, 3\) but up has \(2, 4\)"):
        swiglu(torch.randn(2, 3), torch.randn(2, 4), impl="triton")


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 64, 5632), (1, 77, 3001)], ids=str)
def test_sweep(shape, dtype, layout):
    test_swiglu(shape, dtype, layout)
