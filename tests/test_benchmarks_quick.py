"""The GPU benchmarks' --quick modes (CPU, tiny sizes; the kernels under the interpreter) keep working, so a GPU session
can run the full benchmarks without surprises. These check that each runs and prints its rows; they time nothing."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_kernel_benchmark_quick_mode_runs():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--quick"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")][1:]
    ops = {line.split("|")[1].strip() for line in table}
    for op in ("rms_norm", "rope", "swiglu", "cross_entropy", "linear_cross_entropy", "attention"):
        assert any(o.startswith(op) for o in ops), f"no row for {op} in:\n{out.stdout}"


def test_fsdp_gpu_benchmark_quick_mode_runs():
    # benchmarks/fsdp_gpu.py --quick: the GPU benchmark's path (torchrun, trainer.parallel=fsdp, smollm.train.train,
    # the figures table) on the CPU at tiny size; one process, so that it stays a few seconds.
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fsdp_gpu.py"), "--quick"], capture_output=True,
                         text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "fsdp over gloo" in out.stdout, out.stdout                 # the run was sharded, not a plain process
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in out.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| figure")}
    assert float(rows["tokens/s per device"].replace(",", "")) > 0
    assert 0 < float(rows["MFU against the measured matmul"].rstrip("%")) < 100
    assert rows["peak memory"].endswith("resident (CPU)")
