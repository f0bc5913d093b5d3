"""The gated delta rule's three forms (smollm.delta_rule) against each other and against transformers' Qwen3-Next.

S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = S_t^T (scale q_t),  alpha_t = exp(g_t),
state (B, H, d_k, d_v). The step-by-step `gated_delta_rule_naive` is the reference, forward and (by autograd)
backward; the chunked form and the decoding step must reproduce it at every chunk size, for any T, and carry an
initial state. Special cases are checked against plain math (beta = 0: the state only decays; g = 0, beta = 1,
orthonormal keys: exact key-value recall, and a rewrite replaces the old value). transformers' torch fallbacks
are the independent reference; the last test perturbs the decay and requires that comparison to fail.
"""
import inspect
import os

import pytest
import torch

from smollm.delta_rule import gated_delta_rule_chunked, gated_delta_rule_naive, gated_delta_rule_step
from smollm.errors import ArgumentError

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def inputs(B=2, H=2, T=13, dk=8, dv=6, dtype=torch.float64, seed=0, state=True):
    "Inputs in the ranges Gated DeltaNet produces: unit keys, g <= 0, beta in (0, 1); and an initial state."
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    q, v = r(B, H, T, dk), r(B, H, T, dv)
    k = torch.nn.functional.normalize(r(B, H, T, dk), dim=-1)
    g = -torch.rand(B, H, T, generator=gen, dtype=torch.float64)
    beta = torch.rand(B, H, T, generator=gen, dtype=torch.float64)
    s0 = r(B, H, dk, dv) if state else None
    cast = lambda x: None if x is None else x.to(dtype)
    return [cast(x) for x in (q, k, v, g, beta)], cast(s0)


def step_loop(q, k, v, g, beta, initial_state=None, scale=None):
    "The decoding step run over a whole sequence."
    S, outs = initial_state, []
    for t in range(q.shape[2]):
        o, S = gated_delta_rule_step(q[:, :, t], k[:, :, t], v[:, :, t], g[:, :, t], beta[:, :, t], S, scale=scale)
        outs.append(o)
    return torch.stack(outs, 2), S


def close(a, b, tol):
    assert a.dtype == b.dtype and a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= tol * (1 + b.abs().max().item()), err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T,C", [(16, 1), (16, 4), (16, 16), (13, 4), (13, 16), (37, 16), (5, 64)])
def test_chunked_equals_naive_forward(dtype, T, C):
    xs, s0 = inputs(T=T, dtype=dtype)
    o, S = gated_delta_rule_naive(*xs, initial_state=s0)
    o_c, S_c = gated_delta_rule_chunked(*xs, chunk_size=C, initial_state=s0)
    close(o_c, o, TOL[dtype]); close(S_c, S, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_equals_naive_forward(dtype):
    xs, s0 = inputs(dtype=dtype)
    o, S = gated_delta_rule_naive(*xs, initial_state=s0)
    o_s, S_s = step_loop(*xs, initial_state=s0)
    close(o_s, o, TOL[dtype]); close(S_s, S, TOL[dtype])


def _grads(fn, xs, s0):
    leaves = [x.detach().requires_grad_() for x in [*xs, s0]]
    o, S = fn(*leaves[:5], initial_state=leaves[5])
    gen = torch.Generator().manual_seed(1)
    # random cotangents on both outputs, so that the final state's gradient path is tested too
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() + (S * torch.randn(S.shape, generator=gen, dtype=S.dtype)).sum()
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("form", ["chunked1", "chunked4", "chunked16", "step"])
def test_backward_equals_naive(form):
    "Gradients of q, k, v, g, beta and the initial state, T = 13 (not a multiple of 4 or 16), fp64."
    xs, s0 = inputs(T=13)
    fn = step_loop if form == "step" else (
        lambda *a, C=int(form[7:]), **kw: gated_delta_rule_chunked(*a, chunk_size=C, **kw))
    for name, a, b in zip(["q", "k", "v", "g", "beta", "initial_state"], _grads(fn, xs, s0), _grads(gated_delta_rule_naive, xs, s0)):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-10), name


