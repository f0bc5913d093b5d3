"""The Triton attention kernels (FlashAttention-2 style) against the plain-PyTorch reference, forward and backward.

Without a GPU they run under Triton's interpreter (tests/conftest.py), so every case is tiny. Most cases force
small blocks (`blocks=(BLOCK_M, BLOCK_N)`) so that one call walks several key and query blocks, and so that
the masked, unmasked and skipped block ranges all occur.
"""
import math
import random
import warnings

import pytest
import torch

from smollm.kernels.attention import attention, attention_ref
from smollm.kernels.core import load_triton

ta = load_triton("attention")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEV == "cuda"
# Under the interpreter the kernels compute in fp32 and round only their results, but the backward's
# delta = rowsum(dO * O) uses the rounded O (as FlashAttention does), which costs bf16 dq/dk a few ulps. On a GPU
# the matmuls also take bf16/fp16 tiles (P is rounded to the input dtype), so the tolerances are wider there.
TOL = {torch.float32: 1e-4, torch.float16: 1e-2 if ON_GPU else 5e-3, torch.bfloat16: 5e-2 if ON_GPU else 3e-2}


def alibi(h):
    "ALiBi's geometric slopes for h heads (Press et al., 2022)."
    return torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)], device=DEV)


def make(B, Hq, Hkv, T, S, D, dtype=torch.float32, qscale=1.0):
    "Fresh random q, k, v, dO; the values are rounded to `dtype` once, so both sides see the same inputs."
    q = (torch.randn(B, Hq, T, D, device=DEV) * qscale).to(dtype)
    k = torch.randn(B, Hkv, S, D, device=DEV).to(dtype)
    v = torch.randn(B, Hkv, S, D, device=DEV).to(dtype)
    do = torch.randn(B, Hq, T, D, device=DEV).to(dtype)
    return q, k, v, do


def run(fn, q, k, v, do, **kw):
    "Output and (dq, dk, dv) of fn on leaf clones of the inputs."
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o = fn(q, k, v, **kw)
    o.backward(do)
    return o.detach(), (q.grad, k.grad, v.grad)


def check(q, k, v, do, blocks=None, **kw):
    "Triton (on copies of the inputs, which must come back unchanged) against the fp32 reference."
    dtype = q.dtype
    saved = [t.clone() for t in (q, k, v, do)]
    o, grads = run(ta.attention, q, k, v, do, blocks=blocks, **kw)
    for a, b in zip(saved, (q, k, v, do)):
        assert torch.equal(a, b), "an input was modified"
    ro, rgrads = run(attention_ref, q.float(), k.float(), v.float(), do.float(), **kw)
    assert o.dtype == dtype and o.shape == q.shape
    tol = TOL[dtype]
    for name, a, b in zip(("out", "dq", "dk", "dv"), (o, *grads), (ro, *rgrads)):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.float(), b, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")
    return o, grads


# (B, Hq, Hkv, T, S, D, blocks, options): each line exercises something named in its comment. Some numbers are
# chosen so that a block range's edge falls exactly on a block boundary (S - T = 14 or 17 with 16-blocks; windows
# of 2, 17 and 47 with 16-blocks), where an off-by-one in the skipping or the unmasked range would show.
CASES = [
    (1, 2, 2, 37, 37, 32, (16, 16), {}),                                  # MHA, odd T, several blocks
    (1, 4, 1, 37, 37, 64, (16, 32), {}),                                  # GQA 4, BLOCK_M != BLOCK_N
    (1, 8, 1, 20, 20, 32, None, {}),                                      # GQA 8 (TinyLlama's ratio)
    (1, 2, 1, 33, 33, 128, None, {}),                                     # head dim 128
    (2, 4, 2, 37, 54, 32, (32, 16), {}),                                  # T < S: queries are the last T
    (1, 4, 2, 37, 45, 32, (16, 32), dict(causal=False)),                  # not causal, ragged S
    (2, 4, 1, 1, 45, 64, (16, 16), {}),                                   # decode: T = 1
    (1, 2, 1, 1, 45, 32, (16, 16), dict(causal=False)),                   # decode, not causal
    (1, 2, 1, 64, 64, 32, (16, 16), dict(window=47)),                     # window: unmasked middle blocks
    (1, 2, 2, 40, 40, 32, (16, 16), dict(window=2)),                      # window narrower than a block
    (1, 2, 1, 40, 40, 32, (16, 16), dict(window=17, causal=False)),       # window without causal
    (1, 2, 1, 1, 45, 32, (16, 16), dict(window=10)),                      # decode with a window
    (1, 4, 2, 37, 51, 32, (16, 16), dict(alibi_slopes=alibi(4))),         # ALiBi
    (1, 2, 1, 30, 41, 32, (16, 16), dict(causal=False, alibi_slopes=alibi(2))),  # ALiBi both sides of p
    (1, 2, 1, 37, 37, 32, (16, 16), dict(softcap=2.0)),                   # softcap (tanh saturates: qscale)
    (1, 4, 2, 29, 50, 32, (16, 16), dict(window=17, softcap=3.0, alibi_slopes=alibi(4))),  # everything
    (1, 2, 1, 37, 37, 24, (16, 16), dict(scale=0.3)),                     # head dim 24 (padded), own scale
]


