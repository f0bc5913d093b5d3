"""Gated linear attention's three forms (smollm.gla) against each other and against flash-linear-attention's naive forms.

S_t = diag(alpha_t) S_{t-1} + k_t v_t^T,  o_t = S_t^T (scale q_t),  alpha_t = exp(g_t), g (B, H, T, d_k) or
(B, H, T, 1) (one decay per head: RetNet's retention, simple GLA), state (B, H, d_k, d_v). The token-by-token
`gla_naive` is the reference, forward and (by autograd) backward; the chunked form (any chunk and sub-chunk size,
any T, packed documents) and the decoding step must reproduce it. flash-linear-attention's naive_recurrent_gla,
naive_recurrent_simple_gla and naive_retention (the optional extra `fla`; skipped without it) are the independent
reference; a planted bug must break that comparison.
"""
import pytest
import torch
import torch.nn.functional as F

from smollm.errors import ArgumentError
from smollm.gla import gla_chunked, gla_naive, gla_step

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
DOCS = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2, 3, 3, 3, 3], [0] * 4 + [1] * 9])   # boundaries inside and at chunks


def inputs(B=2, H=2, T=13, dk=8, dv=6, per_head=False, dtype=torch.float64, seed=0, state=True):
    "Inputs in GLA's ranges (g = logsigmoid(.) <= 0, per key channel or one per head) and an initial state."
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    q, k, v = r(B, H, T, dk), r(B, H, T, dk), r(B, H, T, dv)
    g = F.logsigmoid(2 * r(B, H, T, 1 if per_head else dk))
    s0 = r(B, H, dk, dv) if state else None
    cast = lambda x: None if x is None else x.to(dtype)
    return [cast(x) for x in (q, k, v, g)], cast(s0)


def step_loop(q, k, v, g, initial_state=None, scale=None):
    "The decoding step run over a whole sequence."
    S, outs = initial_state, []
    for t in range(q.shape[2]):
        o, S = gla_step(q[:, :, t], k[:, :, t], v[:, :, t], g[:, :, t], S, scale=scale)
        outs.append(o)
    return torch.stack(outs, 2), S


def chunked(C, c=16, **fixed):
    return lambda *a, **kw: gla_chunked(*a, chunk_size=C, sub_chunk_size=c, **fixed, **kw)


def close(a, b, tol):
    assert a.dtype == b.dtype and a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= tol * (1 + b.abs().max().item()), err


def _grads(fn, xs, s0):
    leaves = [x.detach().requires_grad_() for x in [*xs, s0]]
    o, S = fn(*leaves[:4], initial_state=leaves[4])
    gen = torch.Generator().manual_seed(1)
    # random cotangents on both outputs, so that the final state's gradient path is tested too
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() + \
        (S * torch.randn(S.shape, generator=gen, dtype=S.dtype)).sum()
    return torch.autograd.grad(loss, leaves)


