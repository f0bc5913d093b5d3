"""benchmarks/gpu.py --quick, the GPU session's prepared script at tiny size on the CPU (the kernels under Triton's
interpreter): every part runs and prints its table, so that a session lent a GPU can spend its minutes measuring.
It times nothing: the figures of a CPU run say nothing about the GPU."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPS = ("rms_norm", "rope", "swiglu", "cross_entropy", "linear_cross_entropy", "attention")


def rows(text: str, head: str) -> list[list[str]]:
    "The cells of the rows of the last Markdown table whose header line starts with `head`."
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith(head))
    out = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        out.append([c.strip() for c in line.strip().strip("|").split("|")])
    return out


def test_gpu_script_quick_mode_runs_every_part(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--quick", "--logs", str(tmp_path)],
                         capture_output=True, text=True, timeout=900, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = out.stdout
    assert out.returncode == 0, text[-4000:] + out.stderr[-3000:]

    # the closing table: every part ran and succeeded, and its log is where it says
    summary = rows(text, "| part |")
    assert [r[0] for r in summary] == ["1", "2", "3"] and all(r[2] == "ok" for r in summary), summary
    for r in summary:
        assert (tmp_path / r[4]).stat().st_size > 0, r
    # the summary repeats what decides each part: part 2's targets and part 3's table
    summary_txt = (tmp_path / "summary.txt").read_text()
    assert "| target | figure | verdict |" in summary_txt and "| config | batch |" in summary_txt, summary_txt

    # part 1: a correctness case for every op, each one passed
    part1 = (tmp_path / "1-correctness.txt").read_text()
    cases = rows(part1, "| op | case |")
    for op in OPS:
        assert any(r[1].startswith(op + " ") or r[1].startswith(op + "+") for r in cases), f"no case for {op}:\n{part1}"
    assert cases and all(r[2] == "ok" for r in cases), part1

    # part 2: rows for every op and implementation, then the targets
    part2 = (tmp_path / "2-kernels.txt").read_text()
    table = rows(part2, "| op | mode | impl |")
    for op in OPS:
        impls = {r[2] for r in table if r[0].startswith(op)}
        assert {"smollm-triton", "eager"} <= impls, f"{op}: {impls}\n{part2}"
    targets = {r[0] for r in rows(part2, "| target |")}
    assert {"rms_norm fwd >= 90% of copy", "attention fwd >= torch SDPA"} <= targets, targets

    # part 3: a row per configuration, with figures, except Triton under torch.compile (the interpreter cannot)
    part3 = (tmp_path / "3-tinyllama.txt").read_text()
    configs = {r[0]: r for r in rows(part3, "| config |")}
    assert set(configs) == {"triton", "torch", "triton+compile", "torch+compile", "triton+fused"}, configs
    assert configs["triton+compile"][-1].startswith("skipped"), configs["triton+compile"]
    for name in ("triton", "torch", "torch+compile", "triton+fused"):
        assert float(configs[name][2].replace(",", "")) > 0, configs[name]          # tokens/s
    # the same weights, data and seed: the first losses agree whichever kernels run (fp32 here)
    first = [float(configs[n][8].split("->")[0]) for n in ("triton", "torch", "torch+compile", "triton+fused")]
    assert max(first) - min(first) < 1e-3, first
