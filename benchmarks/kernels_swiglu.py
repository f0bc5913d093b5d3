"""SwiGLU: smollm's Triton kernels against eager PyTorch (the reference), torch.compile of it, and Liger-Kernel.

On a GPU (`quick=False`): TinyLlama's MLP activation in bf16, gate and up of shape (8, 2048, 5632), requiring
grad. Bytes that must move for n elements of size b: forward reads gate and up and writes h, 3nb; backward
reads dh, gate and up and writes their gradients, 5nb.

Two layouts: `swiglu` takes gate and up as separate contiguous tensors (every implementation), and
`swiglu (fused gu)` takes them as the two halves of one (8, 2048, 11264) projection output, `gu.chunk(2, -1)`,
the strided views a fused gate/up matmul produces (smollm and eager only; Liger's function makes such views
contiguous first). Liger-Kernel's `LigerSiLUMulFunction` writes its gradients into the buffers of its inputs,
so every implementation gets its own copy of the inputs.

Before timing, every implementation is checked against the reference computed in fp32 (tolerance relative to
the size of the result, loose enough for bf16). With `quick=True` it runs a tiny fp32 shape on the CPU under
Triton's interpreter: the check and the timing of the Triton op and eager only.
"""
from __future__ import annotations

import torch

from common import Row, bench, peak_memory_mb
from smollm.kernels.core import load_triton
from smollm.kernels.swiglu import swiglu_ref


def impls(quick: bool, fused: bool) -> dict:
    "name -> f(gate, up)."
    out = {"smollm-triton": load_triton("swiglu").swiglu, "eager": swiglu_ref}
    if quick:
        return out
    out["compile"] = torch.compile(swiglu_ref)
    if not fused:
        try:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction
            out["liger"] = LigerSiLUMulFunction.apply
        except ImportError:
            pass
    return out


def make_inputs(shape, dtype, device, fused):
    "The leaf tensors and a function of them returning (gate, up)."
    if fused:
        return [torch.randn(*shape[:-1], 2 * shape[-1], device=device, dtype=dtype)], lambda gu: gu.chunk(2, -1)
    return [torch.randn(shape, device=device, dtype=dtype) for _ in range(2)], lambda g, u: (g, u)


def check(fn, leaves, views, dh, tol):
    "fn against the reference computed in fp32, output and gradients, on copies of the inputs."
    mine = [t.detach().clone().requires_grad_() for t in leaves]
    ref = [t.detach().float().requires_grad_() for t in leaves]
    h, h_ref = fn(*views(*mine)), swiglu_ref(*views(*ref))
    got = [h, *torch.autograd.grad(h, mine, dh)]
    want = [h_ref, *torch.autograd.grad(h_ref, ref, dh.float())]
    for a, b in zip(got, want, strict=True):
        scale = b.detach().abs().max().clamp(min=1e-6)
        torch.testing.assert_close(a.detach().float(), b.detach(), atol=tol * scale, rtol=tol)


def time_modes(op, name, fn, leaves, views, dh, nbytes_fwd, nbytes_bwd, device, note) -> list[Row]:
    "Forward, backward (autograd.grad, so no accumulation into .grad) and both, on a private copy of the inputs."
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    h = fn(*views(*leaves))
    fwd = bench(lambda: fn(*views(*leaves)), device)
    bwd = bench(lambda: torch.autograd.grad(h, leaves, dh, retain_graph=True), device)
    step = lambda: torch.autograd.grad(fn(*views(*leaves)), leaves, dh)
    both = bench(step, device)
    peak = peak_memory_mb(step, device)
    return [Row(op, "fwd", name, fwd, nbytes_fwd, note=note), Row(op, "bwd", name, bwd, nbytes_bwd, note=note),
            Row(op, "fwd+bwd", name, both, nbytes_fwd + nbytes_bwd, peak_mb=peak, note=note)]


def run(quick: bool, device: str) -> list[Row]:
    shape, dtype, tol = ((2, 8, 300), torch.float32, 1e-5) if quick else ((8, 2048, 5632), torch.bfloat16, 2e-2)
    rows = []
    for fused in (False, True):
        op, note = ("swiglu (fused gu)", "gate, up = gu.chunk(2, -1)") if fused else ("swiglu", "")
        leaves, views = make_inputs(shape, dtype, device, fused)
        dh = torch.randn(shape, device=device, dtype=dtype)
        n, b = dh.numel(), dh.element_size()
        for name, fn in impls(quick, fused).items():
            try:
                if name != "eager":
                    check(fn, leaves, views, dh, tol)
            except Exception as e:
                if name != "liger":
                    raise
                print(f"{op}: skipping liger, its check failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            rows += time_modes(op, name, fn, leaves, views, dh, 3 * n * b, 5 * n * b, device, note)
    return rows


def cases(quick: bool, device: str) -> list:
    """The correctness checks of `kernels.py --check`: (case, thunk) pairs, the thunk raising on a mismatch of the
    Triton op with the fp32 reference, output and gradients: the timed shape and odd ones, for both layouts
    (separate gate and up, and the halves of one fused projection)."""
    f32, bf16 = torch.float32, torch.bfloat16
    shapes = ([((2, 8, 300), f32), ((1, 1, 64), f32), ((3, 5, 123), f32)] if quick else
              [((8, 2048, 5632), bf16), ((1, 77, 3001), bf16), ((1, 1, 64), bf16), ((3, 47, 1000), f32)])
    out = []
    for fused in (False, True):
        for shape, dtype in shapes:
            def thunk(shape=shape, dtype=dtype, fused=fused):
                leaves, views = make_inputs(shape, dtype, device, fused)
                dh = torch.randn(shape, device=device, dtype=dtype)
                check(load_triton("swiglu").swiglu, leaves, views, dh, 1e-5 if dtype == f32 else 2e-2)
            out.append((f"{'swiglu (fused gu)' if fused else 'swiglu'} {shape} {str(dtype)[6:]}", thunk))
    return out


if __name__ == "__main__":
    import sys
    from common import print_table
    quick = "--quick" in sys.argv or not torch.cuda.is_available()
    print_table(run(quick, "cuda" if torch.cuda.is_available() else "cpu"))