def test_chunked_gradcheck():
    "Finite differences on the chunked form itself (fp64, tiny), independent of the naive form."
    xs, s0 = inputs(B=1, H=1, T=5, dk=3, dv=2)
    leaves = [x.requires_grad_() for x in [*xs, s0]]
    assert torch.autograd.gradcheck(lambda *a: gated_delta_rule_chunked(*a[:5], chunk_size=2, initial_state=a[5]), leaves)


@pytest.mark.parametrize("fn", ["naive", "chunked"])
def test_initial_state_carries_a_split_sequence(fn):
    f = gated_delta_rule_naive if fn == "naive" else (lambda *a, **kw: gated_delta_rule_chunked(*a, chunk_size=4, **kw))
    xs, _ = inputs(T=19, state=False)
    o, S = f(*xs)
    first, second = [x[:, :, :7] for x in xs], [x[:, :, 7:] for x in xs]
    o1, S1 = f(*first)
    o2, S2 = f(*second, initial_state=S1)
    close(torch.cat([o1, o2], 2), o, 1e-12); close(S2, S, 1e-12)
    # and the decoding step continues a chunked prefix
    o3, S3 = step_loop(*second, initial_state=S1)
    close(o3, o2, 1e-12); close(S3, S, 1e-12)


@pytest.mark.parametrize("fn", ["naive", "chunked", "step"])
def test_beta_zero_only_decays(fn):
    xs, s0 = inputs()
    q, k, v, g, beta = xs
    run = {"naive": gated_delta_rule_naive, "step": step_loop,
           "chunked": lambda *a, **kw: gated_delta_rule_chunked(*a, chunk_size=4, **kw)}[fn]
    o, S = run(q, k, v, g, torch.zeros_like(beta), initial_state=s0)
    decayed = s0[:, :, None] * g.cumsum(-1).exp()[..., None, None]                 # (B, H, T, d_k, d_v)
    close(S, decayed[:, :, -1], 1e-12)
    close(o, torch.einsum("bhtk,bhtkv->bhtv", q * q.shape[-1] ** -0.5, decayed), 1e-12)


@pytest.mark.parametrize("fn", ["naive", "chunked", "step"])
def test_exact_recall_with_orthonormal_keys(fn):
    "g = 0, beta = 1: writing orthonormal keys stores each value exactly, and rewriting a key replaces its value."
    d = 6
    gen = torch.Generator().manual_seed(3)
    keys = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0].T   # rows orthonormal
    vals = torch.randn(d + 1, 4, generator=gen, dtype=torch.float64)
    k = torch.cat([keys, keys[:1]])[None, None]              # the last token rewrites key 0 with a new value
    v = vals[None, None]
    q = torch.cat([keys[:1], keys[1:], keys[:1]])[None, None]  # query: key 0, then each new key, then key 0 again
    T = d + 1
    g, beta = torch.zeros(1, 1, T, dtype=torch.float64), torch.ones(1, 1, T, dtype=torch.float64)
    run = {"naive": gated_delta_rule_naive, "step": step_loop,
           "chunked": lambda *a, **kw: gated_delta_rule_chunked(*a, chunk_size=4, **kw)}[fn]
    o, S = run(q, k, v, g, beta, scale=1.0)
    close(o[0, 0], vals, 1e-12)                               # o_t = v_t at every step, o_T = the new value
    close(S[0, 0], keys.T @ torch.cat([vals[-1:], vals[1:d]]), 1e-12)   # S = sum_i k_i v_i^T, key 0 overwritten


def test_strong_decay_stays_finite():
    "exp is only ever taken of gamma_i - gamma_j with i >= j: g = -60 per token must not overflow the chunk."
    xs, s0 = inputs(T=16, dtype=torch.float32)
    xs[3] = torch.full_like(xs[3], -60.0)
    o_c, S_c = gated_delta_rule_chunked(*xs, chunk_size=16, initial_state=s0)
    o, S = gated_delta_rule_naive(*xs, initial_state=s0)
    assert torch.isfinite(o_c).all() and torch.isfinite(S_c).all()
    close(o_c, o, 1e-5); close(S_c, S, 1e-5)


