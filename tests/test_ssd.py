"""Mamba2's SSD ops (smollm.ssd): the chunked form and the decoding step against the step-by-step recurrence,
forward and backward (autograd through the recurrence is the reference for the gradients of x, dt, A, B, C, D),
special cases against plain math, and transformers' own Mamba2 SSD (its chunk scan and its state update, and the
whole Mamba2Mixer with smollm's SSD swapped into the middle) on the same tensors. The last test plants a bug
(the decay applied after the input) and requires the comparison to fail.
"""
import pytest
import torch
import torch.nn.functional as F

from smollm.errors import ArgumentError
import smollm.ssd
from smollm.ssd import Mamba2, doc_starts_upto, fla_available, heads_of_groups, ssd_chunked, ssd_fla, ssd_naive, ssd_step

hf = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")


def inputs(b=2, t=13, h=4, p=3, g=2, n=5, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)
    ts = [r(b, t, h, p), F.softplus(r(b, t, h)), -torch.rand(h, generator=gen) - 0.1, r(b, t, g, n), r(b, t, g, n), r(h)]
    return [v.requires_grad_(grad) for v in ts]


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("L", [1, 4, 16, 5])
def test_chunked_equals_naive_forward_and_backward(L):
    args = inputs(grad=True)
    init = torch.randn(2, 4, 3, 5, requires_grad=True)
    outs = []
    for f in (lambda: ssd_naive(*args, initial_state=init), lambda: ssd_chunked(*args, chunk_size=L, initial_state=init)):
        y, s = f()
        loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + (s ** 2).sum()
        outs.append((y, s, torch.autograd.grad(loss, args + [init])))
    (y0, s0, g0), (y1, s1, g1) = outs
    close(y1, y0); close(s1, s0)
    for a, b in zip(g1, g0):
        close(a, b, 1e-4)


def test_step_equals_naive_forward_and_backward():
    args = inputs(grad=True)
    x, dt, A, B, C, D = args
    y0, s0 = ssd_naive(*args)
    state, ys = None, []
    for i in range(x.shape[1]):
        yi, state = ssd_step(x[:, i], dt[:, i], A, B[:, i], C[:, i], D, state)
        ys.append(yi)
    y1 = torch.stack(ys, 1)
    close(y1, y0); close(state, s0)
    for a, b in zip(torch.autograd.grad(y1.sin().sum(), args), torch.autograd.grad(y0.sin().sum(), args)):
        close(a, b, 1e-4)


DOCS = torch.tensor([[0] * 4 + [1] * 5 + [2] * 4, [0] * 12 + [1]])   # starts inside chunks, on a boundary, last token


@pytest.mark.parametrize("L", [1, 3, 4, 16])
def test_documents_chunked_equals_naive_forward_and_backward(L):
    args = inputs(grad=True)
    init = torch.randn(2, 4, 3, 5, requires_grad=True)
    outs = []
    for f in (lambda: ssd_naive(*args, initial_state=init, doc=DOCS),
              lambda: ssd_chunked(*args, chunk_size=L, initial_state=init, doc=DOCS)):
        y, s = f()
        assert torch.isfinite(y).all()
        loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + (s ** 2).sum()
        outs.append((y, s, torch.autograd.grad(loss, args + [init])))
    (y0, s0, g0), (y1, s1, g1) = outs
    close(y1, y0); close(s1, s0)
    for a, b in zip(g1, g0):
        close(a, b, 1e-4)


def test_documents_run_as_if_alone():
    x, dt, A, B, C, D = inputs()
    init = torch.randn(2, 4, 3, 5)
    y, s = ssd_naive(x, dt, A, B, C, D, initial_state=init, doc=DOCS)
    for lo, hi in ((4, 9), (9, 13)):
        alone, last = ssd_naive(x[:1, lo:hi], dt[:1, lo:hi], A, B[:1, lo:hi], C[:1, lo:hi], D)
        close(y[:1, lo:hi], alone)
    close(s[:1], last)
    first, _ = ssd_naive(x[:, :4], dt[:, :4], A, B[:, :4], C[:, :4], D, initial_state=init)   # continues the state
    close(y[:, :4], first)
    assert doc_starts_upto(DOCS).tolist() == [[0] * 4 + [1] * 5 + [2] * 4, [0] * 12 + [1]]


