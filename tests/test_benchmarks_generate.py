"""benchmarks/generate.py --quick (the tiny model, CPU) keeps working: it runs, prints a row for every impl and dtype
asked for, with positive rates and limits, and the impls' greedy tokens agree. It times nothing."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def quick(*args: str) -> list[list[str]]:
    "Run the benchmark with --quick and `args`; the cells of its table's rows."
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generate.py"), "--quick", *args],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert lines and lines[0].startswith("| size | dtype | impl | tokens/s"), out.stdout
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]


def check_rows(rows, impls, dtypes):
    assert [(r[1], r[2]) for r in rows] == [(d, i) for d in dtypes for i in impls], rows
    for size, dtype, impl, tps, ms, limit, frac, vs_hf, match in rows:
        assert float(tps) > 0 and float(ms) > 0 and float(limit) > 0 and float(frac) > 0, (impl, dtype)
        got, new = map(int, match.split("/"))
        assert new > 0 and got == new, f"{impl} {dtype}: greedy tokens agree for {match} only"


def test_generate_benchmark_quick_eager():
    impls = ["smollm", "transformers"]
    check_rows(quick("--impls", ",".join(impls)), impls, ["fp32", "bf16"])


def test_generate_benchmark_quick_smollm_compiled():
    check_rows(quick("--impls", "smollm,smollm-compiled", "--dtype", "bf16"), ["smollm", "smollm-compiled"], ["bf16"])


@pytest.mark.slow
def test_generate_benchmark_quick_all():
    # transformers compiled takes ~40 s to compile the tiny model per dtype
    check_rows(quick(), ["smollm", "smollm-compiled", "transformers", "transformers-compiled"], ["fp32", "bf16"])