def test_dtype_and_errors():
    xs, s0 = inputs(dtype=torch.float32)
    o, S = gated_delta_rule_chunked(*xs, initial_state=s0)
    assert o.dtype == S.dtype == torch.float32 and o.shape == (2, 2, 13, 6) and S.shape == (2, 2, 8, 6)
    q, k, v, g, beta = xs
    with pytest.raises(ArgumentError, match="chunk_size=0"):
        gated_delta_rule_chunked(*xs, chunk_size=0)
    with pytest.raises(ArgumentError, match="beta.shape"):
        gated_delta_rule_naive(q, k, v, g, beta[:, :, :-1])
    with pytest.raises(ArgumentError, match="initial_state.shape"):
        gated_delta_rule_chunked(*xs, initial_state=s0.transpose(-1, -2))   # (d_v, d_k): the paper's layout
    with pytest.raises(ArgumentError, match="q.shape"):
        gated_delta_rule_step(q, k, v, g, beta)                 # a sequence given to the one-token step


# --- transformers' Qwen3-Next: an implementation no one here wrote ---------------------------------------------

def _hf(fn_name, xs, s0, chunk_size=None):
    """transformers' torch fallback on the same inputs: (B, T, H, d) layout, q and k L2-normalised inside
    (`use_qk_l2norm_in_kernel=True`), the query scaled by d_k^-0.5, state (B, H, d_k, d_v), fp32."""
    qn = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    # with flash-linear-attention installed, transformers dispatches to its Triton kernels: unwrap to the torch path
    fn = inspect.unwrap(getattr(qn, fn_name))
    tr = lambda x: x.transpose(1, 2)
    kw = {} if chunk_size is None else {"chunk_size": chunk_size}
    o, S = fn(*(tr(x) for x in xs), initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True, **kw)
    return tr(o), S


def _l2norm(x):
    "transformers' (and flash-linear-attention's) l2norm: x * rsqrt(sum x^2 + 1e-6)."
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _raw_inputs(T=13):
    xs, s0 = inputs(T=T, dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    xs[1] = torch.randn(xs[1].shape, generator=gen) * 2       # raw keys: the normalisation is part of what's matched
    return xs, s0


@pytest.mark.parametrize("hf_fn,C", [("torch_recurrent_gated_delta_rule", None),
                                     ("torch_chunk_gated_delta_rule", 4), ("torch_chunk_gated_delta_rule", 64)])
@pytest.mark.parametrize("ours", ["naive", "chunked", "step"])
def test_matches_transformers_qwen3_next(hf_fn, C, ours):
    xs, s0 = _raw_inputs()
    o_hf, S_hf = _hf(hf_fn, xs, s0, C)
    q, k, v, g, beta = xs
    mine = [_l2norm(q), _l2norm(k), v, g, beta]
    run = {"naive": gated_delta_rule_naive, "step": step_loop,
           "chunked": lambda *a, **kw: gated_delta_rule_chunked(*a, chunk_size=4, **kw)}[ours]
    o, S = run(*mine, initial_state=s0)
    close(o, o_hf, 1e-5); close(S, S_hf, 1e-5)


def test_transformers_comparison_can_fail():
    "The planted bug: a decay off by 1e-2 per token must break the 1e-5 agreement (the tolerance discriminates)."
    xs, s0 = _raw_inputs()
    o_hf, S_hf = _hf("torch_recurrent_gated_delta_rule", xs, s0)
    q, k, v, g, beta = xs
    o, S = gated_delta_rule_chunked(_l2norm(q), _l2norm(k), v, g - 1e-2, beta, chunk_size=4, initial_state=s0)
    with pytest.raises(AssertionError):
        close(o, o_hf, 1e-5)


# --- packed documents: the state starts again from zero at each document ------------------------------------------

DOCS = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2, 3, 3, 3, 3], [0] * 4 + [1] * 9])   # boundaries inside and at chunks