def test_split_sequence_carries_state():
    x, dt, A, B, C, D = inputs(t=19)
    y, s = ssd_naive(x, dt, A, B, C, D)
    for f in (ssd_naive, lambda *a, **k: ssd_chunked(*a, chunk_size=4, **k)):
        y1, s1 = f(x[:, :9], dt[:, :9], A, B[:, :9], C[:, :9], D)
        y2, s2 = f(x[:, 9:], dt[:, 9:], A, B[:, 9:], C[:, 9:], D, initial_state=s1)
        close(torch.cat([y1, y2], 1), y); close(s2, s)


def test_no_memory_when_A_very_negative():
    x, dt, A, B, C, D = inputs()
    A = torch.full_like(A, -1e4)
    want = dt[..., None] * (heads_of_groups(C, 4) * heads_of_groups(B, 4)).sum(-1)[..., None] * x + D[:, None] * x
    for y, _ in (ssd_naive(x, dt, A, B, C, D), ssd_chunked(x, dt, A, B, C, D, chunk_size=4)):
        close(y, want)


def test_tiny_dt_is_the_skip():
    x, dt, A, B, C, D = inputs()
    dt = torch.full_like(dt, 1e-8)
    for y, _ in (ssd_naive(x, dt, A, B, C, D), ssd_chunked(x, dt, A, B, C, D, chunk_size=4)):
        close(y, D[:, None] * x)


def test_matches_transformers_chunk_scan_and_state_update():
    x, dt, A, B, C, D = inputs(t=11)
    init = torch.randn(2, 4, 3, 5)
    yt, st = hf.mamba2_chunk_scan(x, dt, A, B, C, chunk_size=4, D=D, initial_states=init, return_final_states=True)
    y, s = ssd_chunked(x, dt, A, B, C, D, chunk_size=4, initial_state=init)
    close(y, yt); close(s, st)
    # transformers' decoding update works per (head, head_dim) and writes its state in place
    state = init.clone()
    yh = hf.mamba2_selective_state_update(state, x[:, 0], dt[:, 0, :, None].expand(-1, -1, 3), A[:, None, None].expand(-1, 3, 5),
                                          B[:, 0], C[:, 0], D[:, None].expand(-1, 3))
    y1, s1 = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, init)
    close(y1, yh); close(s1, state)


