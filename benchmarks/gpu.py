"""The GPU session's prepared script: smollm's Triton kernels checked, then timed, then TinyLlama-1.1B trained, in one
run under one budget (8 minutes on one H200 by default).

    python benchmarks/gpu.py                    # on the GPU (what `bash benchmarks/gpu.sh run` calls)
    python benchmarks/gpu.py --parts 1,3        # some of the parts
    python benchmarks/gpu.py --tinyllama "--configs triton+compile --batch 24"   # arguments for a part's script
    python benchmarks/gpu.py --quick            # every part at tiny size on a CPU, kernels under Triton's interpreter

The parts, in order, each a process of its own under its own timeout (a part that fails or runs out of time is
reported, and the next part still runs), each printing a table:

1. correctness (`kernels.py --check`): every Triton op (rms_norm, rope, swiglu, cross_entropy, linear_cross_entropy,
   attention) against its fp32 reference, forward and backward, at the timed shapes and at odd ones;
2. kernel benchmarks (`kernels.py`): each op against eager PyTorch, torch.compile and Liger-Kernel (when installed),
   forward, backward and both, in GB/s against a device copy and TFLOP/s against a bf16 matmul measured in the same
   run, then the targets (RMSNorm, RoPE, SwiGLU, cross-entropy >= 90% of the copy bandwidth; attention forward >=
   SDPA; the fused lm head + loss within 1.1x the unfused time at a quarter of its memory), met or missed;
3. TinyLlama-1.1B throughput (`tinyllama_gpu.py`): smollm's training step at sequence 2048 in bf16 with AdamW,
   Triton kernels on and off, torch.compile on and off: tokens/s, MFU, peak memory (target: >= 60k tokens/s).

Each part's output goes to the console and, as it comes, to DIR/<n>-<name>.txt (DIR: --logs, else $OUT, where
the device tool collects files, else gpu-logs/); DIR/summary.txt gets the closing summary: what decides each part
(failed cases, the targets table, the TinyLlama table) and a table of the parts. A part's timeout is the
smaller of its cap and what the budget leaves after setting aside the later parts' minimum; time a part does not
use goes to the next ones. Exit status 0 when every part succeeded.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNNING: list[subprocess.Popen] = []      # the part running now, whose process group a SIGTERM to this script ends


def _stop(signum, frame):
    "On SIGTERM (gpu.sh's timeout): end the running part's whole process group too, then exit."
    for p in RUNNING:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(128 + signum)


@dataclass
class Part:
    key: str
    name: str
    what: str
    script: str
    args: tuple[str, ...]
    cap: float | None         # the most seconds it gets (None: whatever the budget leaves)
    reserve: float            # the seconds set aside for it while the parts before it run
    estimate: str             # a guess at its time on one H200 (not yet measured there), for the closing table


PARTS = (
    Part("1", "correctness", "Triton kernels against their references, fwd and bwd", "kernels.py", ("--check",),
         cap=120, reserve=45, estimate="~30-60 s (the first compile of every kernel, attention's autotuning)"),
    Part("2", "kernels", "kernel benchmarks vs eager, torch.compile, Liger", "kernels.py", (),
         cap=210, reserve=100, estimate="~120-180 s (mostly torch.compile of the eight references)"),
    Part("3", "tinyllama", "TinyLlama-1.1B training throughput", "tinyllama_gpu.py", (),
         cap=None, reserve=150, estimate="~200-260 s (5 configurations; a compiled one ~60-90 s)"),
)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every part at tiny size on the CPU (what CI runs)")
    p.add_argument("--parts", default=",".join(x.key for x in PARTS), help="comma-separated, of 1, 2, 3")
    p.add_argument("--budget", type=float, default=None, help="seconds for all the parts (default 480; --quick 900)")
    p.add_argument("--logs", default=None, help="the folder of the logs (default $OUT, else gpu-logs)")
    p.add_argument("--kernels", default="", help="more arguments for kernels.py (parts 1 and 2), e.g. '--ops rope'")
    p.add_argument("--tinyllama", default="", help="more arguments for tinyllama_gpu.py (part 3)")
    a = p.parse_args(argv)
    a.budget = a.budget or (900 if a.quick else 480)
    keys = [k.strip() for k in a.parts.split(",") if k.strip()]
    bad = [k for k in keys if k not in {x.key for x in PARTS}]
    if bad: p.error(f"--parts: {bad} not among 1, 2, 3")
    a.selected = [x for x in PARTS if x.key in keys]
    a.logs = Path(a.logs or os.environ.get("OUT") or "gpu-logs")
    return a


def run_part(cmd: list[str], log: Path, timeout: float) -> tuple[str, float]:
    """Run `cmd` in a session of its own, its output copied line by line to the console and to `log`; stop it (its
    whole process group: compile workers, torchrun children) after `timeout` s. Returns (status, seconds)."""
    t0 = time.monotonic()
    with open(log, "w", buffering=1) as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=HERE.parent)
        RUNNING[:] = [p]

        def pump():
            for line in p.stdout:
                sys.stdout.write(line); sys.stdout.flush()
                f.write(line)
        t = threading.Thread(target=pump, daemon=True)
        t.start()
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            t.join(5)
            f.write(f"\n[gpu.py: stopped after its timeout of {timeout:.0f} s]\n")
            return f"timed out ({timeout:.0f} s)", time.monotonic() - t0
        t.join(10)
    return ("ok" if rc == 0 else f"failed (exit {rc})"), time.monotonic() - t0


def digest(key: str, log: str) -> list[str]:
    """The lines of a part's log that say how it went, for the closing summary: (1) the cases that failed and the
    verdict; (2) the device line (copy bandwidth, matmul) and the targets table; (3) the TinyLlama table."""
    lines = log.splitlines()
    if key == "1":
        return [x for x in lines if x.startswith("| ") and "FAILED" in x] + \
               [x for x in lines if x.startswith(("all cases ok", "FAILED:"))][-1:]
    if key == "2":
        start = max((i for i, x in enumerate(lines) if x.startswith("| target |")), default=len(lines))
        return [x for x in lines if x.startswith("device:")][:1] + [x for x in lines[start:] if x.startswith("|")] + \
               [x for x in lines if x.startswith(("FAILED:", "SKIPPED"))]
    start = max((i for i, x in enumerate(lines) if x.startswith("tinyllama_gpu: ") and "AdamW" in x), default=None)
    return [] if start is None else [x for x in lines[start:] if x.strip()]


def main(argv=None) -> int:
    a = parse(argv)
    signal.signal(signal.SIGTERM, _stop)
    a.logs.mkdir(parents=True, exist_ok=True)
    deadline, done = time.monotonic() + a.budget, []
    print(f"gpu.py: parts {', '.join(x.key for x in a.selected)}{' (--quick, CPU)' if a.quick else ''}; budget "
          f"{a.budget:.0f} s; logs in {a.logs}", flush=True)
    for i, part in enumerate(a.selected):
        later = sum(x.reserve for x in a.selected[i + 1:])
        left = deadline - time.monotonic()
        timeout = min(part.cap or float("inf"), left - later)
        if timeout < min(part.reserve, 20):
            done.append((part, f"skipped ({left:.0f} s of the budget left)", 0.0))
            print(f"\n==== part {part.key}: {part.what}: skipped, {left:.0f} s of the budget left", flush=True)
            continue
        extra = shlex.split(a.kernels if part.script == "kernels.py" else a.tinyllama)
        if part.key in ("2", "3"):   # a budget of its own inside the timeout, so that it prints its tables
            extra = ["--budget", f"{max(10.0, timeout - (60 if part.key == '2' else 15)):.0f}", *extra]
        cmd = [sys.executable, str(HERE / part.script), *part.args, *(["--quick"] if a.quick else []), *extra]
        print(f"\n==== part {part.key}: {part.what} (timeout {timeout:.0f} s)\n$ {shlex.join(cmd)}", flush=True)
        status, secs = run_part(cmd, a.logs / f"{part.key}-{part.name}.txt", timeout)
        done.append((part, status, secs))
        print(f"==== part {part.key}: {status} in {secs:.0f} s", flush=True)
    lines = []
    for p, status, _ in done:
        log = a.logs / f"{p.key}-{p.name}.txt"
        if log.exists():
            lines += [f"part {p.key}, {p.what}: {status}", *digest(p.key, log.read_text(errors="replace")), ""]
    lines += ["| part | what | status | s | log | guessed for one H200 |", "|---|---|---|---|---|---|"]
    lines += [f"| {p.key} | {p.what} | {status} | {secs:.0f} | {p.key}-{p.name}.txt | {p.estimate} |"
              for p, status, secs in done]
    total = a.budget - (deadline - time.monotonic())
    lines.append(f"total {total:.0f} s of a budget of {a.budget:.0f} s")
    print("\n==== summary\n" + "\n".join(lines), flush=True)
    (a.logs / "summary.txt").write_text("\n".join(lines) + "\n")
    return 0 if all(status == "ok" for _, status, _ in done) else 1


if __name__ == "__main__":
    sys.exit(main())
