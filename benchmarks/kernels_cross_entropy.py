"""Cross-entropy and the fused lm head + cross-entropy: smollm's Triton kernels against eager PyTorch (the
references), torch.compile of them, and Liger-Kernel.

On a GPU (`quick=False`), TinyLlama in bf16: 16k tokens (8 x 2048), dim 2048, vocabulary 32000.

- `cross_entropy` on (16384, 32000) logits. It is memory-bound; the bytes that must move are, forward: read the
  logits + write the gradient (+ the targets), backward: read and write the gradient.
- `linear_cross_entropy` on hidden (16384, 2048) and the lm-head weight (32000, 2048). It is matmul-bound, so it
  reports FLOPs (three N x V x dim matmuls for forward + backward) and the peak memory; the target is within 1.1x
  the time of the unfused matmul + cross-entropy at a quarter of its peak memory. The plain-PyTorch chunked
  version (`linear_cross_entropy_chunked`, what `impl="torch"` runs) is timed too.

With `quick=True` it runs tiny shapes on the CPU under Triton's interpreter: a correctness check and the timing of
the Triton ops and eager only.

`--cpu` times the plain-PyTorch paths of `linear_cross_entropy` (what `impl="torch"` and `"auto"` run on a CPU)
against the unfused `F.cross_entropy(F.linear(h, w), y)` that transformers runs, forward + backward, in fp32 and
under bf16 autocast, at the nano shape (2048 tokens, dim 256, vocabulary 8192) and a realistic CPU one (1024
tokens, dim 768, vocabulary 32000): the implementations alternate round by round and the table gives medians
(`--rounds`, default 7) and each one's speed relative to the unfused op. `--cpu --quick` runs one tiny shape. Liger is called through its loss modules (`LigerCrossEntropyLoss`,
`LigerFusedLinearCrossEntropyLoss`, which wrap `LigerCrossEntropyFunction` and
`LigerFusedLinearCrossEntropyFunction`) because their keyword arguments are stable across versions.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from common import Row, bench, peak_memory_mb
from smollm.kernels.core import load_triton
from smollm.kernels.cross_entropy import (cross_entropy_ref, linear_cross_entropy, linear_cross_entropy_chunked,
                                          linear_cross_entropy_ref)


def close(a, b, tol):
    "a against b, with the tolerance relative to the size of b."
    scale = b.detach().float().abs().max().clamp(min=1e-6)
    torch.testing.assert_close(a.detach().float(), b.detach().float(), atol=tol * scale, rtol=tol)


def targets(n, V, device):
    y = torch.randint(0, V, (n,), device=device)
    y[::17] = -100  # some ignored positions (padding, prompt tokens)
    return y


def time_modes(op, name, fn, inputs, nbytes=(None, None), flops=(None, None)) -> list[Row]:
    """Forward (inputs requiring grad, as in training), backward and both; `fn(*inputs)` returns a scalar loss.
    nbytes/flops: (forward, backward) amounts, summed for the fwd+bwd row."""
    device = inputs[0].device.type
    out = fn(*inputs)
    fwd = bench(lambda: fn(*inputs), device)
    bwd = bench(lambda: torch.autograd.grad(out, inputs, retain_graph=True), device)
    step = lambda: torch.autograd.grad(fn(*inputs), inputs)
    both = bench(step, device)
    peak = peak_memory_mb(step, device)
    add = lambda p: None if p[0] is None else p[0] + p[1]
    return [Row(op, "fwd", name, fwd, nbytes[0], flops[0]), Row(op, "bwd", name, bwd, nbytes[1], flops[1]),
            Row(op, "fwd+bwd", name, both, add(nbytes), add(flops), peak_mb=peak)]


def check_grads(fn, ref_fn, inputs, y, tol):
    "Loss and input gradients of fn against ref_fn, on clones."
    a = [x.detach().clone().requires_grad_() for x in inputs]
    b = [x.detach().clone().requires_grad_() for x in inputs]
    out, ref = fn(*a, y), ref_fn(*b, y)
    close(out, ref, tol)
    for ga, gb in zip(torch.autograd.grad(out, a), torch.autograd.grad(ref, b)):
        close(ga, gb, tol)


def ce_impls(quick: bool):
    "name -> fn(logits, targets) -> mean loss."
    out = {"smollm-triton": load_triton("cross_entropy").cross_entropy, "eager": cross_entropy_ref}
    if quick:
        return out
    out["compile"] = torch.compile(cross_entropy_ref)
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
        liger = LigerCrossEntropyLoss(ignore_index=-100, reduction="mean")
        # Liger writes its gradient over the logits it is given: it must stay the last entry here, since the
        # logits are garbage after it ran (its correctness check runs on clones)
        out["liger"] = liger
    except ImportError:
        pass
    return out


def linear_impls(quick: bool, chunk_size=None):
    "name -> fn(hidden, weight, targets) -> mean loss."
    tr = load_triton("cross_entropy")
    out = {"smollm-triton": lambda h, w, y: tr.linear_cross_entropy(h, w, y, chunk_size=chunk_size),
           "eager": linear_cross_entropy_ref}
    if quick:
        return out
    out["compile"] = torch.compile(linear_cross_entropy_ref)
    out["smollm-torch-chunked"] = linear_cross_entropy_chunked
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")
        out["liger"] = lambda h, w, y: liger(w, h, y)
    except ImportError:
        pass
    return out


def run(quick: bool, device: str) -> list[Row]:
    if quick:
        N, dim, V, dtype, tol, chunk = 8, 32, 300, torch.float32, 1e-5, 3
    else:
        N, dim, V, dtype, tol, chunk = 8 * 2048, 2048, 32000, torch.bfloat16, 3e-2, None
    rows = []

    # cross_entropy on the full logits
    z = (torch.randn(N, V, device=device) * 2).to(dtype).requires_grad_()
    y = targets(N, V, device)
    nb = z.numel() * z.element_size()
    for name, fn in ce_impls(quick).items():
        if name != "eager":
            check_grads(fn, cross_entropy_ref, [z], y, tol)
        rows += time_modes("cross_entropy", name, lambda z_, fn=fn: fn(z_, y), [z],
                           nbytes=(2 * nb + y.numel() * y.element_size(), 2 * nb))
    del z

    # linear_cross_entropy: the lm head fused with the loss
    h = torch.randn(N, dim, device=device).to(dtype).requires_grad_()
    w = (torch.randn(V, dim, device=device) / dim ** 0.5).to(dtype).requires_grad_()
    mm = 2 * N * V * dim
    lin = []
    for name, fn in linear_impls(quick, chunk).items():
        if name != "eager":
            check_grads(fn, linear_cross_entropy_ref, [h, w], y, tol)
        lin += time_modes("linear_cross_entropy", name, lambda h_, w_, fn=fn: fn(h_, w_, y), [h, w],
                          flops=(mm, 2 * mm))
    if quick:  # interpreter timings say nothing about the target
        return rows + lin
    # the target, on the fused op's fwd+bwd row: time and peak memory relative to the unfused eager op
    both = {r.impl: r for r in lin if r.mode == "fwd+bwd"}
    ours, eager = both["smollm-triton"], both["eager"]
    note = f"{ours.ms / eager.ms:.2f}x eager time"
    if ours.peak_mb is not None and eager.peak_mb:
        note += f", {ours.peak_mb / eager.peak_mb:.2f}x eager peak memory"
    ours.note = note + " (target: <= 1.1x, <= 0.25x)"
    return rows + lin


def cases(quick: bool, device: str) -> list:
    """The correctness checks of `kernels.py --check`: (case, thunk) pairs, the thunk raising on a mismatch of a
    Triton op with its reference, loss and input gradients (some targets ignored): cross_entropy and
    linear_cross_entropy at the timed shapes and at odd ones (a vocabulary that is not a power of two, one row)."""
    f32, bf16 = torch.float32, torch.bfloat16
    tr = load_triton("cross_entropy")
    ce = [(8, 300, f32), (1, 1000, f32)] if quick else [(8 * 2048, 32000, bf16), (37, 50257, bf16), (1, 1000, f32)]
    lin = ([(8, 32, 300, f32, 3), (5, 24, 1000, f32, None)] if quick else
           [(8 * 2048, 2048, 32000, bf16, None), (37, 96, 50257, bf16, None), (1, 64, 1000, f32, None)])
    tol = lambda dtype: 1e-5 if dtype == f32 else 3e-2
    out = []
    for N, V, dtype in ce:
        def thunk(N=N, V=V, dtype=dtype):
            z = (torch.randn(N, V, device=device) * 2).to(dtype)
            check_grads(tr.cross_entropy, cross_entropy_ref, [z], targets(N, V, device), tol(dtype))
        out.append((f"cross_entropy ({N}, {V}) {str(dtype)[6:]}", thunk))
    for N, dim, V, dtype, chunk in lin:
        def thunk(N=N, dim=dim, V=V, dtype=dtype, chunk=chunk):
            h = torch.randn(N, dim, device=device).to(dtype)
            w = (torch.randn(V, dim, device=device) / dim ** 0.5).to(dtype)
            fn = lambda h, w, y: tr.linear_cross_entropy(h, w, y, chunk_size=chunk)
            check_grads(fn, linear_cross_entropy_ref, [h, w], targets(N, V, device), tol(dtype))
        out.append((f"linear_cross_entropy ({N}, {dim}) x ({V}, {dim}) {str(dtype)[6:]}", thunk))
    return out


CPU_SHAPES = {"nano": (2048, 256, 8192), "realistic": (1024, 768, 32000)}   # tokens, dim, vocabulary


def cpu_impls(n: int):
    "name -> fn(hidden, weight, targets) -> mean loss: the unfused peer first, then smollm's CPU paths."
    return {"unfused": lambda h, w, y: F.cross_entropy(F.linear(h, w), y),
            "smollm-torch": lambda h, w, y: linear_cross_entropy(h, w, y, impl="torch"),
            "smollm-torch-4-chunks": lambda h, w, y: linear_cross_entropy_chunked(h, w, y, chunk_size=-(-n // 4))}


def run_cpu(quick: bool, rounds: int = 7) -> list[Row]:
    "fwd+bwd of each CPU implementation, alternating, in fp32 and bf16 autocast; medians over `rounds`."
    shapes = {"tiny": (64, 32, 500)} if quick else CPU_SHAPES
    rows = []
    for shape, (N, dim, V) in shapes.items():
        torch.manual_seed(0)
        h = torch.randn(N, dim, requires_grad=True)
        w = (torch.randn(V, dim) / dim ** 0.5).requires_grad_()
        y = targets(N, V, "cpu")
        for precision in ("fp32", "bf16-autocast"):
            autocast = precision != "fp32"
            def step(fn):
                with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                    loss = fn(h, w, y)
                return loss, torch.autograd.grad(loss, (h, w))
            impls = cpu_impls(N)
            ref, ref_grads = step(impls["unfused"])
            for fn in impls.values():  # same loss and gradients as the unfused op, in this precision
                loss, grads = step(fn)
                for a, b in zip((loss, *grads), (ref, *ref_grads)):
                    close(a, b, 3e-2 if autocast else 1e-4)
            times = {name: [] for name in impls}
            for _ in range(rounds):
                for name, fn in impls.items():
                    t0 = time.perf_counter()
                    step(fn)
                    times[name].append((time.perf_counter() - t0) * 1e3)
            ms = {name: statistics.median(t) for name, t in times.items()}
            for name in impls:
                gflops = 3 * 2 * N * V * dim / ms[name] / 1e6   # the three matmuls
                rows.append(Row(f"linear_cross_entropy {shape} ({N}, {dim}) x ({V}, {dim}) {precision}", "fwd+bwd",
                                name, ms[name], note=f"{ms['unfused'] / ms[name]:.2f}x unfused, {gflops:.0f} GFLOP/s"))
    return rows


if __name__ == "__main__":
    import sys
    from common import print_table
    quick = "--quick" in sys.argv or not torch.cuda.is_available()
    if "--cpu" in sys.argv:
        rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else (1 if quick else 7)
        print(f"{torch.get_num_threads()} threads; load average {open('/proc/loadavg').read().split()[0]}")
        print_table(run_cpu("--quick" in sys.argv, rounds))
    else:
        print_table(run(quick, "cuda" if torch.cuda.is_available() else "cpu"))