def test_naive_with_documents_is_each_document_alone():
    xs, s0 = inputs(T=13)
    o, S = gated_delta_rule_naive(*xs, initial_state=s0, doc=DOCS)
    for b in range(2):
        starts = [0] + [t for t in range(1, 13) if DOCS[b, t] != DOCS[b, t - 1]] + [13]
        for i, (s, e) in enumerate(zip(starts, starts[1:])):
            part = [x[b:b + 1, :, s:e] for x in xs]
            o_d, S_d = gated_delta_rule_naive(*part, initial_state=s0[b:b + 1] if i == 0 else None)
            close(o[b:b + 1, :, s:e], o_d, 1e-12)
        close(S[b:b + 1], S_d, 1e-12)                              # the final state is the last document's


@pytest.mark.parametrize("C", [1, 3, 4, 16])
def test_chunked_with_documents_equals_naive_forward_and_backward(C):
    xs, s0 = inputs(T=13)
    chunked = lambda *a, **kw: gated_delta_rule_chunked(*a, chunk_size=C, doc=DOCS, **kw)
    naive = lambda *a, **kw: gated_delta_rule_naive(*a, doc=DOCS, **kw)
    o, S = naive(*xs, initial_state=s0)
    o_c, S_c = chunked(*xs, initial_state=s0)
    close(o_c, o, 1e-12); close(S_c, S, 1e-12)
    for name, a, b in zip(["q", "k", "v", "g", "beta", "initial_state"], _grads(chunked, xs, s0), _grads(naive, xs, s0)):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-10), name


def test_documents_are_checked_and_change_the_result():
    xs, s0 = inputs(T=13)
    with pytest.raises(ArgumentError, match="doc.shape"):
        gated_delta_rule_chunked(*xs, doc=DOCS[:, :5])
    one = torch.zeros_like(DOCS)          # a single document: the same as no doc at all, and unlike DOCS
    close(gated_delta_rule_chunked(*xs, chunk_size=4, doc=one)[0], gated_delta_rule_naive(*xs)[0], 1e-12)
    assert (gated_delta_rule_chunked(*xs, chunk_size=4, doc=DOCS)[0] - gated_delta_rule_naive(*xs)[0]).abs().max() > 1e-3


# --- the layer: GatedDeltaNet (the mixer contract itself is tests/test_mixers.py, over conf/model/mixer) -----------

from smollm.delta_rule import GatedDeltaNet  # noqa: E402


def _hybrid(*more):
    from smollm.config import build_model, compose
    torch.manual_seed(0)
    return build_model(compose(["model=tiny", "data.vocab_size=128", "model.n_layers=4", "model.init_std=0.5",
                                "+model/mixer@model.mixers.D=gated_deltanet", "model.layer_pattern=DDDG", *more]).model)


def test_layer_shapes_heads_and_errors():
    from smollm.config import ConfigError, compose
    m = _hybrid().layers[0].attn          # tiny: dim 64, n_heads 4 -> 4 value heads, n_kv_heads 2 -> 2 key heads
    assert (m.n_v_heads, m.n_k_heads, m.head_k_dim, m.head_v_dim) == (4, 2, 16, 16)
    assert m.in_proj_qkvz.weight.shape == (2 * 32 + 2 * 64, 64) and m.conv1d.weight.shape == (128, 1, 4)
    assert m.out_proj.residual_out and m.family == "mixer"
    torch.manual_seed(1)
    m = GatedDeltaNet(64, n_v_heads=256, head_k_dim=2)   # Mamba2's init: A in [1, 16], dt = softplus(dt_bias) log-uniform in [1e-3, 0.1]
    A, dt = m.A_log.exp(), torch.nn.functional.softplus(m.dt_bias)
    assert 1 <= A.min() < 1.5 and 15 < A.max() <= 16
    assert 1e-3 * 0.999 <= dt.min() < 2e-3 and 0.05 < dt.max() <= 0.1 * 1.001 and 5e-3 < dt.median() < 2e-2
    with pytest.raises(ConfigError, match="model.mixers.D.n_k_heads=3"):
        compose(["model=tiny", "data.vocab_size=128", "+model/mixer@model.mixers.D=gated_deltanet",
                 "model.layer_pattern=DG", "model.mixers.D.n_k_heads=3"])
    with pytest.raises(ArgumentError, match="conv_size=1"):
        GatedDeltaNet(16, conv_size=1)


