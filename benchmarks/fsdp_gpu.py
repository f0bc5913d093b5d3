"""One GPU under FSDP2: tinyllama_1b at sequence 2048 in bf16 for a few dozen steps, through smollm's training loop.

The run is `smollm.train.train` on a composed config (`trainer=gpu trainer.parallel=fsdp model=tinyllama_1b`, on
synthetic MQAR data of TinyLlama's vocabulary, so no tokenizer or corpus is built), in a torchrun world of one
process. It prints tokens/s, MFU against a bf16 matmul timed in the same process before training (and against the
datasheet peak), and peak memory, beside the anchor: TinyLlama reports 24k tokens/s per A100-40G at 56% MFU
(Zhang et al., 2024); the goal on one H200 is 60k tokens/s.

    python benchmarks/fsdp_gpu.py                   # the GPU run: re-launches itself under torchrun (one process)
    python benchmarks/fsdp_gpu.py --batch 32 --ac   # activation checkpointing in every block, a larger micro-batch
    python benchmarks/fsdp_gpu.py --quick           # the same path on a CPU at tiny size (gloo, fp32), for CI

tokens/s is the median over the metrics.csv windows after the first (the first holds the one-off costs: CUDA
context, kernel autotuning, compilation); the run ends with smollm's usual final evaluation and checkpoint, which
are not timed, in a temporary run folder that is removed afterwards (--keep keeps it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ANCHOR_TOKENS_PER_S, ANCHOR_MFU = 24_000, 0.56      # TinyLlama, per A100-40G (its README's throughput table)
GOAL_TOKENS_PER_S = 60_000                          # one H200, this project's goal
ARGV = "SMOLLM_FSDP_GPU_ARGV"                       # this script's arguments, handed to its torchrun processes


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU, model=tiny, a few steps: checks the path, times nothing")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 40; --quick 6)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step and GPU (default 16; --quick 4)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; --quick 64)")
    p.add_argument("--ac", action="store_true", help="trainer.activation_checkpointing=true")
    p.add_argument("--compile", action="store_true", help="trainer.compile_blocks=true (torch.compile each block)")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) for torchrun --nproc_per_node")
    p.add_argument("--timeout", type=float, default=420, help="seconds before the torchrun launch is stopped")
    p.add_argument("--out", default=None, help="the run folder (default: a temporary one, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the run folder")
    p.add_argument("overrides", nargs="*", help="more smollm-train overrides, e.g. model.kernels=torch")
    a = p.parse_args(argv)
    a.steps = a.steps or (6 if a.quick else 40)
    a.batch = a.batch or (4 if a.quick else 16)
    a.seq = a.seq or (64 if a.quick else 2048)
    return a


def overrides(a: argparse.Namespace) -> list[str]:
    "The smollm-train overrides of this run."
    size = (["model=tiny", "trainer=cpu", "data.vocab_size=64", "data.num_kv_pairs=4"] if a.quick else
            ["model=tinyllama_1b", "trainer=gpu", "data.vocab_size=32000", "data.num_kv_pairs=64"])
    every = max(1, a.steps // 8)
    return [*size, "data=mqar", f"model.block_size={a.seq}", "trainer.parallel=fsdp",
            f"trainer.activation_checkpointing={str(a.ac).lower()}", f"trainer.compile_blocks={str(a.compile).lower()}",
            f"trainer.batch_size={a.batch}", f"trainer.max_steps={a.steps}", f"trainer.log_every={every}",
            f"trainer.eval_every={a.steps}", "trainer.eval_batches=1", f"trainer.ckpt_every={a.steps}",
            "trainer.samples=0", "trainer.progress=false", "optim.lr=4e-4", f"schedule.warmup_steps={min(10, a.steps)}",
            *a.overrides]


def launch(a: argparse.Namespace, argv: list[str]) -> int:
    "Run this script again under torchrun (--standalone, a.nproc processes) in a run folder they share."
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="smollm-fsdp-"))
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun if torchrun.exists() else "torchrun"), "--standalone", f"--nproc_per_node={a.nproc}", __file__]
    # The arguments travel in the environment: torchrun's own parser would take --nproc for an abbreviation of its own.
    env = {**os.environ, ARGV: json.dumps([*argv, "--out", str(out)])}
    try:
        return subprocess.run(cmd, env=env, timeout=a.timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"fsdp_gpu: stopped after --timeout {a.timeout:.0f} s", file=sys.stderr)
        return 124
    finally:
        if not a.out and not a.keep: shutil.rmtree(out, ignore_errors=True)


def matmul_flops(device, dtype, n: int, reps: int = 20, rounds: int = 5) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` on `device`, the best of `rounds` rounds of `reps`: what this device
    does at best, measured here and now (after a warm-up, so that the clocks have risen)."""
    import torch
    x, w = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(reps): x @ w
    best = float("inf")
    for _ in range(rounds):
        sync(); t0 = time.perf_counter()
        for _ in range(reps): x @ w
        sync(); best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 * reps / best