NAMES = ["q", "k", "v", "g", "initial_state"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("T,C,c", [(16, 1, 1), (16, 4, 2), (16, 16, 4), (13, 4, 4), (13, 16, 16), (37, 16, 8),
                                   (5, 64, 16)])
def test_chunked_equals_naive_forward(dtype, per_head, T, C, c):
    xs, s0 = inputs(T=T, per_head=per_head, dtype=dtype)
    o, S = gla_naive(*xs, initial_state=s0)
    o_c, S_c = gla_chunked(*xs, chunk_size=C, sub_chunk_size=c, initial_state=s0)
    close(o_c, o, TOL[dtype]); close(S_c, S, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_head", [False, True])
def test_step_equals_naive_forward(dtype, per_head):
    xs, s0 = inputs(per_head=per_head, dtype=dtype)
    o, S = gla_naive(*xs, initial_state=s0)
    o_s, S_s = step_loop(*xs, initial_state=s0)
    close(o_s, o, TOL[dtype]); close(S_s, S, TOL[dtype])


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("form", ["chunked1", "chunked4x2", "chunked16x4", "chunked16x16", "step"])
def test_backward_equals_naive(form, per_head):
    "Gradients of q, k, v, g and the initial state, T = 13 (not a multiple of 4 or 16), fp64."
    xs, s0 = inputs(T=13, per_head=per_head)
    if form == "step":
        fn = step_loop
    else:
        C, _, c = form[7:].partition("x")
        fn = chunked(int(C), int(c or C))
    for name, a, b in zip(NAMES, _grads(fn, xs, s0), _grads(gla_naive, xs, s0)):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-10), name


def test_chunked_gradcheck():
    "Finite differences on the chunked form itself (fp64, tiny, two sub-chunks and two chunks), independent of naive."
    xs, s0 = inputs(B=1, H=1, T=7, dk=3, dv=2)
    leaves = [x.requires_grad_() for x in [*xs, s0]]
    assert torch.autograd.gradcheck(lambda *a: gla_chunked(*a[:4], chunk_size=4, sub_chunk_size=2,
                                                           initial_state=a[4]), leaves)


@pytest.mark.parametrize("fn", ["naive", "chunked"])
def test_initial_state_carries_a_split_sequence(fn):
    f = gla_naive if fn == "naive" else chunked(4, 2)
    xs, _ = inputs(T=19, state=False)
    o, S = f(*xs)
    first, second = [x[:, :, :7] for x in xs], [x[:, :, 7:] for x in xs]
    o1, S1 = f(*first)
    o2, S2 = f(*second, initial_state=S1)
    close(torch.cat([o1, o2], 2), o, 1e-12); close(S2, S, 1e-12)
    o3, S3 = step_loop(*second, initial_state=S1)        # and the decoding step continues a chunked prefix
    close(o3, o2, 1e-12); close(S3, S, 1e-12)


@pytest.mark.parametrize("fn", ["naive", "chunked", "step"])
def test_no_decay_is_causal_linear_attention(fn):
    "g = 0: o = tril(scale Q K^T) V and S = S_0 + K^T V, written out directly."
    xs, s0 = inputs()
    q, k, v, g = xs
    run = {"naive": gla_naive, "chunked": chunked(4, 2), "step": step_loop}[fn]
    o, S = run(q, k, v, torch.zeros_like(g), initial_state=s0)
    scale = q.shape[-1] ** -0.5
    close(o, ((q @ k.transpose(-1, -2)) * scale).tril() @ v + (q * scale) @ s0, 1e-12)
    close(S, s0 + k.transpose(-1, -2) @ v, 1e-12)


@pytest.mark.parametrize("per_head", [False, True])
def test_strong_decay_stays_finite(per_head):
    "g = -60 per token in fp32: no exponent is positive, so the chunked form (and its gradient) must not overflow."
    xs, s0 = inputs(T=32, per_head=per_head, dtype=torch.float32)
    xs[3] = torch.full_like(xs[3], -60.0)
    o, S = gla_naive(*xs, initial_state=s0)
    leaves = [x.detach().requires_grad_() for x in xs]
    o_c, S_c = gla_chunked(*leaves, chunk_size=16, sub_chunk_size=4, initial_state=s0)
    assert torch.isfinite(o_c).all() and torch.isfinite(S_c).all()
    close(o_c, o, 1e-5); close(S_c, S, 1e-5)
    (o_c.sum() + S_c.sum()).backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)


# --- packed documents: the state starts again from zero at each document ------------------------------------------

def test_naive_with_documents_is_each_document_alone():
    xs, s0 = inputs(T=13)
    o, S = gla_naive(*xs, initial_state=s0, doc=DOCS)
    for b in range(2):
        starts = [0] + [t for t in range(1, 13) if DOCS[b, t] != DOCS[b, t - 1]] + [13]
        for i, (s, e) in enumerate(zip(starts, starts[1:])):
            part = [x[b:b + 1, :, s:e] for x in xs]
            o_d, S_d = gla_naive(*part, initial_state=s0[b:b + 1] if i == 0 else None)
            close(o[b:b + 1, :, s:e], o_d, 1e-12)
        close(S[b:b + 1], S_d, 1e-12)                              # the final state is the last document's


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("C,c", [(1, 1), (3, 3), (4, 2), (16, 4)])
def test_chunked_with_documents_equals_naive_forward_and_backward(C, c, per_head):
    xs, s0 = inputs(T=13, per_head=per_head)
    naive = lambda *a, **kw: gla_naive(*a, doc=DOCS, **kw)
    o, S = naive(*xs, initial_state=s0)
    o_c, S_c = chunked(C, c, doc=DOCS)(*xs, initial_state=s0)
    close(o_c, o, 1e-12); close(S_c, S, 1e-12)
    for name, a, b in zip(NAMES, _grads(chunked(C, c, doc=DOCS), xs, s0), _grads(naive, xs, s0)):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-10), name