@pytest.mark.parametrize("B,Hq,Hkv,T,S,D,blocks,kw", CASES)
def test_matches_reference_fp32(B, Hq, Hkv, T, S, D, blocks, kw):
    q, k, v, do = make(B, Hq, Hkv, T, S, D, qscale=3.0 if "softcap" in kw else 1.0)
    check(q, k, v, do, blocks=blocks, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,Hq,Hkv,T,S,D,blocks,kw", [
    (1, 4, 1, 37, 37, 64, (16, 32), {}),
    (1, 2, 1, 29, 40, 32, (16, 16), dict(window=17, softcap=3.0, alibi_slopes=alibi(2))),
])
def test_matches_reference_low_precision(dtype, B, Hq, Hkv, T, S, D, blocks, kw):
    q, k, v, do = make(B, Hq, Hkv, T, S, D, dtype)
    check(q, k, v, do, blocks=blocks, **kw)


def test_rows_without_keys_are_zero_and_every_output_is_written(monkeypatch):
    "T > S: the first T - S queries sit before the first key; buffers start as NaN, so nothing is left unwritten."
    def poisoned(fn):
        return lambda *a, **k: fn(*a, **k).fill_(float("nan"))
    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))
    q, k, v, do = make(1, 4, 2, 40, 17, 32)
    o, (dq, dk, dv) = check(q, k, v, do, blocks=(16, 16))
    assert torch.equal(o[:, :, :23], torch.zeros_like(o[:, :, :23]))
    assert torch.equal(dq[:, :, :23], torch.zeros_like(dq[:, :, :23]))


def test_non_contiguous_inputs():
    "q, k, v, dO as (B, H, T, D) views of (B, T, H, D) buffers, the layout a projection produces."
    B, Hq, Hkv, T, D = 2, 4, 2, 21, 32
    q = torch.randn(B, T, Hq, D, device=DEV).transpose(1, 2)
    k = torch.randn(B, T, Hkv, D, device=DEV).transpose(1, 2)
    v = torch.randn(B, T, Hkv, 2 * D, device=DEV)[..., ::2].transpose(1, 2)   # a stride on the last dim too
    do = torch.randn(B, T, Hq, D, device=DEV).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or do.is_contiguous())
    check(q, k, v, do, blocks=(16, 16), window=7)


def test_public_op_dispatches_to_triton():
    q, k, v, do = make(1, 4, 2, 19, 19, 32)
    out = attention(q, k, v, impl="triton")
    torch.testing.assert_close(out, attention_ref(q, k, v), atol=1e-4, rtol=1e-4)


def test_gradcheck():
    """Finite differences in fp32 (the kernels accumulate in fp32, so fp64 would not be more exact). Head dim 4
    (padded to 16 inside) keeps the number of perturbed inputs small; the scores reach the softcap's curve."""
    q, k, v, _ = make(1, 2, 1, 3, 4, 4, qscale=3.0)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    fn = lambda q, k, v: ta.attention(q, k, v, window=2, softcap=2.0, alibi_slopes=alibi(2), blocks=(16, 16))
    with warnings.catch_warnings():   # gradcheck warns about inputs that are not fp64
        warnings.simplefilter("ignore", UserWarning)
        assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-2, atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("call,match", [
    (lambda q, k, v: ta.attention(q, k[:, :, :, :8], v[:, :, :, :8]), "k and v must both be"),
    (lambda q, k, v: ta.attention(q[:, :3], k, v), "multiple of key/value heads"),
    (lambda q, k, v: ta.attention(q, k, v.half()), "share one dtype"),
    (lambda q, k, v: ta.attention(q, k, v, window=0), "window must be a positive integer"),
    (lambda q, k, v: ta.attention(q, k, v, softcap=-1.0), "softcap must be a positive"),
    (lambda q, k, v: ta.attention(q, k, v, alibi_slopes=torch.ones(3)), "one slope per query head"),
    (lambda q, k, v: ta.attention(q, k, v, alibi_slopes=torch.ones(4, requires_grad=True)), "no gradient"),
    (lambda q, k, v: ta.attention(q, k, v, blocks=(8, 16)), "blocks must be two powers of two"),
    (lambda q, k, v: ta.attention(q[0], k, v), "must be 4-D"),
])
def test_bad_arguments(call, match):
    q, k, v, _ = make(1, 4, 2, 5, 5, 16)
    with pytest.raises(ValueError, match=match):
        call(q, k, v)


