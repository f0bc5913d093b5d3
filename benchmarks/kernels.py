"""Check and benchmark every fused kernel against its peers, in one run.

    python benchmarks/kernels.py            # on a GPU: correctness first, then the full table (a few minutes)
    python benchmarks/kernels.py --quick    # on a CPU under TRITON_INTERPRET=1, tiny sizes (what CI runs)

Memory-bound ops are reported as achieved GB/s (bytes that must move / median time) and as a fraction of
the bandwidth of a large device-to-device copy measured in the same run; attention as TFLOP/s and as a
fraction of a bf16 matmul measured in the same run. Targets (../shared/KERNELS.md): RMSNorm, RoPE, SwiGLU
and cross-entropy at >= 90% of the copy bandwidth; linear cross-entropy within 1.1x the unfused time at a
quarter of its peak memory; attention forward at or above SDPA. After the table, each target with the figure
that decides it, met or missed.

    python benchmarks/kernels.py --check    # correctness only: every Triton op against its fp32 reference, forward
                                            # and backward, at the timed shapes and at odd ones; a table of cases

Each op's module gives `run(quick, device)` (the rows of the table, each implementation checked before it is
timed) and `cases(quick, device)` (the correctness cases of --check).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# one module per op, benchmarks/kernels_<op>.py, with run(quick, device) -> rows and cases(quick, device): adding
# the file adds the op
OPS = sorted(f.stem.removeprefix("kernels_") for f in HERE.glob("kernels_*.py"))


def copy_bandwidth_gbps(device: str) -> float | None:
    "GB/s of a large device-to-device copy, counting read plus write."
    from common import bench
    if not device.startswith("cuda"):
        return None
    x = torch.empty(2**28, dtype=torch.bfloat16, device=device)   # 512 MiB
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x), device)
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9


def matmul_tflops(device: str) -> float | None:
    "TFLOP/s of a large bf16 matmul."
    from common import bench
    if not device.startswith("cuda"):
        return None
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    ms = bench(lambda: a @ b, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


MEMORY_BOUND = ("rms_norm", "rms_norm+residual", "rope", "swiglu", "swiglu (fused gu)", "cross_entropy")
COPY_TARGET = 0.9        # of the copy bandwidth, memory-bound ops, forward and backward


def targets(rows, copy: float | None) -> list[tuple[str, str, str]]:
    "(target, figure, verdict) for each target the rows decide: 'met', 'missed', or why there is no verdict."
    from common import Row
    ours = {(r.op, r.mode): r for r in rows if r.impl == "smollm-triton"}
    out = []
    for op in MEMORY_BOUND:
        for mode in ("fwd", "bwd"):
            r: Row | None = ours.get((op, mode))
            if r is None or r.gbps() is None:
                continue
            if not copy:
                out.append((f"{op} {mode} >= {COPY_TARGET:.0%} of copy", f"{r.gbps():.1f} GB/s",
                            "n/a (no copy bandwidth measured on a CPU)"))
                continue
            frac = r.gbps() / copy
            out.append((f"{op} {mode} >= {COPY_TARGET:.0%} of copy", f"{frac:.0%} ({r.gbps():.0f} GB/s)",
                        "met" if frac >= COPY_TARGET else "missed"))
    lin = {r.impl: r for r in rows if r.op == "linear_cross_entropy" and r.mode == "fwd+bwd"}
    if "smollm-triton" in lin and "eager" in lin:
        a, b = lin["smollm-triton"], lin["eager"]
        t = a.ms / b.ms
        m = (a.peak_mb / b.peak_mb) if (a.peak_mb is not None and b.peak_mb) else None
        fig = f"{t:.2f}x time" + (f", {m:.2f}x peak memory" if m is not None else "")
        verdict = ("n/a (no peak memory on a CPU)" if m is None else
                   "met" if t <= 1.1 and m <= 0.25 else "missed")
        out.append(("linear_cross_entropy fwd+bwd <= 1.1x eager time, <= 0.25x its memory", fig, verdict))
    att = {r.impl: r for r in rows if r.op == "attention" and r.mode == "fwd"}
    if "smollm-triton" in att:
        if "sdpa" in att:
            a, b = att["smollm-triton"], att["sdpa"]
            out.append(("attention fwd >= torch SDPA", f"{b.ms / a.ms:.2f}x SDPA's speed ({a.tflops():.0f} vs "
                        f"{b.tflops():.0f} TFLOP/s)", "met" if a.ms <= b.ms else "missed"))
        else:
            out.append(("attention fwd >= torch SDPA", f"{att['smollm-triton'].ms:.3f} ms",
                        "n/a (SDPA not timed: --quick)"))
    return out


def print_targets(rows, copy) -> None:
    found = targets(rows, copy)
    if not found:
        return
    print("\n| target | figure | verdict |\n|---|---|---|")
    for t in found:
        print("| " + " | ".join(t) + " |")


def check_all(ops, quick: bool, device: str) -> list[str]:
    "Run every op's correctness cases, print a table of them, and return the ops with a failed case."
    print("| op | case | result | s |\n|---|---|---|---|")
    failed = []
    for op in ops:
        try:
            cases = importlib.import_module(f"kernels_{op}").cases(quick, device)
        except Exception as e:  # noqa: BLE001 (the module itself is broken: say so, go on)
            traceback.print_exc()
            print(f"| {op} | (building the cases) | FAILED: {type(e).__name__}: {str(e)[:200]} | |")
            failed.append(op)
            continue
        for name, thunk in cases:
            t0 = time.perf_counter()
            try:
                torch.manual_seed(0)
                thunk()
                result = "ok"
            except Exception as e:  # noqa: BLE001 (one failed case must not hide the others)
                result = f"FAILED: {type(e).__name__}: " + " ".join(str(e).split())[:300]
                if op not in failed:
                    failed.append(op)
            print(f"| {op} | {name} | {result} | {time.perf_counter() - t0:.1f} |", flush=True)
    return failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes on the CPU under the Triton interpreter")
    p.add_argument("--check", action="store_true", help="correctness only (no timing): a table of the cases")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds: an op not started by then is skipped (so that the tables still print)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    ops = args.ops.split(",")
    if args.check:
        print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (interpreter)'}; correctness of "
              "the Triton ops against their fp32 references, forward and backward\n")
        failed = check_all(ops, args.quick, device)
        print(f"\nFAILED: {', '.join(failed)}" if failed else "\nall cases ok")
        return 1 if failed else 0
    from common import print_table
    copy, mm = copy_bandwidth_gbps(device), matmul_tflops(device)
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (interpreter)'}; "
          f"copy {copy and round(copy)} GB/s; bf16 matmul {mm and round(mm)} TFLOP/s\n")
    rows, failed, skipped = [], [], []
    for op in ops:
        t0 = time.perf_counter()
        if args.budget is not None and t0 - t_start > args.budget:
            skipped.append(op)
            print(f"kernels: {op} skipped, the --budget of {args.budget:.0f} s is spent", flush=True)
            continue
        try:
            mine = importlib.import_module(f"kernels_{op}").run(args.quick, device)
            rows += mine
            print_table(mine, copy, mm)   # as it goes: a run stopped later keeps these
        except Exception:  # one broken op must not hide the others' figures
            traceback.print_exc()
            failed.append(op)
        print(f"kernels: {op} done in {time.perf_counter() - t0:.1f} s\n", flush=True)
    print("all ops:")
    print_table(rows, copy, mm)
    print_targets(rows, copy)
    if skipped:
        print(f"\nSKIPPED (out of --budget): {', '.join(skipped)}")
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
    return 1 if failed or skipped else 0


if __name__ == "__main__":
    sys.exit(main())