def test_documents_are_checked_and_change_the_result():
    xs, s0 = inputs(T=13)
    with pytest.raises(ArgumentError, match="doc.shape"):
        gla_chunked(*xs, doc=DOCS[:, :5])
    one = torch.zeros_like(DOCS)          # a single document: the same as no doc at all, and unlike DOCS
    close(gla_chunked(*xs, chunk_size=4, doc=one)[0], gla_naive(*xs)[0], 1e-12)
    assert (gla_chunked(*xs, chunk_size=4, doc=DOCS)[0] - gla_naive(*xs)[0]).abs().max() > 1e-3


def test_dtype_and_errors():
    xs, s0 = inputs(dtype=torch.float32)
    o, S = gla_chunked(*xs, initial_state=s0)
    assert o.dtype == S.dtype == torch.float32 and o.shape == (2, 2, 13, 6) and S.shape == (2, 2, 8, 6)
    q, k, v, g = xs
    with pytest.raises(ArgumentError, match="chunk_size=0"):
        gla_chunked(*xs, chunk_size=0)
    with pytest.raises(ArgumentError, match="sub_chunk_size=3"):
        gla_chunked(*xs, chunk_size=16, sub_chunk_size=3)
    with pytest.raises(ArgumentError, match="g.shape"):
        gla_naive(q, k, v, g[..., :3])
    with pytest.raises(ArgumentError, match="initial_state.shape"):
        gla_chunked(*xs, initial_state=s0.transpose(-1, -2))      # (d_v, d_k): the paper's layout
    with pytest.raises(ArgumentError, match="q.shape"):
        gla_step(q, k, v, g)                                      # a sequence given to the one-token step


# --- flash-linear-attention's naive forms: implementations no one here wrote --------------------------------------

def _fla(module):
    return pytest.importorskip(f"fla.ops.{module}.naive")


def _btH(x):
    return x.transpose(1, 2)     # (B, H, T, d) <-> fla's (B, T, H, d)


def _fla_gla(xs, s0):
    "fla's naive_recurrent_gla: (B, T, H, d) layout, g per key channel, scale d_k^-0.5, fp32 inside."
    q, k, v, g = xs
    o, S = _fla("gla").naive_recurrent_gla(*(_btH(x) for x in (q, k, v, g)), initial_state=s0, output_final_state=True)
    return _btH(o), S


@pytest.mark.parametrize("ours", ["naive", "chunked", "step"])
def test_matches_fla_naive_recurrent_gla(ours):
    xs, s0 = inputs(dtype=torch.float32)
    o_fla, S_fla = _fla_gla(xs, s0)
    run = {"naive": gla_naive, "chunked": chunked(4, 2), "step": step_loop}[ours]
    o, S = run(*xs, initial_state=s0)
    close(o, o_fla, 1e-5); close(S, S_fla, 1e-5)


@pytest.mark.parametrize("ours", ["naive", "chunked", "step"])
def test_matches_fla_naive_recurrent_simple_gla(ours):
    "One decay per head and token: fla's simple GLA takes g (B, T, H)."
    xs, s0 = inputs(dtype=torch.float32, per_head=True)
    q, k, v, g = xs
    o_fla, S_fla = _fla("simple_gla").naive_recurrent_simple_gla(*(_btH(x) for x in (q, k, v)), _btH(g[..., 0]),
                                                                initial_state=s0, output_final_state=True)
    run = {"naive": gla_naive, "chunked": chunked(4), "step": step_loop}[ours]
    o, S = run(*xs, initial_state=s0)
    close(o, _btH(o_fla), 1e-5); close(S, S_fla, 1e-5)


@pytest.mark.parametrize("ours", ["naive", "chunked"])
def test_matches_fla_naive_retention(ours):
    "RetNet's retention: the fixed decay gamma_h = 1 - 2^(-5-h) per head, written by fla as the parallel form."
    xs, _ = inputs(H=4, T=21, dtype=torch.float32, state=False)
    q, k, v, _ = xs
    o_fla = _fla("retention").naive_retention(q, k, v)
    log_gamma = torch.log1p(-2.0 ** (-5.0 - torch.arange(4.0)))
    g = log_gamma[None, :, None, None].expand(2, 4, 21, 1)
    o, _ = (gla_naive if ours == "naive" else chunked(8))(q, k, v, g)
    close(o, o_fla, 1e-5)