@pytest.mark.slow
def test_random_sweep():
    "Random shapes, block sizes and options, in fp32."
    rng = random.Random(0)
    for _ in range(60):
        g, hkv = rng.choice([1, 2, 4, 8]), rng.choice([1, 2])
        T = rng.randint(1, 80)
        S = max(1, rng.choice([T, T + rng.randint(0, 50), T - rng.randint(0, 30)]))
        kw = dict(causal=rng.random() < 0.6)
        if rng.random() < 0.5:
            kw["window"] = rng.randint(1, 70)
        if rng.random() < 0.3:
            kw["softcap"] = rng.uniform(0.5, 5.0)
        if rng.random() < 0.3:
            kw["alibi_slopes"] = alibi(g * hkv)
        blocks = (rng.choice([16, 32, 64]), rng.choice([16, 32, 64]))
        q, k, v, do = make(rng.choice([1, 2]), g * hkv, hkv, T, S, rng.choice([16, 32, 64, 40]))
        check(q, k, v, do, blocks=blocks, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_down_tinyllama(dtype):
    "TinyLlama's head layout (32 query / 4 KV heads, head dim 64) scaled down: 8 / 1 heads, 2 x 128 tokens."
    q, k, v, do = make(2, 8, 1, 128, 128, 64, dtype)
    check(q, k, v, do)


COMPILE_FOR_SM90 = r'''
import os, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from smollm.kernels import triton_attention as ta
TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
got = {}
ta._launch = lambda name, kernel, configs, grid, args, consts, blocks: got.setdefault(name, (kernel, configs, args, consts))
class Delta:   # the delta kernel is launched directly: record it too
    def __getitem__(self, grid):
        return lambda *args, **consts: got.setdefault("delta", (ta._attn_bwd_delta_jit, [triton.Config({})], args, consts))
ta._attn_bwd_delta_jit, ta._attn_bwd_delta = ta._attn_bwd_delta, Delta()
for dtype, kw in [(torch.bfloat16, dict(causal=True)), (torch.float32, dict(causal=False, window=64, softcap=30.0))]:
    got.clear()
    q, k, v = torch.randn(2, 8, 256, 64, dtype=dtype), torch.randn(2, 2, 256, 64, dtype=dtype), torch.randn(2, 2, 256, 64, dtype=dtype)
    slopes = torch.rand(8)
    o, lse = ta._fwd(q, k, v, kw["causal"], kw.get("window"), kw.get("softcap"), slopes, 0.125, None)
    ta._bwd(torch.randn_like(q), q, k, v, o, lse, kw["causal"], kw.get("window"), kw.get("softcap"), slopes, 0.125, None)
    for name, (fn, configs, args, consts) in got.items():
        consts = dict(consts, **({"UPCAST": False} if "UPCAST" in consts else {}), **configs[0].kwargs)
        sig, cex = {}, {}
        for n, a in zip(fn.arg_names, list(args) + [None] * len(consts)):
            if n in consts:
                sig[n], cex[n] = "constexpr", consts[n]
            elif isinstance(a, torch.Tensor):
                sig[n] = "*" + TY[a.dtype]
            else:
                sig[n] = "fp32" if isinstance(a, float) else "i32"
        c = triton.compile(ASTSource(fn, sig, cex), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=configs[0].num_warps, num_stages=configs[0].num_stages))
        assert len(c.asm["cubin"]) > 0
        print(name, dtype, "ok", flush=True)
'''


@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="a GPU runs the kernels themselves")
def test_kernels_compile_for_sm90():
    """The interpreter accepts code that the GPU compiler rejects, so compile every kernel for sm_90 (the H100/H200)
    with Triton's own toolchain, which needs no GPU. A fresh process, because the kernels must be decorated
    without TRITON_INTERPRET."""
    import subprocess
    import sys
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count(" ok") == 8, r.stdout
