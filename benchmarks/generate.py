"""Batch-1 decode speed: smollm's `generate` against transformers', and both against the memory-bandwidth limit.

Decoding one token at batch 1 reads every weight once and does little arithmetic with each, so its speed limit is
the memory bandwidth: **limit tokens/s = copy bandwidth / weight bytes per token**.
- weight bytes per token: every parameter once at its dtype's size (a tied embedding/lm-head matrix once). An untied
  input embedding is left out but for the one row a token reads: the rest of that table is never touched. The KV
  cache read is left out too (here under 1% of the weights).
- copy bandwidth: `dst.copy_(src)` of a 256 MiB buffer (8x the L3 cache, so it measures DRAM), bytes read plus bytes
  written (STREAM's convention), in the same process and threads as the decoding: 3 copies before each round of
  calls, the median of all of them (on a shared machine the load changes; this way the limit sees the same load). A pure read (what decoding does) can beat it, so a fraction a little over 1 is possible; at a shape whose
  weights fit the L3 cache (the nano shape in fp32 is ~20 MB) the limit is not DRAM's and the fraction can be > 1.

Impls, all on the same weights (the smollm model written with `smollm.hf.to_hf` and read back by transformers), in
the model's dtype (`model.to(torch.bfloat16)` for bf16: the weights themselves, not autocast, which would convert
every weight at every token):
- smollm: `generate(model, ids, n)`, a growing KV cache, eager;
- smollm-compiled: `generate(..., compile=True)`: a static cache and a torch.compile'd decoding step;
- transformers: `model.generate(...)`, greedy, SDPA attention, its dynamic cache;
- transformers-compiled: `cache_implementation="static"` and its forward torch.compile'd.
Each impl's greedy tokens are checked against the first impl's (smollm eager's) in the same dtype (random weights: a near-tie may flip
late, so the table gives how many leading tokens agree). tokens/s is the decoding rate: the new tokens after the
first, over the time from the first to the last (each token timestamped by a callback or streamer), so the prefill
and a compilation are left out; the first call of a compiled impl (compiling) is timed apart. The impls alternate
call by call for `--reps` rounds; the table gives medians.

    .venv/bin/python benchmarks/generate.py                      # nano and 135M shapes, fp32 and bf16
    .venv/bin/python benchmarks/generate.py --size 135m --dtype bf16 --reps 7
    .venv/bin/python benchmarks/generate.py --quick              # the tiny model, seconds (CI)
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

SIZES = {   # name -> (compose overrides, prompt tokens, new tokens per call)
    "nano": (["model=tinyllama_nano", "data.vocab_size=8192"], 16, 128),
    "135m": (["model=smollm_135m"], 16, 48),
}
QUICK = (["model=tiny", "data.vocab_size=128"], 8, 12)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class CopyBandwidth:
    """Copy bandwidth of `dst.copy_(src)` on `nbytes` buffers, counting bytes read plus written. `sample(n)` times n
    copies; `gbps()` is the median GB/s of every copy sampled so far (the benchmark samples between its rounds, so
    that the limit sees the same machine load as the decoding beside it)."""
    def __init__(self, nbytes: int = 256 * 2**20):
        self.nbytes, self.times = nbytes, []
        self.src = torch.ones(nbytes // 4, dtype=torch.float32)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)         # warm-up: the pages of dst exist after this

    def sample(self, n: int = 3):
        for _ in range(n):
            t0 = time.perf_counter()
            self.dst.copy_(self.src)
            self.times.append(time.perf_counter() - t0)

    def gbps(self) -> float:
        return 2 * self.nbytes / statistics.median(self.times) / 1e9


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decoding step reads: every parameter once (a tied matrix once), except the rows of an
    untied input embedding other than the token's own."""
    emb = model.embed.weight
    tied = emb is model.lm_head.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if tied else total - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()


class Stamps:
    "Timestamps of the new tokens: a smollm `generate` callback, and a transformers streamer (`put`, `end`)."
    def __init__(self):
        self.t, self.prompt_seen = [], False

    def __call__(self, tokens):          # smollm: called with each step's new tokens
        self.t.append(time.perf_counter())

    def put(self, value):                # transformers: called with the prompt first, then each new token
        if self.prompt_seen:
            self.t.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass

    def rate(self) -> float:
        "New tokens per second after the first (the prefill's) one."
        return (len(self.t) - 1) / (self.t[-1] - self.t[0])


def build(overrides, dtype, tmp):
    "The smollm model (seeded) and transformers' copy of its weights, both in `dtype`."
    from transformers import AutoModelForCausalLM
    from smollm.config import build_model, compose
    from smollm.hf import to_hf
    torch.manual_seed(0)
    ours = build_model(compose([*overrides, "model.kernels=torch"]).model).eval()
    to_hf(ours, tmp)
    load = lambda: AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa").eval()
    return ours.to(dtype), load(), load()


