"""RoPE: the Triton kernel (under the interpreter without a GPU) and the torch path (`RoPEFunction`) against the
plain-PyTorch reference."""
import pytest
import torch

from smollm.kernels.rope import rope, rope_ref
from smollm.kernels.core import load_triton

tr = load_triton("rope")
IMPLS = ["triton", "torch"]


def op(impl):
    "The public op with `impl`: the Triton kernel or the torch path."
    return lambda q, k, cos, sin: rope(q, k, cos, sin, impl=impl)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


def tables(T, D, dtype=torch.float32, base=10000.0):
    "The Llama cos/sin tables (T, D) in the rotate-half layout."
    inv = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv
    ang = torch.cat([ang, ang], -1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def check(q, k, cos, sin, dtype, impl="triton"):
    "Forward and backward of the op with `impl` against `rope_ref`, with cloned inputs."
    q0, k0 = q.detach().clone(), k.detach().clone()
    qt, kt = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    qr, kr = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    out_t = op(impl)(qt, kt, cos, sin)
    # the reference in fp32: the kernel computes in fp32 and rounds once (the torch path rounds at each op)
    out_r = rope_ref(qr.float(), kr.float(), cos.float(), sin.float())
    for a, b in zip(out_t, out_r):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, **TOL[dtype])
    g = [torch.randn_like(o) for o in out_t]
    dt = torch.autograd.grad(out_t, (qt, kt), g)
    dr = torch.autograd.grad(out_r, (qr, kr), [x.float() for x in g])
    for a, b in zip(dt, dr):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])
    assert torch.equal(q, q0) and torch.equal(k, k0)  # inputs untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,HQ,HKV,T,D", [(1, 1, 1, 1, 64), (2, 4, 2, 7, 32), (3, 8, 1, 47, 128), (1, 3, 3, 5, 24)])
@pytest.mark.parametrize("impl", IMPLS)
def test_rope_matches_reference(B, HQ, HKV, T, D, dtype, impl):
    q, k = torch.randn(B, HQ, T, D, dtype=dtype), torch.randn(B, HKV, T, D, dtype=dtype)
    cos, sin = tables(T, D)  # fp32 tables with bf16 activations, as a model passes them
    check(q, k, cos, sin, dtype, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_rope_transposed_views_and_output_layout(impl):
    "q, k as the (B, T, H, D).transpose(1, 2) views an attention layer makes; outputs keep that layout."
    B, T, D = 2, 9, 16
    q = torch.randn(B, T, 6, D).transpose(1, 2)
    k = torch.randn(B, T, 2, D).transpose(1, 2)
    cos, sin = tables(T, D)
    check(q, k, cos, sin, torch.float32, impl)
    qr, kr = op(impl)(q, k, cos, sin)
    assert qr.stride() == q.stride() and kr.stride() == k.stride()


@pytest.mark.parametrize("impl", IMPLS)
def test_rope_strided_slices_and_general_tables(impl):
    "A slice of the head dim (partial rotary) and tables whose two halves differ (the kernel must not assume)."
    B, H, T, D = 2, 3, 6, 32
    q_full, k_full = torch.randn(B, H, T, D + 8), torch.randn(B, 1, T, D + 8)
    cos, sin = torch.randn(T, D), torch.randn(T, D)
    check(q_full[..., :D], k_full[..., :D], cos, sin, torch.float32, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_rope_backward_of_a_sum(impl):
    "`.sum().backward()` hands the kernel an expanded gradient with all strides 0."
    q, k = torch.randn(1, 2, 3, 8, requires_grad=True), torch.randn(1, 1, 3, 8, requires_grad=True)
    cos, sin = tables(3, 8)
    qr, kr = op(impl)(q, k, cos, sin)
    (qr.sum() + 2 * kr.sum()).backward()
    q2, k2 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    qr2, kr2 = rope_ref(q2, k2, cos, sin)
    (qr2.sum() + 2 * kr2.sum()).backward()
    torch.testing.assert_close(q.grad, q2.grad); torch.testing.assert_close(k.grad, k2.grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_rope_gradcheck(impl):
    "The kernel computes in fp32 whatever the input dtype; RoPE is linear, so a large step is exact."
    q = torch.randn(1, 2, 3, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 3, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = tables(3, 8, torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: op(impl)(a, b, cos, sin), (q, k), eps=1e-2, atol=1e-4, rtol=1e-3)


def test_rope_torch_path_gradient_of_the_tables():
    "Tables that want a gradient (RoPEFunction gives none) make the torch path run the reference."
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8)
    got, ref = [], []
    for f, out in ((op("torch"), got), (rope_ref, ref)):
        cos, sin = (t.clone().requires_grad_() for t in tables(4, 8))
        qr, kr = f(q, k, cos, sin)
        out += torch.autograd.grad((qr * torch.arange(8.0)).sum() + kr.sum(), (cos, sin))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def test_rope_public_op_dispatches_to_triton():
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8)
    cos, sin = tables(4, 8)
    for a, b in zip(rope(q, k, cos, sin, impl="triton"), rope_ref(q, k, cos, sin)):
        torch.testing.assert_close(a, b)


def test_rope_bad_input():
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8)
    cos, sin = tables(4, 8)
    with pytest.raises(ValueError, match=r"cos must have shape \(T, D\) = \(4, 8\)"):
        tr.rope(q, k, cos[:2], sin)
    with pytest.raises(ValueError, match="must match q"):
        tr.rope(q, torch.randn(1, 1, 5, 8), cos, sin)
    with pytest.raises(ValueError, match="must be 4-D"):
        tr.rope(q[0], k, cos, sin)
    with pytest.raises(ValueError, match="D must be even"):
        tr.rope(q[..., :7], k[..., :7], cos[:, :7], sin[:, :7])
    with pytest.raises(ValueError, match="no gradient to sin"):
        tr.rope(q, k, cos, sin.clone().requires_grad_())


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rope_tinyllama_shape(dtype):
    "A scaled-down TinyLlama attention: 32 query heads, 4 KV heads, head dim 64."
    q, k = torch.randn(2, 32, 64, 64, dtype=dtype), torch.randn(2, 4, 64, 64, dtype=dtype)
    cos, sin = tables(64, 64)
    check(q, k, cos, sin, dtype)