def test_fla_comparison_can_fail():
    "The planted bug: the decays applied to the wrong key channels (g reversed along d_k) must break the agreement."
    xs, s0 = inputs(dtype=torch.float32)
    o_fla, _ = _fla_gla(xs, s0)
    q, k, v, g = xs
    o, _ = gla_chunked(q, k, v, g.flip(-1), chunk_size=4, sub_chunk_size=2, initial_state=s0)
    with pytest.raises(AssertionError):
        close(o, o_fla, 1e-5)


# --- the mixers GLA and RetNet (the contract matrix of tests/test_mixers.py covers gla.yaml and retnet.yaml) -------

from smollm.config import ConfigError, build_model, compose          # noqa: E402
from smollm.gla import GLA, RetNet                                   # noqa: E402

DIM = 16
TINY = ["model=tiny", "data.vocab_size=128", "model.n_layers=4"]


def module(cls, **kw):
    torch.manual_seed(0)
    m = cls(DIM, n_heads=2, **kw).double()
    for p in m.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    return m


def x_of(B=2, T=10, seed=1):
    return torch.randn(B, T, DIM, dtype=torch.double, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cls", [GLA, RetNet])
def test_short_conv_variant_decodes_pads_and_keeps_documents_apart(cls):
    "use_short_conv (not in the yamls' defaults): the conv's state, padding and document resets with the recurrence's."
    m = module(cls, use_short_conv=True, conv_size=3, chunk_size=4)
    x = x_of()
    full = m(x)
    state = m.new_cache()
    steps = [m(x[:, :3], cache=state)] + [m(x[:, t:t + 1], cache=state) for t in range(3, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full)
    assert set(state.tensors) == {"recurrent", "q_conv", "k_conv", "v_conv"}
    padded = torch.cat([x_of(B=2, T=3, seed=7) * 5, x], 1)
    mask = torch.tensor([[False] * 3 + [True] * 10] * 2)
    torch.testing.assert_close(m(padded, key_mask=mask)[:, 3:], full)
    doc = torch.tensor([[0] * 4 + [1] * 6] * 2)
    torch.testing.assert_close(m(x, doc=doc), torch.cat([m(x[:, :4]), m(x[:, 4:])], 1))


def test_retnet_is_fla_naive_retention_inside_the_layer():
    "The layer's recurrence, rebuilt from its projections and fla's naive_retention (an implementation no one here wrote)."
    ret = _fla("retention")
    m = module(RetNet)
    x = x_of(B=1, T=12)
    heads = lambda u: u.unflatten(-1, (2, -1)).transpose(1, 2)
    o = ret.naive_retention(heads(m.q_proj(x)), heads(m.k_proj(x)), heads(m.v_proj(x)))      # fp32 inside
    theirs = m.o_proj((m.g_norm(o.transpose(1, 2)) * F.silu(heads(m.g_proj(x)).transpose(1, 2))).flatten(-2))
    close(m(x), theirs, 1e-5)


def test_gla_decay_and_errors():
    m = GLA(DIM)
    g = m.log_decay(torch.randn(2, 5, DIM))
    assert g.shape == (2, 5, 4, 2) and (g < 0).all()
    with torch.no_grad():                    # a zero gate logit: alpha = sigmoid(0)^(1/16), a half-life of 16 tokens
        m.gk_proj[1].weight.zero_(); m.gk_proj[1].bias.zero_()
    assert torch.allclose(m.log_decay(torch.randn(1, 1, DIM)).exp(), torch.tensor(0.5 ** (1 / 16)))
    with pytest.raises(ArgumentError, match="expand_k=0.5"):
        GLA(DIM, n_heads=3)
    with pytest.raises(ArgumentError, match="chunk_size=24"):
        GLA(DIM, chunk_size=24)
    with pytest.raises(ConfigError, match="model.mixers.C.chunk_size=24 is not valid"):
        compose([*TINY, "model/mixer@model.mixers.C=gla", "model.layer_pattern=CG", "model.mixers.C.chunk_size=24"])


@pytest.mark.parametrize("cls", [GLA, RetNet])
def test_bf16_keeps_an_fp32_state(cls):
    m = cls(DIM, n_heads=2).bfloat16()
    x = x_of().bfloat16()
    state = m.new_cache()
    y = m(x, cache=state)
    assert y.dtype == torch.bfloat16 and state.tensors["recurrent"].dtype == torch.float32
    assert m(x[:, :1], cache=state).dtype == torch.bfloat16


# --- flash-linear-attention's kernels (CUDA + the extra fla; run on a GPU machine with `pytest -k fla`) -----------

from smollm.gla import fla_available, gla_fla          # noqa: E402

needs_fla_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and fla_available()),
                                   reason="needs a CUDA device and flash-linear-attention (the extra fla)")


