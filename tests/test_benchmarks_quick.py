"""benchmarks/fsdp_gpu.py --quick keeps working, so a GPU session can run it without surprises (kernels.py --quick runs
as part 2 of tests/test_benchmarks_gpu.py). It checks that the script runs and prints its rows; it times nothing."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
