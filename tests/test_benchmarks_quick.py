"""The kernel benchmark's --quick mode (CPU, interpreter, tiny sizes) keeps working, so a GPU session can run
the full benchmark without surprises. This checks that it runs and prints a row for every op; it times nothing."""
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
