"""RoPE: smollm's Triton kernel against eager PyTorch (the reference), torch.compile of it, and Liger-Kernel.

On a GPU (`quick=False`): TinyLlama attention in bf16, 16k tokens (8 x 2048), 32 query and 4 KV heads of dim 64,
cos/sin in fp32, q and k the (B, T, H, D).transpose(1, 2) views an attention layer makes. The bytes that must
move are read q, k, cos, sin + write the rotated q, k (the backward moves the same amounts for the gradients).
With `quick=True` it runs tiny shapes on the CPU under Triton's interpreter: a correctness check and the timing of
the Triton op and eager only.
"""
from __future__ import annotations

import torch

from common import Row, bench, peak_memory_mb
from smollm.kernels.core import load_triton
from smollm.kernels.rope import rope_ref

OP = "rope"


def tables(T: int, D: int, device: str, base: float = 10000.0):
    "Llama's cos and sin tables, (T, D) fp32, rotate-half layout."
    inv = base ** (-torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)
    ang = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


def make_inputs(B, T, HQ, HKV, D, dtype, device):
    q = torch.randn(B, T, HQ, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, HKV, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
    return q, k, *tables(T, D, device)


def impls(quick: bool):
    "name -> fn(q, k, cos, sin) -> (q_rot, k_rot); peers that are not installed are left out."
    out = {"smollm-triton": load_triton("rope").rope, "eager": rope_ref}
    if quick:
        return out
    out["compile"] = torch.compile(rope_ref)
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
        out["liger"] = lambda q, k, cos, sin: liger_rotary_pos_emb(q, k, cos[None], sin[None])
    except ImportError:
        pass
    return out


def check(fn, q, k, cos, sin, tol):
    "fn against the reference computed in fp32, forward and backward."
    qf, kf = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    qt, kt = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    out, ref = fn(qt, kt, cos, sin), rope_ref(qf, kf, cos, sin)
    g = [torch.randn_like(o) for o in ref]
    got = [*out, *torch.autograd.grad(out, (qt, kt), [x.to(q.dtype) for x in g])]
    want = [*ref, *torch.autograd.grad(ref, (qf, kf), g)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b, atol=tol, rtol=tol)


def time_modes(name, fn, q, k, cos, sin, nbytes, device) -> list[Row]:
    "Forward, backward and both, with q and k requiring grad as in training."
    g = [torch.randn_like(q), torch.randn_like(k)]
    out = fn(q, k, cos, sin)
    fwd = bench(lambda: fn(q, k, cos, sin), device)
    bwd = bench(lambda: torch.autograd.grad(out, (q, k), g, retain_graph=True), device)
    step = lambda: torch.autograd.grad(fn(q, k, cos, sin), (q, k), g)
    both = bench(step, device)
    peak = peak_memory_mb(step, device)
    return [Row(OP, "fwd", name, fwd, nbytes), Row(OP, "bwd", name, bwd, nbytes),
            Row(OP, "fwd+bwd", name, both, 2 * nbytes, peak_mb=peak)]


def run(quick: bool, device: str) -> list[Row]:
    if quick:
        B, T, HQ, HKV, D, dtype, tol = 1, 4, 4, 2, 16, torch.float32, 1e-5
    else:
        B, T, HQ, HKV, D, dtype, tol = 8, 2048, 32, 4, 64, torch.bfloat16, 2e-2
    q, k, cos, sin = make_inputs(B, T, HQ, HKV, D, dtype, device)
    nbytes = 2 * (q.numel() + k.numel()) * q.element_size() + (cos.numel() + sin.numel()) * cos.element_size()
    rows = []
    for name, fn in impls(quick).items():
        if name != "eager":
            check(fn, q, k, cos, sin, tol)
        rows += time_modes(name, fn, q, k, cos, sin, nbytes, device)
    return rows


def cases(quick: bool, device: str) -> list:
    """The correctness checks of `kernels.py --check`: (case, thunk) pairs, the thunk raising on a mismatch of the
    Triton op with the fp32 reference, forward and backward: the timed shape and odd ones (one position, a head
    dim that is not a power of two, as many KV heads as query heads)."""
    f32, bf16 = torch.float32, torch.bfloat16
    shapes = ([(1, 4, 4, 2, 16, f32), (2, 7, 3, 3, 24, f32), (1, 1, 2, 1, 64, f32)] if quick else
              [(8, 2048, 32, 4, 64, bf16), (3, 47, 8, 1, 128, bf16), (1, 1, 32, 4, 64, bf16), (2, 7, 3, 3, 24, f32)])
    out = []
    for B, T, HQ, HKV, D, dtype in shapes:
        def thunk(B=B, T=T, HQ=HQ, HKV=HKV, D=D, dtype=dtype):
            tol = 1e-5 if dtype == f32 else 2e-2
            check(load_triton("rope").rope, *make_inputs(B, T, HQ, HKV, D, dtype, device), tol)
        out.append((f"rope B={B} T={T} heads {HQ}/{HKV} dim {D} {str(dtype)[6:]}", thunk))
    return out


if __name__ == "__main__":
    import sys
    from common import print_table
    quick = "--quick" in sys.argv or not torch.cuda.is_available()
    print_table(run(quick, "cuda" if torch.cuda.is_available() else "cpu"))
