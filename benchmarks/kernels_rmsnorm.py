"""RMSNorm: smollm's Triton kernels against eager PyTorch (the reference), torch.compile of it, and Liger-Kernel.

On a GPU (`quick=False`): TinyLlama in bf16, 16k tokens (8 x 2048) of width 2048, with a bf16 weight that
requires grad. Two ops:

- `rms_norm(x, w)`. Bytes that must move (element size b, N rows, D columns): forward reads x and w and writes
  y, 2NDb + Db; backward reads dy, x, w and rstd (4N) and writes dx and dw, 3NDb + 2Db + 4N.
- `rms_norm(x, w, residual=r)`, the fused add + norm returning (y, x + r), with gradients flowing into both
  outputs (as in a pre-norm block). Forward reads x, r, w and writes y, s: 4NDb + Db; backward reads dy, ds,
  s, w, rstd and writes dx: 4NDb + 2Db + 4N.

Liger-Kernel's `LigerRMSNormFunction` (casting mode "llama", like the reference; `in_place=False` so that it
leaves dy alone) is timed on the first op when `liger_kernel` is importable. Before timing, every
implementation is checked against the reference computed in fp32 (tolerance relative to the size of the
result, loose enough for bf16). With `quick=True` it runs a tiny fp32 shape on the CPU under Triton's
interpreter: the check and the timing of the Triton op and eager only.
"""
from __future__ import annotations

import torch

from common import Row, bench, peak_memory_mb
from smollm.kernels.core import load_triton
from smollm.kernels.rmsnorm import rms_norm_ref

EPS = 1e-5


def impls(quick: bool, residual: bool) -> dict:
    "name -> f(x, w, r) returning y, or (y, s) when residual."
    tr = load_triton("rmsnorm")
    if residual:
        out = {"smollm-triton": lambda x, w, r: tr.rms_norm(x, w, EPS, r),
               "eager": lambda x, w, r: rms_norm_ref(x, w, EPS, r)}
    else:
        out = {"smollm-triton": lambda x, w, r: tr.rms_norm(x, w, EPS),
               "eager": lambda x, w, r: rms_norm_ref(x, w, EPS)}
    if quick:
        return out
    compiled = torch.compile(rms_norm_ref)
    out["compile"] = (lambda x, w, r: compiled(x, w, EPS, r)) if residual else (lambda x, w, r: compiled(x, w, EPS))
    if not residual:
        try:
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
            # positional: X, W, eps, offset, casting_mode, in_place
            out["liger"] = lambda x, w, r: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)
        except ImportError:
            pass
    return out


def make_inputs(N, D, dtype, device, residual):
    "x, w, r (r None without residual) requiring grad, and the output gradients."
    x = torch.randn(N, D, device=device, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(D, device=device)).to(dtype).requires_grad_()
    r = torch.randn(N, D, device=device, dtype=dtype, requires_grad=True) if residual else None
    grads = [torch.randn(N, D, device=device, dtype=dtype) for _ in range(2 if residual else 1)]
    return x, w, r, grads


def leaves(x, w, r):
    return [t for t in (x, w, r) if t is not None]


def outputs(fn, x, w, r):
    out = fn(x, w, r)
    return list(out) if isinstance(out, tuple) else [out]


def check(fn, x, w, r, grads, tol):
    "fn against the reference computed in fp32, outputs and gradients, on copies of the inputs."
    copy = lambda t, dt=None: t.detach().to(dt or t.dtype).clone().requires_grad_() if t is not None else None
    mine, ref = [copy(t) for t in (x, w, r)], [copy(t, torch.float32) for t in (x, w, r)]
    got = outputs(fn, *mine)
    got += torch.autograd.grad(got, leaves(*mine), grads)
    want = outputs(lambda x, w, r: rms_norm_ref(x, w, EPS, r) if r is not None else rms_norm_ref(x, w, EPS), *ref)
    want += torch.autograd.grad(want, leaves(*ref), [g.float() for g in grads])
    for a, b in zip(got, want, strict=True):
        scale = b.detach().abs().max().clamp(min=1e-6)
        torch.testing.assert_close(a.detach().float(), b.detach(), atol=tol * scale, rtol=tol)


def time_modes(op, name, fn, x, w, r, grads, fwd_bytes, bwd_bytes, device) -> list[Row]:
    "Forward, backward (autograd.grad, so no accumulation into .grad) and both."
    out = outputs(fn, x, w, r)
    fwd = bench(lambda: fn(x, w, r), device)
    bwd = bench(lambda: torch.autograd.grad(out, leaves(x, w, r), grads, retain_graph=True), device)
    step = lambda: torch.autograd.grad(outputs(fn, x, w, r), leaves(x, w, r), grads)
    both = bench(step, device)
    peak = peak_memory_mb(step, device)
    return [Row(op, "fwd", name, fwd, fwd_bytes), Row(op, "bwd", name, bwd, bwd_bytes),
            Row(op, "fwd+bwd", name, both, fwd_bytes + bwd_bytes, peak_mb=peak)]


def run(quick: bool, device: str) -> list[Row]:
    N, D, dtype, tol = (2 * 8, 256, torch.float32, 1e-4) if quick else (8 * 2048, 2048, torch.bfloat16, 2e-2)
    rows = []
    for residual in (False, True):
        op = "rms_norm+residual" if residual else "rms_norm"
        x, w, r, grads = make_inputs(N, D, dtype, device, residual)
        b, nd = x.element_size(), N * D
        streams = 2 if residual else 1  # full-size tensors per side: x (+ r) in, y (+ s) out
        fwd_bytes = 2 * streams * nd * b + D * b
        bwd_bytes = (3 + (1 if residual else 0)) * nd * b + 2 * D * b + 4 * N
        for name, fn in impls(quick, residual).items():
            try:
                if name != "eager":
                    check(fn, x, w, r, grads, tol)
            except Exception as e:
                if name != "liger":
                    raise
                print(f"{op}: skipping liger, its check failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            rows += time_modes(op, name, fn, x, w, r, grads, fwd_bytes, bwd_bytes, device)
    return rows


def cases(quick: bool, device: str) -> list:
    """The correctness checks of `kernels.py --check`: (case, thunk) pairs, the thunk raising on a mismatch of the
    Triton op with the fp32 reference, outputs and gradients: the timed shape and odd ones (a single row, a width
    that is not a power of two), with and without the residual."""
    f32, bf16 = torch.float32, torch.bfloat16
    shapes = ([(16, 256, f32), (5 * 123, 123, f32), (1, 64, f32)] if quick else
              [(8 * 2048, 2048, bf16), (5 * 123, 123, bf16), (1, 2048, bf16), (3 * 47, 1000, f32)])
    out = []
    for residual in (False, True):
        fn = impls(True, residual)["smollm-triton"]
        for N, D, dtype in shapes:
            def thunk(N=N, D=D, dtype=dtype, residual=residual, fn=fn):
                check(fn, *make_inputs(N, D, dtype, device, residual), 1e-4 if dtype == f32 else 2e-2)
            out.append((f"{'rms_norm+residual' if residual else 'rms_norm'} ({N}, {D}) {str(dtype)[6:]}", thunk))
    return out


if __name__ == "__main__":
    import sys
    from common import print_table
    quick = "--quick" in sys.argv or not torch.cuda.is_available()
    print_table(run(quick, "cuda" if torch.cuda.is_available() else "cpu"))
