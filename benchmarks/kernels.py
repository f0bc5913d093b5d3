"""Check and benchmark every fused kernel against its peers, in one run.

    python benchmarks/kernels.py            # on a GPU: correctness first, then the full table (a few minutes)
    python benchmarks/kernels.py --quick    # on a CPU under TRITON_INTERPRET=1, tiny sizes (what CI runs)

Memory-bound ops are reported as achieved GB/s (bytes that must move / median time) and as a fraction of
the bandwidth of a large device-to-device copy measured in the same run; attention as TFLOP/s and as a
fraction of a bf16 matmul measured in the same run. Targets (../shared/KERNELS.md): RMSNorm, RoPE, SwiGLU
and cross-entropy at >= 90% of the copy bandwidth; linear cross-entropy within 1.1x the unfused time at a
quarter of its peak memory; attention forward at or above SDPA.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# one benchmark module per op, benchmarks/kernels_<op>.py, each with run(quick, device) -> rows: adding the file adds the op
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes on the CPU under the Triton interpreter")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from common import print_table
    copy, mm = copy_bandwidth_gbps(device), matmul_tflops(device)
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (interpreter)'}; "
          f"copy {copy and round(copy)} GB/s; bf16 matmul {mm and round(mm)} TFLOP/s\n")
    rows, failed = [], []
    for op in args.ops.split(","):
        try:
            mod = importlib.import_module(f"kernels_{op}")
            rows += mod.run(args.quick, device)
        except Exception:  # one broken op must not hide the others' figures
            traceback.print_exc()
            failed.append(op)
    print_table(rows, copy, mm)
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