def peak_memory(device) -> str:
    "Peak memory of this process: CUDA memory allocated by torch, or the CPU's resident set."
    import torch
    if device.type == "cuda":
        return (f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB allocated "
                f"({torch.cuda.max_memory_reserved(device) / 2**30:.1f} GiB reserved)")
    import resource
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident (CPU)"


def run(a: argparse.Namespace):
    "One rank of the torchrun world: measure the matmul, train, and (rank 0) print the figures."
    import torch
    from smollm.config import compose
    from smollm.runs import read_metrics
    from smollm.train import PEAK_FLOPS, train
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = not a.quick
    if cuda and not torch.cuda.is_available():
        sys.exit("fsdp_gpu: no CUDA device here; --quick runs the same path on the CPU")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda: torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    measured = matmul_flops(device, dtype, 8192 if cuda else 256)
    cfg = compose(overrides(a))
    if cuda: torch.cuda.reset_peak_memory_stats(device)
    summary = train(cfg, a.out)
    memory = peak_memory(device)
    if rank != 0: return
    rows = read_metrics(Path(a.out) / "metrics.csv")
    windows = [r["tokens_per_s"] for r in rows[1:] if r.get("tokens_per_s")] or [summary["tokens_per_s"]]
    tps = statistics.median(windows) / world if windows[0] else None   # the rows count the tokens of every rank
    flops = json.loads((Path(a.out) / "run.json").read_text())["flops_per_token"]   # what the trainer's MFU uses
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    sheet = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    losses = [r["train_loss"] for r in rows if r.get("train_loss") is not None]
    print(f"\nfsdp_gpu: {cfg.model.name} ({summary['params']:,} parameters), {world} x {name}, FSDP2, "
          f"{cfg.trainer.precision}, {a.batch} x {a.seq} tokens per step and device, activation checkpointing "
          f"{'on' if a.ac else 'off'}, compile {'on' if a.compile else 'off'}, {summary['step']} steps")
    print(f"{'bf16' if cuda else 'fp32'} matmul {8192 if cuda else 256}^3 measured here: {measured / 1e12:.3g} TFLOP/s"
          + (f" (datasheet {sheet / 1e12:.0f})" if sheet else ""))
    print("| figure | this run | TinyLlama (A100-40G) | goal (H200) |")
    print("|---|---|---|---|")
    print(f"| tokens/s per device | {tps:,.0f} | {ANCHOR_TOKENS_PER_S:,} | {GOAL_TOKENS_PER_S:,} |")
    print(f"| MFU against the measured matmul | {tps * flops / measured:.1%} | | |")
    if sheet: print(f"| MFU against the datasheet peak | {tps * flops / sheet:.1%} | {ANCHOR_MFU:.0%} | |")
    print(f"| peak memory | {memory} | 40 GiB card | 141 GB card |")
    print(f"| train loss, first and last window | {losses[0]:.3f} -> {losses[-1]:.3f} | | |")
    print(f"(tokens/s: median of {len(windows)} windows of {cfg.trainer.log_every} steps after the first; "
          f"{flops / 1e9:.3g} GFLOP per token: smollm.train.flops_per_token)")


def main(argv=None):
    argv = json.loads(os.environ[ARGV]) if ARGV in os.environ else sys.argv[1:] if argv is None else argv
    a = parse(argv)
    if "LOCAL_RANK" not in os.environ:          # not under torchrun yet
        sys.exit(launch(a, argv))
    if a.out is None: sys.exit("fsdp_gpu: under torchrun, give every rank the same --out folder")
    run(a)


if __name__ == "__main__":
    main()