def _mixer():
    from transformers import Mamba2Config
    cfg = Mamba2Config(hidden_size=16, num_heads=4, head_dim=8, expand=2, state_size=6, n_groups=2, chunk_size=4,
                       conv_kernel=4, num_hidden_layers=1, vocab_size=32)
    torch.manual_seed(0)
    m = hf.Mamba2Mixer(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def _mixer_with(m, h, ssd):
    "Mamba2Mixer.forward's torch path with its SSD replaced by `ssd` (transformers' conventions, written out)."
    b, t, _ = h.shape
    gate, xBC, dt = m.in_proj(h).split([m.intermediate_size, m.conv_dim, m.num_heads], -1)
    xBC = F.silu(m.conv1d(xBC.transpose(1, 2))[..., :t].transpose(1, 2))
    x, B, C = xBC.split([m.intermediate_size, m.n_groups * m.ssm_state_size, m.n_groups * m.ssm_state_size], -1)
    dt = F.softplus(dt + m.dt_bias).clamp(*m.time_step_limit)
    A = -torch.exp(m.A_log.float())
    y, _ = ssd(x.view(b, t, m.num_heads, m.head_dim), dt, A, B.view(b, t, m.n_groups, -1), C.view(b, t, m.n_groups, -1), m.D)
    return m.out_proj(m.norm(y.reshape(b, t, -1), gate))


def test_matches_transformers_mamba2_mixer():
    m = _mixer()
    h = torch.randn(2, 10, 16)
    with torch.no_grad():
        want = m(h)
        close(_mixer_with(m, h, lambda *a: ssd_chunked(*a, chunk_size=4)), want)
        close(_mixer_with(m, h, ssd_naive), want)


def test_planted_bug_is_caught():
    def wrong(x, dt, A, B, C, D):  # decays the new input too: h_t = exp(dt A) (h_{t-1} + dt x B^T)
        y, s = ssd_naive(x, dt, A, B, C, None)
        return y * torch.exp(dt * A)[..., None] + D[:, None] * x, s
    m = _mixer()
    h = torch.randn(2, 10, 16)
    with torch.no_grad(), pytest.raises(AssertionError):
        close(_mixer_with(m, h, wrong), m(h))


@pytest.mark.parametrize("bias, conv_bias, groups, limit", [(False, True, 2, (0.0, float("inf"))),
                                                        (True, False, 1, (0.0, float("inf"))),
                                                        (False, True, 4, (0.05, 0.5))])
def test_mamba2_matches_transformers_prefill_and_cached_decode(bias, conv_bias, groups, limit):
    from transformers import DynamicCache, Mamba2Config
    cfg = Mamba2Config(hidden_size=16, num_heads=4, head_dim=8, expand=2, state_size=6, n_groups=groups, chunk_size=4,
                       conv_kernel=4, num_hidden_layers=1, vocab_size=32, use_bias=bias, use_conv_bias=conv_bias,
                       time_step_limit=limit)
    torch.manual_seed(0)
    theirs = hf.Mamba2Mixer(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ours = Mamba2(16, d_state=6, head_dim=8, expand=2, n_groups=groups, conv_kernel=4, chunk_size=8, bias=bias,
                  conv_bias=conv_bias, norm_eps=cfg.layer_norm_epsilon, dt_limit=limit)
    ours.load_state_dict(theirs.state_dict())              # the same names and shapes: loads as is
    assert ours.n_heads == cfg.num_heads and ours.norm.eps == theirs.norm.variance_epsilon
    h = torch.randn(2, 11, 16)
    with torch.no_grad():
        close(ours(h), theirs(h))
        if limit[0] > 0:   # transformers' decoding step does not clamp dt (its prefill does); smollm clamps both
            return
        cache, state = DynamicCache(config=cfg), ours.new_cache()
        want = [theirs(h[:, :6], cache=cache)] + [theirs(h[:, t:t + 1], cache=cache) for t in range(6, 11)]
        got = [ours(h[:, :6], None, None, state)] + [ours(h[:, t:t + 1], None, None, state) for t in range(6, 11)]
        close(torch.cat(got, 1), torch.cat(want, 1))
        close(state.tensors["ssm"], cache.layers[0].recurrent_states[0])


def test_mamba2_left_padding_matches_transformers():
    # transformers zeroes padded inputs (and their conv outputs); smollm zeroes the conv input and dt, which leaves
    # the state exactly as it was. Before the first real token the state is zero either way: the outputs agree.
    from transformers import Mamba2Config
    cfg = Mamba2Config(hidden_size=16, num_heads=4, head_dim=8, expand=2, state_size=6, n_groups=2, chunk_size=4,
                       conv_kernel=4, num_hidden_layers=1, vocab_size=32)
    torch.manual_seed(0)
    theirs = hf.Mamba2Mixer(cfg, layer_idx=0).eval()
    ours = Mamba2(16, d_state=6, head_dim=8, expand=2, n_groups=2, conv_kernel=4, chunk_size=4)
    ours.load_state_dict(theirs.state_dict())
    h, mask = torch.randn(2, 9, 16), torch.ones(2, 9, dtype=torch.bool)
    mask[0, :4] = False
    with torch.no_grad():
        want, got = theirs(h, attention_mask=mask.long()), ours(h, key_mask=mask)
    close(got[0, 4:], want[0, 4:]); close(got[1], want[1])


# ---- flash-linear-attention: SSD as simple GLA (q = C, k = B, v = dt x, g = dt A, scale 1) ----


def test_fla_naive_simple_gla_is_a_second_reference():
    naive = pytest.importorskip("fla.ops.simple_gla.naive")
    x, dt, A, B, C, _ = inputs()
    init = torch.randn(2, 4, 3, 5)
    want, ws = ssd_naive(x, dt, A, B, C, None, initial_state=init)
    q, k, v, g = heads_of_groups(C, 4), heads_of_groups(B, 4), x * dt[..., None], dt * A
    o, st = naive.naive_recurrent_simple_gla(q, k, v, g, scale=1.0, initial_state=init.transpose(-1, -2))
    close(o, want, 1e-4); close(st.transpose(-1, -2), ws, 1e-4)    # fla's state is (N, P): key first
    o, st = naive.naive_chunk_simple_gla(q, k, v, g, scale=1.0, chunk_size=4, initial_state=init.transpose(-1, -2),
                                         output_final_state=True)
    close(o, want, 1e-4); close(st.transpose(-1, -2), ws, 1e-4)


def _gla_on_cpu(q, k, v, g, scale, initial_state, output_final_state, state_v_first, cu_seqlens_cpu=None, **_):
    "chunk_simple_gla's interface, by fla's naive recurrence one sequence at a time: each row, or one row cut at cu."
    naive = pytest.importorskip("fla.ops.simple_gla.naive")
    assert scale == 1.0 and state_v_first and output_final_state
    if cu_seqlens_cpu is None:
        seqs = [(r, 0, q.shape[1]) for r in range(q.shape[0])]
    else:
        cu = cu_seqlens_cpu.tolist()
        seqs = [(0, lo, hi) for lo, hi in zip(cu[:-1], cu[1:])]
    outs, states = [], []
    for i, (r, lo, hi) in enumerate(seqs):
        h0 = None if initial_state is None else initial_state[i:i + 1].transpose(-1, -2)
        o, st = naive.naive_recurrent_simple_gla(*(t[r:r + 1, lo:hi] for t in (q, k, v, g)), scale=1.0, initial_state=h0)
        outs.append(o); states.append(st.transpose(-1, -2))
    return torch.cat(outs, 0 if cu_seqlens_cpu is None else 1), torch.cat(states)


@pytest.mark.parametrize("packed", [False, True])
def test_fla_mapping_and_document_cuts_on_cpu(monkeypatch, packed):
    # ssd_fla's own work (heads, layouts, rows cut into documents, their initial and final states), with fla's
    # kernel replaced by its naive recurrence, so that it runs without a GPU
    monkeypatch.setattr(smollm.ssd, "_chunk_simple_gla", lambda: _gla_on_cpu)
    x, dt, A, B, C, D = inputs()
    init, doc = torch.randn(2, 4, 3, 5), DOCS if packed else None
    y, s = ssd_fla(x, dt, A, B, C, D, initial_state=init, doc=doc)
    y0, s0 = ssd_naive(x, dt, A, B, C, D, initial_state=init, doc=doc)
    close(y, y0, 1e-4); close(s, s0, 1e-4)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.skipif(not (torch.cuda.is_available() and fla_available()), reason="needs CUDA and the extra fla")
@pytest.mark.parametrize("packed", [False, True])
def test_fla_kernel_equals_naive_forward_and_backward(packed):
    b, t, h, p, g, n = 2, 150, 4, 16, 2, 32
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen)
    args = [r(b, t, h, p), F.softplus(r(b, t, h)) * 0.5, -torch.rand(h, generator=gen) - 0.1, r(b, t, g, n) * 0.3,
            r(b, t, g, n) * 0.3, r(h), r(b, h, p, n)]
    args = [a.cuda().requires_grad_() for a in args]
    doc = torch.tensor([[0] * 40 + [1] * 64 + [2] * 46, [0] * 149 + [1]]).cuda() if packed else None
    dy = torch.randn(b, t, h, p, generator=gen).cuda()
    res = []
    for f in (ssd_fla, ssd_naive):
        y, s = f(*args[:6], initial_state=args[6], doc=doc)
        res.append([y, s, *torch.autograd.grad((y * dy).sum() + s.square().sum(), args)])
    for name, got, want in zip(["y", "state", "dx", "ddt", "dA", "dB", "dC", "dD", "dinit"], *res):
        assert _rel(got, want) < 5e-3, f"{name}: relative error {_rel(got, want):.2e}"


@pytest.mark.skipif(not (torch.cuda.is_available() and fla_available()), reason="needs CUDA and the extra fla")
def test_fla_mamba2_module_on_cuda_equals_torch_form(monkeypatch):
    calls = []
    monkeypatch.setattr(smollm.ssd, "ssd_fla", lambda *a, **k: calls.append(1) or ssd_fla(*a, **k))
    torch.manual_seed(0)
    m = Mamba2(32, d_state=16, head_dim=16, n_groups=2, chunk_size=16).cuda()     # heads 16 wide: fla's kernel
    h = torch.randn(2, 70, 32, device="cuda")
    doc = torch.tensor([[0] * 30 + [1] * 40, [0] * 70], device="cuda")
    for d in (None, doc):
        m.impl = "auto"
        y = m(h, doc=d)
        m.impl = "torch"
        assert _rel(y, m(h, doc=d)) < 5e-3
    assert len(calls) == 2


def _ours(**kw):
    torch.manual_seed(0)
    m = Mamba2(16, d_state=6, head_dim=8, expand=2, n_groups=2, chunk_size=4, **kw).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def test_mamba2_static_state_decodes_in_place():
    m = _ours()
    x = torch.randn(2, 9, 16, dtype=torch.double)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[0, :3] = False
    full = m(x, key_mask=mask[:, :9])
    state = m.new_cache(capacity=16)
    outs = [m(x[:, :2], None, None, state, key_mask=mask), m(x[:, 2:4], None, None, state, key_mask=mask)]
    ssm = state.tensors["ssm"]
    outs += [m(x[:, t:t + 1], None, None, state, key_mask=mask) for t in range(4, 9)]
    assert state.tensors["ssm"] is ssm and int(state.length) == 9        # written in place, one tensor throughout
    y = torch.cat(outs, 1)
    close(y[1], full[1], 1e-10); close(y[0, 3:], full[0, 3:], 1e-10)


def test_mamba2_state_is_float32_for_bfloat16():
    m = _ours().to(torch.bfloat16)
    state = m.new_cache()
    y = m(torch.randn(1, 5, 16, dtype=torch.bfloat16), None, None, state)
    assert y.dtype == torch.bfloat16 and state.tensors["ssm"].dtype == torch.float32


def test_argument_errors():
    x, dt, A, B, C, D = inputs()
    with pytest.raises(ArgumentError, match="dt="):
        ssd_naive(x, dt[:, :-1], A, B, C, D)
    with pytest.raises(ArgumentError, match="groups"):
        ssd_chunked(x, dt, A, B[:, :, :1].expand(-1, -1, 3, -1), C, D)
    with pytest.raises(ArgumentError, match="chunk_size"):
        ssd_chunked(x, dt, A, B, C, D, chunk_size=0)
    with pytest.raises(ArgumentError, match="doc="):
        ssd_chunked(x, dt, A, B, C, D, doc=DOCS[:, :5])
    with pytest.raises(ArgumentError, match="head_dim=5"):
        Mamba2(16, head_dim=5)
    with pytest.raises(ArgumentError, match="n_groups=3"):
        Mamba2(16, head_dim=8, n_groups=3)
    with pytest.raises(ArgumentError, match="conv_kernel=1"):
        Mamba2(16, conv_kernel=1)