def test_low_precision_runs_the_recurrence_in_fp32():
    torch.manual_seed(0)
    m = GatedDeltaNet(16, n_v_heads=2)
    x = torch.randn(2, 7, 16)
    ref = m(x)
    y = m.bfloat16()(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max() < 0.05 * ref.abs().max()
    cache = m.new_cache()
    m(x[:, :3].bfloat16(), cache=cache)
    assert cache.tensors["state"].dtype == torch.float32       # the state keeps fp32 between decoding steps


# --- the layer against transformers' Qwen3NextGatedDeltaNet (its torch path) on the same weights ------------------

def _qwen3_next(dtype, monkeypatch):
    """transformers' Qwen3NextGatedDeltaNet (4 value heads, 2 key heads, d_k 8, d_v 6, dim 32) and ours, built with
    the same (random) weights: load_state_dict with no key renamed. The module-level ops are unwrapped to the torch
    fallbacks (with flash-linear-attention installed transformers would run its Triton kernels)."""
    qn = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    from transformers import Qwen3NextConfig
    for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn",
                 "causal_conv1d_update"):
        monkeypatch.setattr(qn, name, inspect.unwrap(getattr(qn, name)))
    cfg = Qwen3NextConfig(hidden_size=32, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
                          linear_value_head_dim=6, linear_conv_kernel_dim=4, num_hidden_layers=1, vocab_size=32,
                          layer_types=["linear_attention"], rms_norm_eps=1e-6, hidden_act="silu")
    torch.manual_seed(0)
    theirs = qn.Qwen3NextGatedDeltaNet(cfg, 0).to(dtype)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
    ours = GatedDeltaNet(32, n_v_heads=4, n_k_heads=2, head_k_dim=8, head_v_dim=6, conv_size=4, chunk_size=4).to(dtype)
    ours.load_state_dict(theirs.state_dict())             # the same names and shapes: the from_hf map is the identity
    return qn, cfg, theirs, ours