IMPLS = ("smollm", "smollm-compiled", "transformers", "transformers-compiled")


def impls(ours, hf, hf_compiled, ids, new):
    "name -> fn(stamps) returning the ids (1, T + new), for every name of IMPLS."
    from smollm.generate import generate
    hf_compiled.forward = torch.compile(hf_compiled.forward)

    def run_hf(model, stamps, **kw):
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=0, streamer=stamps, **kw)
    return {
        "smollm": lambda s: generate(ours, ids, new, callback=s),
        "smollm-compiled": lambda s: generate(ours, ids, new, callback=s, compile=True),
        "transformers": lambda s: run_hf(hf, s),
        "transformers-compiled": lambda s: run_hf(hf_compiled, s, cache_implementation="static"),
    }


def bench_one(size, overrides, prompt, new, dtype_name, reps, copy_mib, names=IMPLS):
    """Time the impls `names` (the first is the greedy reference) at one shape and dtype, with the copy bandwidth
    sampled between rounds; return the table's rows (dicts)."""
    dtype = DTYPES[dtype_name]
    with tempfile.TemporaryDirectory() as d:
        ours, hf, hf_compiled = build(overrides, dtype, d)
    ids = torch.randint(0, ours.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1))
    fns = {k: f for k, f in impls(ours, hf, hf_compiled, ids, new).items() if k in names}
    first, agree, ref = {}, {}, None
    for name, fn in fns.items():       # the first calls: compilation, and the greedy tokens
        t0 = time.perf_counter()
        out = fn(Stamps())
        first[name] = time.perf_counter() - t0
        ref = out if ref is None else ref
        agree[name] = int((out[0, prompt:] == ref[0, prompt:]).cumprod(0).sum())
    copy = CopyBandwidth(copy_mib * 2**20)
    rates = {k: [] for k in fns}
    for _ in range(reps):
        copy.sample()
        for name, fn in fns.items():
            s = Stamps()
            fn(s)
            rates[name].append(s.rate())
    del copy.src, copy.dst
    wbytes = weight_bytes_per_token(ours)
    limit = copy.gbps() * 1e9 / wbytes
    print(f"{size} {dtype_name}: {ours.num_params() / 1e6:.1f}M params, {wbytes / 1e6:.1f} MB of weights per token; "
          f"copy {copy.gbps():.1f} GB/s, so a limit of {limit:.1f} tokens/s; first calls (compiling): "
          + ", ".join(f"{k} {v:.1f} s" for k, v in first.items()), flush=True)
    hf_rate = statistics.median(rates["transformers"]) if "transformers" in rates else None
    return [dict(size=size, dtype=dtype_name, impl=k, tps=statistics.median(v), limit=limit,
                 vs_hf=None if hf_rate is None else statistics.median(v) / hf_rate, agree=agree[k], new=new)
            for k, v in rates.items()]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=[*SIZES, "all"], default="all")
    p.add_argument("--dtype", choices=[*DTYPES, "all"], default="all")
    p.add_argument("--reps", type=int, default=5, help="alternating rounds (the medians are over these)")
    p.add_argument("--new", type=int, help="new tokens per call (default: per size)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, of {', '.join(IMPLS)}")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="the tiny model, a few tokens, 1 round: checks the script runs")
    args = p.parse_args()
    names = [n for n in args.impls.split(",") if n]
    if bad := [n for n in names if n not in IMPLS]:
        p.error(f"--impls: {bad} are not among {list(IMPLS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = {"tiny": QUICK} if args.quick else SIZES if args.size == "all" else {args.size: SIZES[args.size]}
    dtypes = list(DTYPES) if args.dtype == "all" else [args.dtype]
    reps = 1 if args.quick else args.reps
    mib = 16 if args.quick else 256
    print(f"batch 1, {torch.get_num_threads()} threads, torch {torch.__version__}; copy bandwidth: copy_ of a {mib} MiB "
          f"buffer, bytes read + written, median of 3 per round; tokens/s: medians of {reps} alternating rounds")
    rows = []
    for size, (overrides, prompt, new) in sizes.items():
        for dt in dtypes:
            rows += bench_one(size, overrides, prompt, args.new or new, dt, reps, mib, names)
    print("| size | dtype | impl | tokens/s | ms/token | limit tokens/s | of limit | vs transformers | greedy match |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['dtype']} | {r['impl']} | {r['tps']:.1f} | {1e3 / r['tps']:.2f} | {r['limit']:.1f} | "
              f"{r['tps'] / r['limit']:.3g} | {'' if r['vs_hf'] is None else format(r['vs_hf'], '.2f') + 'x'} | "
              f"{r['agree']}/{r['new']} |")


if __name__ == "__main__":
    main()
