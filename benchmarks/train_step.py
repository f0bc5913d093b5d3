"""One training step on the CPU: smollm against transformers and litgpt, one architecture, same weights and optimizer.

A step is forward, loss, backward and an AdamW update (`smollm.train.adamw`, the trainer's own: fused, weight decay
on matrices outside the embedding, the same settings for all three). The three models are one architecture:
smollm's `build_model` from `smollm.config.compose`, transformers' LlamaForCausalLM loaded (SDPA attention) from the
folder `smollm.hf.to_hf` writes, and litgpt's `GPT` from a litgpt `Config` of the same shape, its weights converted
from the transformers state dict by litgpt's own `copy_weights_hf_llama`. Each takes its own library's loss: smollm's
`model.loss` (its fused linear cross-entropy), transformers' `labels=` loss, litgpt's `chunked_cross_entropy` (what
its pretraining script calls). The step-0 losses must agree (the run stops with an error when they do not).

Sizes: `nano` (model=tinyllama_nano, vocab 8192, batch 8 x 256) and `120m` (model=tinyllama_120m, vocab 32000,
block 512, batch 2 x 512). Modes, each the same treatment for all three models:
- `eager`: fp32;
- `compile`: `torch.compile` of forward + loss (as the trainer's `trainer.compile=true` does; backward through
  AOTAutograd, the optimizer eager). Compile s: step 0 and the warm-up steps (which take any recompile) less as
  many median steps, after a toy function has paid the compiler's one-time start-up (else the model compiled first
  in the process pays it: about 13 s for smollm at the nano shape); graphs: the graphs dynamo compiled for that model (1 = one graph, never recompiled). Inductor's
  caches are off (torch.compiler.config.force_disable_caches, unless TORCHINDUCTOR_FORCE_DISABLE_CACHES is set), so
  it is a cold compile each run;
- `bf16`: `torch.autocast('cpu', dtype=torch.bfloat16)` around forward + loss (the weights and AdamW stay fp32).

Timing: after step 0 and warm-up steps, the implementations alternate step by step, in an order that rotates each
round, and the table gives medians over the rounds. Each round also times **the matmul limit**: the step's own
matrix products at the step's shapes and dtype, one after another on the same threads: for every linear layer (q, k,
v, o, gate, up, down, and the lm_head) the forward `x @ W.T` and the two backward products `dY @ W` and `dY.T @ x`;
for attention, per batch row and query head, QK^T and PV forward and the four backward products (dV = P^T dO, dP =
dO V^T, dQ = dS K, dK = dS^T Q), counted at HALF their full T x T time, because the causal mask lets the flash
kernels skip the upper triangle. Efficiency = limit / step time: 1.0 would be a step that does nothing but its
matrix products.

cpu s/step: the process CPU time of the same steps (every thread's, spin-waits included), the median: on a machine
shared with other jobs it moves less than the wall-clock time. `--profile ROWS` prints, after the tables, each
implementation's torch.profiler table (key_averages over 3 steps, the top ROWS ops by self CPU time), as
benchmarks/PROFILES.md quotes.

Peak memory: torch.profiler's memory events (profile_memory=True) over one step after the timed ones: the highest
total of live tensor bytes during the step, above those live when it began (activations, gradients, temporaries;
the weights and AdamW state are already there). These are allocator bytes, not RSS, so allocator caching and
threads' stacks do not enter; the same measure for all three.

    .venv/bin/python benchmarks/train_step.py                          # both sizes, every mode
    .venv/bin/python benchmarks/train_step.py --size 120m --mode eager --reps 5 --threads 2
    .venv/bin/python benchmarks/train_step.py --size nano --mode bf16 --threads 1 --profile 20
    .venv/bin/python benchmarks/train_step.py --quick                  # tiny shape, every mode: what CI runs

litgpt is optional: install the `bench` extra (`pip install -e ".[bench]"`, then `pip install --no-deps litgpt`,
see pyproject.toml); without it the litgpt rows and columns are left out with a note.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # smollm from this checkout

SIZES = {
    "nano": dict(overrides=["model=tinyllama_nano", "data.vocab_size=8192"], batch=8, seq=256),
    "120m": dict(overrides=["model=tinyllama_120m", "data.vocab_size=32000", "model.block_size=512"],
                 batch=2, seq=512),
}
QUICK = dict(overrides=["model=tinyllama_nano", "data.vocab_size=512", "model.dim=64", "model.n_layers=2",
                        "model.n_heads=4", "model.n_kv_heads=2", "model.mlp_hidden=128", "model.block_size=64"],
             batch=2, seq=32)
MODES = ("eager", "compile", "bf16")
TOLERANCE = {"eager": 1e-3, "compile": 1e-3, "bf16": 3e-2}   # |step-0 loss - transformers'|, in nats
LITGPT_MISSING = ("litgpt is not installed: its rows and columns are left out. Install the `bench` extra "
                  "(pip install -e '.[bench]' && pip install --no-deps litgpt==0.5.13; see pyproject.toml)")


def litgpt_modules():
    "(litgpt.GPT, litgpt.Config, chunked_cross_entropy, copy_weights_hf_llama), or None when litgpt is missing."
    try:
        from litgpt import GPT, Config
        from litgpt.scripts.convert_hf_checkpoint import copy_weights_hf_llama
        from litgpt.utils import chunked_cross_entropy
    except ImportError:
        return None
    return GPT, Config, chunked_cross_entropy, copy_weights_hf_llama


@dataclass
class Impl:
    name: str
    model: torch.nn.Module
    loss_fn: object                 # (x, y) -> mean cross-entropy of the next tokens y
    opt: torch.optim.Optimizer = None
    times: list = field(default_factory=list)
    cpu_times: list = field(default_factory=list)   # process CPU seconds of the same steps (all threads)
    first_steps: float = 0.0        # seconds of step 0 and the warm-up steps (compiling and recompiling)
    loss0: float = float("nan")
    graphs: int | None = None       # graphs dynamo compiled in those steps (1: one graph, no recompile)
    graph_breaks: int | None = None
    peak_mb: float | None = None


@dataclass
class Shape:
    "What the matmul limit needs: the architecture's widths and the batch."
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    batch: int
    seq: int


def hf_shape(cfg, batch: int, seq: int) -> Shape:
    "The Shape of a transformers LlamaConfig `cfg` at batch x seq."
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return Shape(cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, hd,
                 cfg.intermediate_size, cfg.vocab_size, batch, seq)


def rope_theta(cfg) -> float:
    "RoPE's base from a transformers config (rope_parameters in transformers 5, rope_theta before)."
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def build_litgpt(hf, lit):
    "litgpt's GPT with the architecture and weights of the transformers Llama `hf`, through litgpt's own converter."
    GPT, Config, _, copy_weights_hf_llama = lit
    c = hf.config
    s = hf_shape(c, 1, 1)
    config = Config(name="smollm-bench", block_size=c.max_position_embeddings, vocab_size=c.vocab_size,
                    padded_vocab_size=c.vocab_size, n_layer=s.n_layers, n_head=s.n_heads, n_embd=s.dim,
                    n_query_groups=s.n_kv_heads, head_size=s.head_dim, intermediate_size=s.hidden,
                    rotary_percentage=1.0, parallel_residual=False, bias=False, norm_class_name="RMSNorm",
                    norm_eps=c.rms_norm_eps, mlp_class_name="LLaMAMLP", rope_base=int(rope_theta(c)))
    model = GPT(config)
    state = {}
    copy_weights_hf_llama(config, {}, state, {k: v.detach().clone() for k, v in hf.state_dict().items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("cos", "sin"))]   # the RoPE tables are buffers litgpt builds
    if missing or unexpected:
        raise SystemExit(f"litgpt weights do not match: missing {missing}, unexpected {unexpected}")
    return model


def build(overrides: list[str], kernels: str, lit):
    "Fresh smollm, transformers and (when installed) litgpt models with smollm's initial weights; the HF config."
    from transformers import AutoModelForCausalLM

    from smollm.config import build_model, compose
    from smollm.hf import to_hf

    torch.manual_seed(0)
    cfg = compose(overrides + [f"model.kernels={kernels}"])
    ours = build_model(cfg.model)
    with tempfile.TemporaryDirectory() as d:
        to_hf(ours, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa")
    models = {"smollm": ours, "transformers": hf}
    if lit is not None:
        models["litgpt"] = build_litgpt(hf, lit)
    for m in models.values():
        m.train()
    return models, hf.config


def loss_fns(models: dict, lit) -> dict:
    "Each library's own training loss, (x, y) -> the mean cross-entropy of y, the next tokens of x."
    fns = {"smollm": lambda x, y, m=models["smollm"]: m.loss(x, y),
           # shift_labels: y is already the next tokens (HF would otherwise shift labels= and drop the last target)
           "transformers": lambda x, y, m=models["transformers"]: m(input_ids=x, labels=y, shift_labels=y,
                                                                     use_cache=False).loss}
    if "litgpt" in models:
        cce = lit[2]
        fns["litgpt"] = lambda x, y, m=models["litgpt"]: cce(m(x), y)
    return fns


def mode_context(mode: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()


def step(impl: Impl, x, y, mode: str) -> float:
    "One training step; returns the loss."
    with mode_context(mode):
        loss = impl.loss_fn(x, y)
    loss.backward()
    impl.opt.step()
    impl.opt.zero_grad(set_to_none=True)
    return loss.item()


class MatmulLimit:
    """The step's matrix products at its shapes and dtype (see the module docstring); `time()` runs them once and
    returns the seconds a step of `shape` spends in them: one layer's products times n_layers, plus the lm_head's."""

    def __init__(self, s: Shape, dtype: torch.dtype):
        n, g = s.batch * s.seq, torch.Generator().manual_seed(0)
        r = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
        q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
        linears = [(s.dim, q), (s.dim, kv), (s.dim, kv), (q, s.dim), (s.dim, s.hidden), (s.dim, s.hidden),
                   (s.hidden, s.dim)]
        self.layer, self.head = [], []      # (fn, args) of each product
        for group, shapes in ((self.layer, linears), (self.head, [(s.dim, s.vocab)])):
            for fan_in, fan_out in shapes:
                xin, w, dy = r(n, fan_in), r(fan_out, fan_in), r(n, fan_out)
                group += [(F.linear, (xin, w)), (torch.mm, (dy, w)), (torch.mm, (dy.t(), xin))]
        bh = s.batch * s.n_heads
        qk = (r(bh, s.seq, s.head_dim), r(bh, s.head_dim, s.seq))      # QK^T, dO V^T: (T, hd) @ (hd, T)
        pv = (r(bh, s.seq, s.seq), r(bh, s.seq, s.head_dim))           # PV, P^T dO, dS K, dS^T Q: (T, T) @ (T, hd)
        self.attention = [(torch.bmm, qk, 2), (torch.bmm, pv, 4)]
        self.n_layers = s.n_layers
        self.flops = 2 * n * (sum(a * b for a, b in linears) * s.n_layers + s.dim * s.vocab) * 3 \
            + 2 * bh * s.seq * s.seq * s.head_dim * 6 * s.n_layers / 2
        self.time()                          # warm-up

    def time(self) -> float:
        def run(fn, args):
            t0 = time.perf_counter()
            fn(*args)
            return time.perf_counter() - t0
        layer = sum(run(fn, a) for fn, a in self.layer) + sum(0.5 * k * run(fn, a) for fn, a, k in self.attention)
        return layer * self.n_layers + sum(run(fn, a) for fn, a in self.head)


def peak_step_mb(impl: Impl, x, y, mode: str) -> float:
    "Peak live tensor MiB during one step above those live at its start, from torch.profiler's memory events."
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(impl, x, y, mode)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def cpu_has_bf16() -> bool:
    "Whether /proc/cpuinfo lists a native bf16 instruction set (avx512_bf16 or amx_bf16)."
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compile_counts() -> tuple[int, int]:
    "(graphs compiled, graph breaks) so far in this process, from dynamo's counters."
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def warm_compiler(backend: str):
    "Compile and run (forward and backward) a toy function with `backend`, then forget it (torch._dynamo.reset)."
    a = torch.randn(8, 8, requires_grad=True)
    torch.compile(lambda t: F.silu(t @ t.t()).sum(), backend=backend)(a).backward()
    torch._dynamo.reset()


def run_mode(label: str, spec: dict, mode: str, args, lit) -> list[Impl]:
    "Time one size in one mode and print its table."
    from smollm.train import adamw

    models, hf_config = build(spec["overrides"], args.kernels, lit)
    fns = loss_fns(models, lit)
    s = hf_shape(hf_config, spec["batch"], spec["seq"])
    torch.manual_seed(1)
    ids = torch.randint(0, s.vocab, (s.batch, s.seq + 1))
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    impls = [Impl(name, models[name], fns[name], adamw(models[name], lr=3e-3, betas=(0.9, 0.95), eps=1e-8,
                                                      weight_decay=0.1)) for name in models]

    if mode == "compile":   # the compiler's one-time start-up (imports, C++ toolchain, worker pool) on a toy graph,
        warm_compiler(args.backend)   # so that it is not counted as the compile time of whichever model comes first
    for impl in impls:      # step 0 (the same weights, so the same loss) and the warm-up, one model at a time
        if mode == "compile":
            before = compile_counts()
            impl.loss_fn = torch.compile(impl.loss_fn, backend=args.backend)
        t0 = time.perf_counter()
        impl.loss0 = step(impl, x, y, mode)
        for _ in range(args.warmup):
            step(impl, x, y, mode)
        impl.first_steps = time.perf_counter() - t0
        if mode == "compile":
            impl.graphs, impl.graph_breaks = (a - b for a, b in zip(compile_counts(), before))
    ref = next(i for i in impls if i.name == "transformers").loss0
    losses = ", ".join(f"{i.name} {i.loss0:.5f}" for i in impls)
    bad = [i.name for i in impls if not abs(i.loss0 - ref) <= TOLERANCE[mode]]
    if bad:
        raise SystemExit(f"step-0 losses differ by more than {TOLERANCE[mode]} ({mode}): {losses}")

    limit = MatmulLimit(s, torch.bfloat16 if mode == "bf16" else torch.float32)
    limits = []
    for r in range(args.reps):
        for impl in impls[r % len(impls):] + impls[:r % len(impls)]:   # alternating, the order rotating
            c0, t0 = time.process_time(), time.perf_counter()
            step(impl, x, y, mode)
            impl.times.append(time.perf_counter() - t0)
            impl.cpu_times.append(time.process_time() - c0)
        limits.append(limit.time())
    for impl in impls:
        impl.peak_mb = peak_step_mb(impl, x, y, mode)

    lim = statistics.median(limits)
    tokens = s.batch * s.seq
    med = {i.name: statistics.median(i.times) for i in impls}
    print(f"\n### {label}, {mode}: {s.n_layers} layers, d={s.dim}, {s.n_heads} heads ({s.n_kv_heads} kv), "
          f"mlp {s.hidden}, vocab {s.vocab}; batch {s.batch} x {s.seq}; {torch.get_num_threads()} threads; "
          f"{args.reps} rounds after {args.warmup} warm-up; kernels={args.kernels}"
          + (f"; backend {args.backend}" if mode == "compile" else "") + "\n")
    print(f"step-0 loss: {losses}")
    print(f"matmul limit: {lim:.4f} s/step ({limit.flops / 1e9:.3g} GFLOP, "
          f"{limit.flops / lim / 1e9:.0f} GFLOP/s, {'bf16' if mode == 'bf16' else 'fp32'})\n")
    cols = ["impl", "median s/step", "cpu s/step", "tokens/s", "vs transformers"] + (["vs litgpt"] if "litgpt" in med else []) + \
        ["peak MiB", "efficiency"] + (["compile s", "graphs", "graph breaks"] if mode == "compile" else [])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for impl in impls:
        m = med[impl.name]
        row = [impl.name, f"{m:.4f}", f"{statistics.median(impl.cpu_times):.4f}", f"{tokens / m:.0f}", f"{med['transformers'] / m:.2f}x"]
        row += [f"{med['litgpt'] / m:.2f}x"] if "litgpt" in med else []
        row += [f"{impl.peak_mb:.1f}", f"{lim / m:.2f}"]
        compile_s = max(impl.first_steps - (1 + args.warmup) * m, 0.0)
        row += [f"{compile_s:.1f}", str(impl.graphs), str(impl.graph_breaks)] if mode == "compile" else []
        print("| " + " | ".join(row) + " |")
    sys.stdout.flush()
    if args.profile:
        print_profiles(impls, x, y, mode, args.profile)
    return impls


def print_profiles(impls: list[Impl], x, y, mode: str, rows: int, steps: int = 3):
    "torch.profiler's key_averages of `steps` steps of each implementation: the top `rows` ops by self CPU time."
    from torch.profiler import ProfilerActivity, profile
    for impl in impls:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step(impl, x, y, mode)
        ka = prof.key_averages()
        print(f"\n#### profile: {impl.name}, {mode}, {steps} steps, self CPU {sum(e.self_cpu_time_total for e in ka) / 1e3 / steps:.1f} ms/step\n")
        print(ka.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
    sys.stdout.flush()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=[*SIZES, "all"], default="all")
    p.add_argument("--mode", choices=[*MODES, "all"], default="all")
    p.add_argument("--reps", type=int, default=5, help="timed rounds (each steps every implementation once)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each model after step 0")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--kernels", default="auto", help="smollm's model.kernels (auto or torch on a CPU)")
    p.add_argument("--backend", default=None,
                   help="torch.compile's backend in the compile mode (default inductor; aot_eager with --quick)")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="after the timed rounds, print each implementation's top ROWS ops by self CPU time "
                        "(torch.profiler over 3 steps)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny shape, 2 rounds, compile on aot_eager: checks that the script runs")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.backend = args.backend or ("aot_eager" if args.quick else "inductor")
    if "TORCHINDUCTOR_FORCE_DISABLE_CACHES" not in os.environ:
        torch.compiler.config.force_disable_caches = True   # compile times are cold compiles
    lit = litgpt_modules()
    print("versions: " + ", ".join(f"{name} {version(name)}" for name in ("torch", "transformers", "litgpt")
                                   if name != "litgpt" or lit is not None))
    if lit is None:
        print(LITGPT_MISSING)
    modes = MODES if args.mode == "all" else (args.mode,)
    if args.quick:
        args.reps, args.warmup = min(args.reps, 2), 1
        sizes = {"quick": QUICK}
    else:
        sizes = SIZES if args.size == "all" else {args.size: SIZES[args.size]}
    if "bf16" in modes and not cpu_has_bf16():
        print("note: this CPU shows no avx512_bf16 or amx_bf16 flag: its bf16 products are emulated (slow)")
    for label, spec in sizes.items():
        for mode in modes:
            run_mode(label, spec, mode, args, lit)


if __name__ == "__main__":
    main()