def _rel(a, b):
    "max |a - b| relative to max |b|: fla's kernels accumulate in fp32 but may multiply in tf32."
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@needs_fla_gpu
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_fla_kernels_equal_naive_forward_and_backward(per_head, packed):
    "gla_fla (fp32 on CUDA) against gla_naive (fp64 on CUDA): outputs, final state and every gradient."
    xs, s0 = inputs(B=2, H=2, T=150, dk=32, dv=64, per_head=per_head)
    doc = torch.tensor([[0] * 40 + [1] * 70 + [2] * 40, [0] * 150]).cuda() if packed else None
    gen = torch.Generator().manual_seed(2)
    do = torch.randn(2, 2, 150, 64, generator=gen, dtype=torch.float64).cuda()
    dS = torch.randn(2, 2, 32, 64, generator=gen, dtype=torch.float64).cuda()

    def run(fn, dtype):
        leaves = [x.cuda().to(dtype).requires_grad_() for x in [*xs, s0]]
        o, S = fn(*leaves[:4], initial_state=leaves[4], doc=doc)
        grads = torch.autograd.grad((o.double() * do).sum() + (S.double() * dS).sum(), leaves)
        return [o, S, *grads]
    ours = run(gla_fla, torch.float32)
    ref = run(gla_naive, torch.float64)
    for name, a, b in zip(["o", "final_state", *NAMES], ours, ref):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < 5e-3, (name, _rel(a, b))


@needs_fla_gpu
@pytest.mark.parametrize("cls", [GLA, RetNet])
def test_fla_path_in_the_mixer_equals_the_torch_path(cls):
    "The mixer on CUDA with kernels auto (fla) and torch (smollm's chunked form): forward, backward, documents, prefill."
    torch.manual_seed(0)
    m = cls(128, n_heads=2, use_short_conv=True).cuda()
    x = torch.randn(2, 150, 128, device="cuda")
    doc = torch.tensor([[0] * 40 + [1] * 110, [0] * 150], device="cuda")

    def run(impl, **kw):
        for mod in m.modules():
            if hasattr(mod, "impl"):
                mod.impl = impl
        m.zero_grad()
        y = m(x, **kw)
        y.square().mean().backward()
        return [y] + [p.grad.clone() for p in m.parameters()]
    for kw in ({}, {"doc": doc}):
        for a, b in zip(run("auto", **kw), run("torch", **kw)):
            assert _rel(a, b) < 5e-3, _rel(a, b)
    state = m.new_cache()                   # a prefill through fla, then decoding steps, equal to the full forward
    with torch.no_grad():
        full = m(x[:, :80])
        y = torch.cat([m(x[:, :70], cache=state)] + [m(x[:, t:t + 1], cache=state) for t in range(70, 80)], 1)
    assert _rel(y, full) < 5e-3


@needs_fla_gpu
def test_fla_gated_linear_attention_layer_equals_our_gla():
    "fla's own GatedLinearAttention layer (fused norm and gate) on copied weights: an implementation no one here wrote."
    from fla.layers import GatedLinearAttention
    torch.manual_seed(0)
    theirs = GatedLinearAttention(hidden_size=128, num_heads=2, expand_k=0.5, expand_v=1.0).cuda()
    ours = GLA(128, n_heads=2).cuda()
    state = {k.replace("g_norm_swish_gate", "g_norm"): v for k, v in theirs.state_dict().items()}
    ours.load_state_dict(state)
    x = torch.randn(2, 150, 128, device="cuda")
    assert _rel(ours(x), theirs(x)[0]) < 5e-3
