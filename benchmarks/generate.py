"""Batch-1 decode speed on the CPU: smollm's `generate` (KV cache) against transformers' `generate`.

Both run the same weights (the smollm model written with `smollm.hf.to_hf` and read back by
transformers), greedy, in the same process, alternating run by run (each timed run right after an untimed
one of the same model, so its weights are as warm in cache as in real use); the table gives the medians.
tokens/s counts the new tokens of a whole `generate` call (prefill of a short prompt included).
"smollm compiled" is `generate(..., compile=True)`: a static cache and a torch.compile'd decoding step; its
one-off compilation is timed apart and left out of its tokens/s. `--no-compile` skips it.
`--hf-compile` adds the like-for-like peer: transformers with a static cache and its forward torch.compile'd.

    .venv/bin/python benchmarks/generate.py                          # tinyllama_nano shape, vocab 8192
    .venv/bin/python benchmarks/generate.py --model tinyllama_120m --vocab 32000 --new 64
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tinyllama_nano", help="a conf/model preset")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--new", type=int, default=128, help="new tokens per generate call")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled decoding step")
    p.add_argument("--hf-compile", action="store_true",
                   help="add transformers with cache_implementation='static' and a torch.compile'd forward")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM
    from smollm.config import compose
    from smollm.generate import generate
    from smollm.hf import to_hf
    from smollm.config import build_model

    torch.manual_seed(0)
    cfg = compose([f"model={args.model}", f"data.vocab_size={args.vocab}", "model.kernels=torch"])
    ours = build_model(cfg.model).eval()
    with tempfile.TemporaryDirectory() as d:
        to_hf(ours, d)
        load = lambda: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa").eval()
        hf = load()
        hf_compiled = load() if args.hf_compile else None
    ids = torch.randint(0, args.vocab, (1, args.prompt))

    def run_ours():
        return generate(ours, ids, args.new)

    def run_compiled():
        return generate(ours, ids, args.new, compile=True)

    def run_hf(model=hf, **kw):
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                  min_new_tokens=args.new, do_sample=False, pad_token_id=0, **kw)

    # the same greedy tokens, or the comparison means nothing (random weights: a near-tie may flip late)
    a, b = run_ours(), run_hf()
    agree = lambda x: int((x[0, args.prompt:] == b[0, args.prompt:]).cumprod(0).sum())
    print(f"{args.model} (vocab {args.vocab}, {ours.num_params() / 1e6:.1f}M params), batch 1, prompt {args.prompt}, "
          f"{args.new} new tokens, {torch.get_num_threads()} threads; greedy tokens identical for the first "
          f"{agree(a)}/{args.new}")
    impls = {"smollm": run_ours, "transformers": run_hf}
    if not args.no_compile:
        t0 = time.perf_counter()
        c = run_compiled()
        print(f"compile=True: first call (compiling) {time.perf_counter() - t0:.1f} s; greedy tokens identical to "
              f"transformers' for the first {agree(c)}/{args.new}")
        impls = {"smollm": run_ours, "smollm compiled": run_compiled, "transformers": run_hf}
    if hf_compiled is not None:
        hf_compiled.forward = torch.compile(hf_compiled.forward)
        run_hf_compiled = lambda: run_hf(hf_compiled, cache_implementation="static")
        t0 = time.perf_counter()
        c = run_hf_compiled()
        print(f"transformers compiled: first call (compiling) {time.perf_counter() - t0:.1f} s; greedy tokens "
              f"identical to eager transformers' for the first {agree(c)}/{args.new}")
        impls["transformers compiled"] = run_hf_compiled
    times = {k: [] for k in impls}
    for _ in range(args.reps):
        for name, fn in impls.items():
            # both models' weights together can overflow the L3 cache: an untimed
            # run first puts this model's weights back in cache, as in real use where one model generates
            fn()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    hf_tps = args.new / statistics.median(times["transformers"])
    print("| impl | median s | tokens/s | vs transformers |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        tps = args.new / statistics.median(ts)
        print(f"| {name} | {statistics.median(ts):.3f} | {tps:.0f} | {tps / hf_tps:.2f}x |")


if __name__ == "__main__":
    main()
