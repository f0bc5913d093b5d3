"""One training step on the CPU: smollm against transformers' LlamaForCausalLM, same architecture and weights.

A step is forward, loss, backward and an AdamW update. Both models are the tinyllama_nano preset
(conf/model/tinyllama_nano.yaml) with a vocabulary of VOCAB tokens, and hold the same weights (smollm's written with
`smollm.hf.to_hf`); they alternate step by step in one process, and the table gives the medians.

    .venv/bin/python benchmarks/train_step.py                  # the default batch and length
    .venv/bin/python benchmarks/train_step.py --batch 4 --seq 128 --reps 3 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

VOCAB = 8192   # the vocabulary size both models get


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM
    from smollm.config import compose
    from smollm.hf import to_hf
    from smollm.config import build_model

    torch.manual_seed(0)
    cfg = compose(["model=tinyllama_nano", f"data.vocab_size={VOCAB}", "model.kernels=torch"])
    ours = build_model(cfg.model).train()
    with tempfile.TemporaryDirectory() as d:
        to_hf(ours, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa").train()
    ids = torch.randint(0, VOCAB, (args.batch, args.seq + 1))
    x, y = ids[:, :-1], ids[:, 1:]

    # same weights, same loss: HF's labels are shifted inside, so compare on the same seq - 1 targets per row
    with torch.no_grad():
        a = ours.loss(x[:, :-1], x[:, 1:]).item()
        b = hf(input_ids=x, labels=x).loss.item()
    print(f"tinyllama_nano ({ours.num_params() / 1e6:.1f}M params), batch {args.batch} x {args.seq}, "
          f"{torch.get_num_threads()} threads; initial loss smollm {a:.5f}, transformers {b:.5f}")

    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, weight_decay=0.1)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.1)

    def step_ours():
        loss = ours.loss(x, y)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_hf():   # labels = targets unshifted: HF shifts them, so pass the full sequence
        loss = hf(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    impls = {"smollm": step_ours, "transformers": step_hf}
    times = {k: [] for k in impls}
    for i in range(args.warmup + args.reps):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fn()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["transformers"])
    print("| impl | median s/step | tokens/s | speed vs transformers |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {args.batch * args.seq / med:.0f} | {ref / med:.2f}x |")


if __name__ == "__main__":
    main()