HF_TOL = {torch.float32: 1e-5, torch.float64: 1e-5}     # transformers computes the recurrence and the norm in fp32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_transformers_qwen3_next_layer_prefill(dtype, monkeypatch):
    _, cfg, theirs, ours = _qwen3_next(dtype, monkeypatch)
    x = torch.randn(2, 13, 32, dtype=dtype, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[0, :3] = 0                                           # a left-padded row
    with torch.no_grad():
        close(ours(x), theirs(x), HF_TOL[dtype])
        close(ours(x, key_mask=mask)[0, 3:], theirs(x, attention_mask=mask)[0, 3:], HF_TOL[dtype])
        fresh = type(theirs)(cfg, 0).to(dtype)      # and the other way: our weights into transformers'
        fresh.load_state_dict(ours.state_dict())
        close(fresh(x), ours(x), HF_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_transformers_qwen3_next_layer_decoding(dtype, monkeypatch):
    from transformers import DynamicCache
    _, cfg, theirs, ours = _qwen3_next(dtype, monkeypatch)
    x = torch.randn(2, 9, 32, dtype=dtype, generator=torch.Generator().manual_seed(2))
    hf_cache, state = DynamicCache(config=cfg), ours.new_cache()
    with torch.no_grad():
        hf = [theirs(x[:, :5], cache=hf_cache)] + [theirs(x[:, t:t + 1], cache=hf_cache) for t in range(5, 9)]
        mine = [ours(x[:, :5], cache=state)] + [ours(x[:, t:t + 1], cache=state) for t in range(5, 9)]
        close(torch.cat(mine, 1), torch.cat(hf, 1), HF_TOL[dtype])
        close(state.tensors["state"].to(dtype), hf_cache.get_recurrent_state(0).to(dtype), HF_TOL[dtype])


def test_transformers_layer_comparison_can_fail(monkeypatch):
    "The planted bug: q and k swapped inside in_proj_qkvz's first group must break the agreement."
    _, _, theirs, ours = _qwen3_next(torch.float64, monkeypatch)
    with torch.no_grad():
        w = ours.in_proj_qkvz.weight
        w[:16] = torch.cat([w[8:16], w[:8]]).clone()
        x = torch.randn(2, 13, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        with pytest.raises(AssertionError):
            close(ours(x), theirs(x), HF_TOL[torch.float64])


# --- flash-linear-attention: its naive forms as a second reference (CPU); its kernels (CUDA: `pytest -k fla`) -----

from smollm.delta_rule import fla_available, gated_delta_rule_fla  # noqa: E402


@pytest.mark.parametrize("theirs", ["naive_recurrent", "naive_chunk"])
@pytest.mark.parametrize("ours", ["naive", "chunked", "step"])
def test_matches_fla_naive_references(theirs, ours):
    "fla's own plain-PyTorch forms (B, T, H, d), fp32 inside; naive_recurrent takes beta before g."
    fla_naive = pytest.importorskip("fla.ops.gated_delta_rule.naive")
    xs, s0 = inputs(T=21, dtype=torch.float32)
    q, k, v, g, beta = xs
    tr = lambda x: x.transpose(1, 2)
    if theirs == "naive_recurrent":
        o_f, S_f = fla_naive.naive_recurrent_gated_delta_rule(tr(q), tr(k), tr(v), tr(beta), tr(g), initial_state=s0,
                                                              output_final_state=True)
    else:
        o_f, S_f = fla_naive.naive_chunk_gated_delta_rule(tr(q), tr(k), tr(v), tr(g), tr(beta), chunk_size=8,
                                                          initial_state=s0, output_final_state=True)
    run = {"naive": gated_delta_rule_naive, "step": step_loop,
           "chunked": lambda *a, **kw: gated_delta_rule_chunked(*a, chunk_size=4, **kw)}[ours]
    o, S = run(*xs, initial_state=s0)
    close(o, tr(o_f), 1e-5); close(S, S_f, 1e-5)
    with pytest.raises(AssertionError):      # and the comparison can fail: g and beta in each other's place
        close(run(q, k, v, beta.log(), g.exp(), initial_state=s0)[0], tr(o_f), 1e-5)


def test_fla_is_not_used_on_a_cpu_or_with_impl_torch():
    torch.manual_seed(0)
    m = GatedDeltaNet(64, n_v_heads=2)                     # heads 32 wide: fla's blocks would take them on CUDA
    from smollm.delta_rule import _use_fla
    q, v = torch.randn(1, 3, 2, 32), torch.randn(1, 3, 2, 32)
    assert not _use_fla(q, v, "auto") and not _use_fla(q, v, "triton")
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
    m.impl = "torch"
    want = m(x)
    m.impl = "triton"                                      # on a CPU, 'triton' runs smollm's forms, and does not fail
    torch.testing.assert_close(m(x), want)


needs_fla_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and fla_available()),
                                   reason="needs a CUDA device and flash-linear-attention (the extra fla)")


def _rel(a, b):
    "max |a - b| relative to max |b|: fla's kernels accumulate in fp32 but may multiply in tf32."
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@needs_fla_gpu
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("gva", [1, 2])
def test_fla_kernels_equal_naive_forward_and_backward(packed, gva):
    "gated_delta_rule_fla (fp32 on CUDA) against gated_delta_rule_naive (fp64 on CUDA): outputs, state, every gradient."
    xs, s0 = inputs(B=2, H=4, T=150, dk=32, dv=64)
    doc = torch.tensor([[0] * 40 + [1] * 70 + [2] * 40, [0] * 150]).cuda() if packed else None
    gen = torch.Generator().manual_seed(2)
    do = torch.randn(2, 4, 150, 64, generator=gen, dtype=torch.float64).cuda()
    dS = torch.randn(2, 4, 32, 64, generator=gen, dtype=torch.float64).cuda()

    def run(fn, dtype, kv_heads):
        leaves = [x.cuda().to(dtype).requires_grad_() for x in [*xs, s0]]
        q, k = leaves[0][:, ::gva], leaves[1][:, ::gva]     # GVA: each key head serves gva value heads
        if kv_heads:
            q, k = q.repeat_interleave(gva, 1), k.repeat_interleave(gva, 1)
        o, S = fn(q, k, *leaves[2:5], initial_state=leaves[5], doc=doc)
        grads = torch.autograd.grad((o.double() * do).sum() + (S.double() * dS).sum(), leaves)
        return [o, S, *grads]
    ours = run(gated_delta_rule_fla, torch.float32, kv_heads=False)
    ref = run(gated_delta_rule_naive, torch.float64, kv_heads=True)
    for name, a, b in zip(["o", "final_state", "q", "k", "v", "g", "beta", "initial_state"], ours, ref):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < 5e-3, (name, _rel(a, b))


@pytest.mark.skipif(not fla_available(), reason="needs flash-linear-attention (the extra fla)")
@pytest.mark.parametrize("gva", [1, 2])
def test_fla_decoding_kernel_equals_the_step(gva):
    "fla's fused_recurrent kernel (natively on CUDA; in Triton's interpreter on a CPU) for one token = the step."
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU, and Triton's interpreter is off")
    xs, s0 = inputs(B=2, H=4, T=1, dk=32, dv=16)
    (q, k, v, g, beta), s0 = [x.to(dev).float() for x in xs], s0.to(dev).float()
    o, S = gated_delta_rule_fla(q[:, ::gva], k[:, ::gva], v, g, beta, initial_state=s0)
    q, k = q[:, ::gva].repeat_interleave(gva, 1), k[:, ::gva].repeat_interleave(gva, 1)
    o_s, S_s = gated_delta_rule_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0], beta[:, :, 0], s0)
    assert _rel(o[:, :, 0], o_s) < 1e-4 and _rel(S, S_s) < 1e-4


