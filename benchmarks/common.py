"""Shared helpers for the benchmarks: timing, peak memory, and the result table.

On a GPU, times are the median of `triton.testing.do_bench`; on a CPU (the `--quick` mode that CI
runs, and the CPU benchmarks) the median of repeated wall-clock runs after a warm-up.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def bench(fn, device: str = "cpu", warmup: int = 2, reps: int = 7) -> float:
    "Median milliseconds of `fn()`."
    if str(device).startswith("cuda"):
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_mb(fn, device: str = "cpu") -> float | None:
    "Peak CUDA memory (MiB) allocated while running `fn()`, above what was allocated before; None on a CPU."
    if not str(device).startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@dataclass
class Row:
    op: str                      # e.g. "rms_norm"
    mode: str                    # "fwd", "bwd" or "fwd+bwd"
    impl: str                    # "smollm-triton", "eager", "compile", "liger", ...
    ms: float
    bytes_moved: float | None = None   # bytes that must move, for memory-bound ops
    flops: float | None = None         # for compute-bound ops (attention, matmul)
    peak_mb: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    def gbps(self) -> float | None:
        return None if self.bytes_moved is None else self.bytes_moved / (self.ms * 1e-3) / 1e9

    def tflops(self) -> float | None:
        return None if self.flops is None else self.flops / (self.ms * 1e-3) / 1e12


def print_table(rows: list[Row], copy_gbps: float | None = None, matmul_tflops: float | None = None) -> None:
    "Print rows as a Markdown table, with bandwidth as a fraction of a device copy and FLOP/s of a matmul."
    head = "| op | mode | impl | ms | GB/s | % copy | TFLOP/s | % matmul | peak MiB | note |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        g, t = r.gbps(), r.tflops()
        fmt = lambda v, f: "" if v is None else format(v, f)
        pc = (100 * g / copy_gbps) if (g is not None and copy_gbps) else None
        pm = (100 * t / matmul_tflops) if (t is not None and matmul_tflops) else None
        print(f"| {r.op} | {r.mode} | {r.impl} | {r.ms:.3f} | {fmt(g, '.0f')} | {fmt(pc, '.0f')} | "
              f"{fmt(t, '.1f')} | {fmt(pm, '.0f')} | {fmt(r.peak_mb, '.0f')} | {r.note} |")
