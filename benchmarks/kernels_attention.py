"""Attention: smollm's FlashAttention-2 style Triton kernels against torch's SDPA, eager PyTorch (the reference),
torch.compile of the reference, and flash-attn's `flash_attn_func` when it is installed.

On a GPU (`quick=False`): TinyLlama's attention in bf16, causal, B=8 x T=2048, 32 query / 4 KV heads of dim 64,
with q, k, v the (B, T, H, D).transpose(1, 2) views an attention layer makes. Attention is compute-bound, so rows
carry FLOPs: causal forward 4 B Hq T^2 D / 2 (two matmuls over the visible half), backward 2.5x that (five
matmuls; recomputation not counted), and the fwd+bwd row the sum; the driver divides by a bf16 matmul measured
in the same run. SDPA gets GQA through `enable_gqa=True` (torch >= 2.5) or, on an older torch, K and V repeated
beforehand (outside the timing). Eager materialises the (T, S) scores in fp32; if it runs out of memory at B=8
it is timed at B=1 (noted in the row, FLOPs scaled to match).

Before timing, the Triton kernels are checked against the fp32 reference on the GPU: the TinyLlama head layout
at T=2048 (B=1, the same autotuning key as the timed shape), a ragged shape with window + softcap + ALiBi, and a
decode step (T=1 over a 1000-token cache). Tolerances are relative to the size of the reference, looser than
under the interpreter because the GPU matmuls take bf16 tiles.

With `quick=True` it runs a tiny fp32 shape on the CPU under Triton's interpreter: the correctness check and the
timing of the Triton op and eager only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common import Row, bench, peak_memory_mb
from smollm.kernels.attention import attention_ref
from smollm.kernels.core import load_triton

OP = "attention"


def make_inputs(B, T, S, HQ, HKV, D, dtype, device):
    "q (B, HQ, T, D), k, v (B, HKV, S, D) as transposed views of (B, T, H, D) buffers, requiring grad."
    mk = lambda n, h: torch.randn(B, n, h, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
    return mk(T, HQ), mk(S, HKV), mk(S, HKV)


def close(a, b, tol, what):
    "a against b, with the tolerance relative to the size of b."
    scale = b.detach().float().abs().max().clamp(min=1e-6)
    torch.testing.assert_close(a.detach().float(), b.detach().float(), atol=tol * scale, rtol=tol,
                               msg=lambda m: f"{what}: {m}")


def check(fn, q, k, v, tol, what, **kw):
    "fn's output and input gradients against the reference computed in fp32 on the same values."
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    qt, kt, vt = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, ref = fn(qt, kt, vt, **kw), attention_ref(qf, kf, vf, **kw)
    g = torch.randn_like(ref)
    got = [out, *torch.autograd.grad(out, (qt, kt, vt), g.to(q.dtype))]
    want = [ref, *torch.autograd.grad(ref, (qf, kf, vf), g)]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        close(a, b, tol, f"{what} {name}")


def sdpa_fn(HQ, HKV):
    "SDPA with GQA: enable_gqa where this torch has it, else K and V repeated (done outside the timed call)."
    try:
        x = torch.zeros(1, 2, 1, 8)
        F.scaled_dot_product_attention(x, x[:, :1], x[:, :1], enable_gqa=True)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), False
    except TypeError:
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), True


def impls(quick: bool, HQ: int, HKV: int):
    "name -> (fn(q, k, v) -> out, whether k and v must be repeated to HQ heads first)."
    tri = load_triton("attention").attention
    out = {"smollm-triton": (lambda q, k, v: tri(q, k, v, causal=True), False),
           "eager": (lambda q, k, v: attention_ref(q, k, v, causal=True), False)}
    if quick:
        return out
    out["sdpa"] = sdpa_fn(HQ, HKV)
    # the backward row re-runs one graph's backward (retain_graph=True), which compiled backwards with
    # donated buffers refuse; donation only saves memory, so it is switched off
    import torch._functorch.config
    torch._functorch.config.donated_buffer = False
    out["compile"] = (torch.compile(lambda q, k, v: attention_ref(q, k, v, causal=True)), False)
    try:
        from flash_attn import flash_attn_func   # takes (B, T, H, D), GQA built in
        out["flash-attn"] = (lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2),
                                                             v.transpose(1, 2), causal=True).transpose(1, 2), False)
    except ImportError:
        pass
    return out


def time_modes(name, fn, q, k, v, flops_fwd, device, note="") -> list[Row]:
    "Forward (inputs requiring grad, as in training), backward and both."
    g = torch.randn_like(q)
    out = fn(q, k, v)
    fwd = bench(lambda: fn(q, k, v), device)
    bwd = bench(lambda: torch.autograd.grad(out, (q, k, v), g, retain_graph=True), device)
    step = lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), g)
    both = bench(step, device)
    peak = peak_memory_mb(step, device)
    del out
    return [Row(OP, "fwd", name, fwd, flops=flops_fwd, note=note),
            Row(OP, "bwd", name, bwd, flops=2.5 * flops_fwd, note=note),
            Row(OP, "fwd+bwd", name, both, flops=3.5 * flops_fwd, peak_mb=peak, note=note)]


def gpu_checks(device):
    "The Triton kernels against the fp32 reference on the GPU, before any timing."
    tri = load_triton("attention").attention
    torch.manual_seed(0)
    q, k, v = make_inputs(1, 2048, 2048, 32, 4, 64, torch.bfloat16, device)
    check(tri, q, k, v, 3e-2, "TinyLlama heads, T=2048")
    q, k, v = make_inputs(2, 300, 300, 8, 2, 64, torch.bfloat16, device)
    slopes = torch.tensor([2 ** (-8 * (i + 1) / 8) for i in range(8)], device=device)
    check(lambda *a, **kw: tri(*a, **kw, blocks=(64, 64)), q, k, v, 3e-2, "window+softcap+alibi",
          window=100, softcap=30.0, alibi_slopes=slopes)
    q, _, _ = make_inputs(2, 1, 1, 8, 2, 64, torch.bfloat16, device)
    _, k, v = make_inputs(2, 1000, 1000, 8, 2, 64, torch.bfloat16, device)
    check(lambda *a, **kw: tri(*a, **kw, blocks=(16, 64)), q, k, v, 3e-2, "decode T=1")


def run(quick: bool, device: str) -> list[Row]:
    if quick:
        B, T, HQ, HKV, D, dtype, tol = 1, 32, 2, 1, 16, torch.float32, 1e-4
    else:
        B, T, HQ, HKV, D, dtype, tol = 8, 2048, 32, 4, 64, torch.bfloat16, 3e-2
        gpu_checks(device)
    flops = lambda b: 4 * b * HQ * T * T * D / 2              # causal forward
    q, k, v = make_inputs(B, T, T, HQ, HKV, D, dtype, device)
    rows = []
    for name, (fn, repeat) in impls(quick, HQ, HKV).items():
        kk, vv = k, v
        if repeat:   # an older torch without enable_gqa: K and V repeated up front, outside the timing
            kk, vv = (x.detach().repeat_interleave(HQ // HKV, 1).requires_grad_() for x in (k, v))
        if name != "eager":
            check(fn, q, kk, vv, tol, name)
        try:
            rows += time_modes(name, fn, q, kk, vv, flops(B), device, "K, V repeated" if repeat else "")
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            q1, k1, v1 = (x.detach()[:1].requires_grad_() for x in (q, kk, vv))
            rows += time_modes(name, fn, q1, k1, v1, flops(1), device, f"B=1 (out of memory at B={B})")
    return rows


def cases(quick: bool, device: str) -> list:
    """The correctness checks of `kernels.py --check`: (case, thunk) pairs, the thunk raising on a mismatch of the
    Triton attention with the fp32 reference, output and dq, dk, dv. On a GPU: the timed shape, then
    `gpu_checks`' three (the TinyLlama heads at T=2048, a ragged shape with window + softcap + ALiBi, a decode
    step); under the interpreter: the quick shape and a ragged one with the same options."""
    tri = load_triton("attention").attention
    if not quick:
        def timed():
            check(tri, *make_inputs(8, 2048, 2048, 32, 4, 64, torch.bfloat16, device), 3e-2, "B=8 T=2048")
        return [("attention B=8 T=2048 heads 32/4 dim 64 bfloat16", timed),
                ("attention: TinyLlama heads T=2048, window+softcap+alibi, decode T=1 (gpu_checks)",
                 lambda: gpu_checks(device))]
    def small():
        check(tri, *make_inputs(1, 32, 32, 2, 1, 16, torch.float32, device), 1e-4, "tiny")
    def ragged():
        slopes = torch.tensor([2 ** (-8 * (i + 1) / 4) for i in range(4)], device=device)
        check(tri, *make_inputs(2, 37, 37, 4, 2, 16, torch.float32, device), 1e-4, "window+softcap+alibi",
              window=9, softcap=30.0, alibi_slopes=slopes)
    return [("attention B=1 T=32 heads 2/1 dim 16 float32", small),
            ("attention B=2 T=37 heads 4/2 dim 16 float32, window+softcap+alibi", ragged)]


if __name__ == "__main__":
    import sys
    from common import print_table
    quick = "--quick" in sys.argv or not torch.cuda.is_available()
    print_table(run(quick, "cuda" if torch.cuda.is_available() else "cpu"))