@needs_fla_gpu
def test_fla_path_in_the_mixer_equals_the_torch_path():
    "GatedDeltaNet on CUDA with impl auto (fla) and torch (smollm's forms): forward, backward, documents, decoding."
    torch.manual_seed(0)
    m = GatedDeltaNet(128, n_v_heads=4, n_k_heads=2, head_k_dim=32, head_v_dim=32).cuda()
    x = torch.randn(2, 150, 128, device="cuda")
    doc = torch.tensor([[0] * 40 + [1] * 110, [0] * 150], device="cuda")
    from smollm.delta_rule import _use_fla
    assert _use_fla(torch.empty(1, 1, 1, 32, device="cuda"), torch.empty(1, 1, 1, 32, device="cuda"), "auto")

    def run(impl, **kw):
        m.impl = impl
        m.zero_grad()
        y = m(x, **kw)
        y.square().mean().backward()
        return [y] + [p.grad.clone() for p in m.parameters()]
    for kw in ({}, {"doc": doc}):
        for a, b in zip(run("auto", **kw), run("torch", **kw)):
            assert _rel(a, b) < 5e-3, _rel(a, b)
    m.impl = "auto"
    state = m.new_cache()                   # a prefill through fla, then fused_recurrent steps, equal to the full forward
    with torch.no_grad():
        full = m(x[:, :20])
        steps = torch.cat([m(x[:, :12], cache=state)] + [m(x[:, t:t + 1], cache=state) for t in range(12, 20)], 1)
    assert _rel(steps, full) < 5e-3

