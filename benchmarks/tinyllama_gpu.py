"""TinyLlama-1.1B training throughput on one GPU: smollm's Triton kernels on and off, torch.compile on and off.

Each configuration is smollm's own training step (`smollm.train.set_up` and `train_step`: bf16 autocast, AdamW, the
gradient clipping, the loss the model computes) on `model=tinyllama_1b` at sequence 2048, in a process of its own
(a failure or a hang in one, say a compile error, costs that row only) under a timeout cut from the budget. The
data are uniformly random tokens with a target at every position, drawn in a few microseconds per batch, so that
the step is the model's and the loss's work only (as in pretraining; MQAR's few targets would not be).

    python benchmarks/tinyllama_gpu.py                       # on the GPU: the five configurations, then the table
    python benchmarks/tinyllama_gpu.py --configs triton+compile --steps 10
    python benchmarks/tinyllama_gpu.py --quick               # the same path on a CPU (model=tiny, fp32), for CI

A configuration is `KERNELS[+fused][+compile]`: KERNELS is model.kernels (triton: smollm's fused kernels for the
norms, RoPE, SwiGLU and the lm head + cross-entropy; torch: their plain-PyTorch references); attention is torch's
SDPA (TinyLlama's `backend: sdpa`) unless +fused (model.attention.backend=fused: smollm's Triton attention); +compile
switches on torch.compile: `--compile blocks` (the default, trainer.compile_blocks=true: one compile of the block
code serves all 22 identical blocks, so it costs the least of the budget) or `--compile loss` (trainer.compile=true:
the whole loss, embedding to cross-entropy, one graph). The step-1 losses of all configurations should agree
(same seed, same weights, same data): a check that the kernels compute the same model.
The first `--warmup` steps (the first pays for autotuning and compiling, a later one for any recompile; their
seconds are reported) are not timed; tokens/s is batch x seq over the median of the `--steps` timed steps, each
closed by a device synchronisation. MFU is tokens/s x `smollm.train.flops_per_token` (6 N + the attention's
12 x heads x head_dim x seq per layer) over the datasheet peak (`smollm.train.PEAK_FLOPS`) and over a bf16 matmul measured in the same
process. A configuration that runs out of memory is run again at half the batch (said in its row).

Targets (issue 14): 60k tokens/s or more on one H200; TinyLlama reports 24k tokens/s per A100-40G at 56% MFU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fsdp_gpu import ANCHOR_MFU, ANCHOR_TOKENS_PER_S, GOAL_TOKENS_PER_S, matmul_flops  # noqa: E402

FLOOR = {False: 30, True: 60}      # seconds set aside for a configuration, eager / compiled, while others run
CAP = {False: 120, True: 200}      # the most one may take
RUNNING: list = []                 # the configuration's process now running
# the order they run in: the cheap ones first, then the compiled ones, then the Triton attention in the whole model
CONFIGS = ("triton", "torch", "triton+compile", "torch+compile", "triton+fused")
RESULT = "TINYLLAMA_RESULT "                                       # the line a configuration's process reports on


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU, model=tiny with one layer, fp32, two steps")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {CONFIGS}")
    p.add_argument("--compile", choices=("blocks", "loss"), default="blocks",
                   help="what +compile compiles: each block (trainer.compile_blocks) or the loss (trainer.compile)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 16; --quick 1)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; --quick 16)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 6; --quick 1)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all the configurations together (default 300; --quick 240)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)   # internal: run this configuration and report
    a = p.parse_args(argv)
    a.batch = a.batch or (1 if a.quick else 16)
    a.seq = a.seq or (16 if a.quick else 2048)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 3)
    a.steps = a.steps or (1 if a.quick else 6)
    a.budget = a.budget or (240 if a.quick else 300)
    a.configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    bad = [c for c in a.configs if c not in CONFIGS]
    if bad: p.error(f"--configs: {bad} not among {CONFIGS}")
    if a.warmup < 1: p.error("--warmup: at least 1 (the first step pays for autotuning and compiling)")
    return a


def is_compiled(config: str) -> bool:
    return "compile" in config.split("+")[1:]


def overrides(a: argparse.Namespace, config: str) -> list[str]:
    "The smollm-train overrides of one configuration."
    kernels, flags = config.split("+")[0], config.split("+")[1:]
    size = (["model=tiny", "model.n_layers=1", "trainer=cpu", "trainer.precision=fp32", "data.vocab_size=256"]
            if a.quick else ["model=tinyllama_1b", "trainer=gpu", "trainer.precision=bf16", "data.vocab_size=32000"])
    # --quick compiles with aot_eager: dynamo's and AOTAutograd's path, without inductor's slow C++ builds on a CPU
    backend = "aot_eager" if a.quick else "true"
    comp = ([f"trainer.compile_blocks={backend}"] if a.compile == "blocks" else ["trainer.compile=true"]) \
        if "compile" in flags else []
    fused = ["model.attention.backend=fused"] if "fused" in flags else []
    return [*size, "data=mqar", "data.num_kv_pairs=4", f"model.block_size={a.seq}", f"model.kernels={kernels}", *fused,
            f"trainer.batch_size={a.batch}", f"trainer.max_steps={a.warmup + a.steps}", "trainer.eval_batches=1",
            "trainer.samples=0", "trainer.progress=false", "optim.lr=3e-4", *comp]


def random_tokens(vocab_size: int):
    "A smollm data source of uniformly random tokens, every position a target (made here: smollm is imported late)."
    import torch
    from smollm.data import DataSource, seeded_generator

    class RandomTokens(DataSource):
        kind = "random"

        def __init__(self, vocab_size):
            self.vocab_size = vocab_size

        def batch(self, split, step, batch_size, block_size, seed, rank=0, world_size=1):
            self._check_batch(split, step, batch_size, block_size, rank, world_size)
            ids = torch.randint(0, self.vocab_size, (batch_size, block_size + 1),
                                generator=seeded_generator("random-tokens", split, seed, step, rank))
            return ids[:, :-1], ids[:, 1:]

        def unigram_loss(self):
            return math.log(self.vocab_size)

        def describe(self):
            return f"random tokens, vocab {self.vocab_size}"

    return RandomTokens(vocab_size)


def measure(a: argparse.Namespace, config: str) -> dict:
    "Build the run of `config`, take the warm-up and the timed steps, and return its figures."
    import torch
    from smollm.config import compose
    from smollm.train import set_up, train_step
    cuda = not a.quick
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device here; --quick runs the same path on the CPU")
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    measured = matmul_flops(device, torch.bfloat16 if cuda else torch.float32, 8192 if cuda else 256)
    cfg = compose(overrides(a, config))
    with tempfile.TemporaryDirectory(prefix="smollm-tinyllama-") as d:
        t0 = time.perf_counter()
        run = set_up(cfg, d, source=random_tokens(cfg.model.vocab_size))
        build_s = time.perf_counter() - t0
        if cuda: torch.cuda.reset_peak_memory_stats(device)
        times, losses = [], []
        for i in range(a.warmup + a.steps):
            sync(); t0 = time.perf_counter()
            loss = train_step(run)[0]
            sync(); times.append(time.perf_counter() - t0)
            losses.append(loss)
            print(f"tinyllama_gpu {config}: step {i + 1} {times[-1]:.3f} s, loss {loss:.3f}", flush=True)
        step_s = statistics.median(times[a.warmup:])
        tps = a.batch * a.seq / step_s
        timed = times[a.warmup:]
        # a timed step far slower than the median is a recompile or a stall that the warm-up did not absorb
        note = f"slowest timed step {max(timed) / step_s:.1f}x the median" if max(timed) > 1.5 * step_s else ""
        return dict(config=config, tokens_per_s=tps, step_s=step_s, first_step_s=times[0], build_s=build_s,
                    warmup_s=sum(times[:a.warmup]), note=note,
                    mfu_sheet=(tps * run.flops / run.peak) if run.peak else None,
                    mfu_measured=tps * run.flops / measured,
                    matmul_tflops=measured / 1e12, flops_per_token=run.flops, params=run.model.num_params(),
                    peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
                    loss_first=losses[0], loss_last=losses[-1], batch=a.batch, seq=a.seq,
                    precision=cfg.trainer.precision,
                    device=torch.cuda.get_device_name(device) if cuda else "CPU")


def child(a: argparse.Namespace):
    "The process of one configuration: its figures as one JSON line; out of memory says so on that line too."
    if a.quick:
        from smollm.kernels.core import interpreter_without_gpu
        interpreter_without_gpu()          # before anything (torch.compile, the kernels) imports triton
    try:
        out = measure(a, a.one)
    except Exception as e:     # noqa: BLE001 (reported, then the parent goes on with the next configuration)
        import torch
        if isinstance(e, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(e):   # also when compile wraps it
            out = dict(config=a.one, oom=True, error=f"out of memory at batch {a.batch}")
        else:
            import traceback
            traceback.print_exc()
            out = dict(config=a.one, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
    print(RESULT + json.dumps(out), flush=True)


def launch(a: argparse.Namespace, argv: list[str], config: str, batch: int, timeout: float) -> dict:
    "Run `config` in a process of its own under `timeout` seconds; its result line, or what went wrong."
    cmd = [sys.executable, __file__, *argv, "--one", config, "--batch", str(batch)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             start_new_session=True)
    except OSError as e:
        return dict(config=config, error=str(e))
    RUNNING[:] = [p]
    result, deadline = None, time.monotonic() + timeout
    import threading
    lines = []

    def pump():
        for line in p.stdout:
            lines.append(line)
            if not line.startswith(RESULT): print(line, end="", flush=True)
    t = threading.Thread(target=pump, daemon=True); t.start()
    try:
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        import signal
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        t.join(5)
        return dict(config=config, error=f"stopped after its timeout of {timeout:.0f} s")
    t.join(5)
    for line in lines:
        if line.startswith(RESULT): result = json.loads(line[len(RESULT):])
    return result or dict(config=config, error=f"exited with status {p.returncode} and no result")


def table(results: list[dict], a: argparse.Namespace) -> None:
    "The figures of every configuration, with the goal and TinyLlama's own figure beside them."
    ok = [r for r in results if "error" not in r and "skipped" not in r]
    head = ok[0] if ok else {}
    print(f"\ntinyllama_gpu: " + (f"{head['params']:,} parameters, {head['precision']}, " if head else "")
          + f"seq {a.seq}, AdamW; "
          f"{a.warmup} warm-up + {a.steps} timed steps per configuration; +compile = "
          f"{'trainer.compile_blocks' if a.compile == 'blocks' else 'trainer.compile'}"
          + (f"; {head['device']}, {'bf16' if head['precision'] == 'bf16' else 'fp32'} matmul measured "
             f"{head['matmul_tflops']:.3g} TFLOP/s" if head else ""))
    print("| config | batch | tokens/s | s/step | MFU (datasheet) | MFU (measured matmul) | peak GiB "
          "| warm-up s (step 1) | loss first -> last | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v, f: "" if v is None else format(v, f)
    for r in results:
        if "error" in r or "skipped" in r:
            why = f"failed: {r['error']}" if "error" in r else f"skipped: {r['skipped']}"
            print(f"| {r['config']} |  |  |  |  |  |  |  |  | {why} |")
            continue
        note = r.get("note", "")
        print(f"| {r['config']} | {r['batch']} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | "
              f"{fmt(r['mfu_sheet'] and 100 * r['mfu_sheet'], '.1f')}{'%' if r['mfu_sheet'] else ''} | "
              f"{100 * r['mfu_measured']:.1f}% | {fmt(r['peak_gib'], '.1f')} | "
              f"{r['warmup_s']:.1f} ({r['first_step_s']:.1f}) | "
              f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} | {note} |")
    if len(ok) > 1:
        first = [r["loss_first"] for r in ok]
        print(f"step-1 losses (same weights, data and seed) agree within {max(first) - min(first):.2g}")
    best = max(ok, key=lambda r: r["tokens_per_s"], default=None)
    if best:
        met = "met" if best["tokens_per_s"] >= GOAL_TOKENS_PER_S else "missed"
        print(f"target: >= {GOAL_TOKENS_PER_S:,} tokens/s on one H200; best {best['config']} "
              f"{best['tokens_per_s']:,.0f}: {met if not a.quick else 'n/a (CPU, --quick)'}. TinyLlama: "
              f"{ANCHOR_TOKENS_PER_S:,} tokens/s per A100-40G at {ANCHOR_MFU:.0%} MFU. "
              f"({head['flops_per_token'] / 1e9:.3g} GFLOP per token: smollm.train.flops_per_token)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    if a.one:
        child(a)
        return 0
    import signal

    def stop(signum, frame):       # stopped from outside (gpu.py's timeout): the running configuration goes too
        for q in RUNNING:
            try: os.killpg(q.pid, signal.SIGKILL)
            except ProcessLookupError: pass
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    passed = list(argv)        # the children get these, then --one and --batch (argparse keeps the last --batch)
    deadline, results, batch = time.monotonic() + a.budget, [], a.batch
    for n, config in enumerate(a.configs):
        left = deadline - time.monotonic()
        # it may use what is left but the least each later configuration needs, up to its own cap (a hang stops there)
        share = min(CAP[is_compiled(config)], left - sum(FLOOR[is_compiled(c)] for c in a.configs[n + 1:]))
        if share < FLOOR[is_compiled(config)] / 2:
            results.append(dict(config=config, skipped=f"{left:.0f} s of the budget left"))
            continue
        if a.quick and config.startswith("triton") and is_compiled(config):
            # dynamo traces into the interpreter's Python (numpy pointer arithmetic) and fails: nothing to learn here
            print(f"\n== tinyllama_gpu {config}: skipped on a CPU (Triton's interpreter does not run under "
                  "torch.compile)", flush=True)
            results.append(dict(config=config, skipped="Triton's interpreter does not run under torch.compile (CPU)"))
            continue
        print(f"\n== tinyllama_gpu {config}: batch {batch}, timeout {share:.0f} s", flush=True)
        r = launch(a, passed, config, batch, share)
        if r.get("oom") and batch > 1:
            batch //= 2          # and the configurations after it: the table compares at one batch where it can
            print(f"== tinyllama_gpu {config}: out of memory; again at batch {batch}", flush=True)
            r = launch(a, passed, config, batch, max(20.0, min(share, deadline - time.monotonic())))
            if "error" not in r:
                r["note"] = "; ".join(x for x in (f"out of memory at batch {2 * batch}", r["note"]) if x)
        results.append(r)
    table(results, a)
    # success: no configuration failed, and at least one gave figures (not all skipped for want of time)
    figures = [r for r in results if "error" not in r and "skipped" not in r]
    return 0 if figures and all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
