"""The attention family (smollm.attention): every config option x every positional encoding.

Attention options are the yaml files of conf/model/attention plus the overrides in EXTRA; positional encodings
are whatever conf/model/positional holds, so new files of either group are picked up as they land. Backends are
smollm.attention.BACKENDS, and what each supports is read from its class, so a new backend or a new capability
is picked up too. References are written out here with plain tensor ops (no smollm.kernels, no sdpa).
"""
import copy
import functools
import math
import re

import pytest
import torch

from smollm.attention import (BACKENDS, CAPABILITIES, MLA, Attention, DiffAttention, GrowingCache, StaticCache, attend,
                              bias_need, supporting)
from smollm.config import build_model, compose, options
from smollm.errors import ArgumentError
from smollm.norms import RMSNorm
from smollm.positional import NoPE, Positional, RoPE
from smollm.testing import check_gradients, check_model

TINY = ("model=tiny", "data.vocab_size=256")
V, T = 256, 12

ATTN = {name: (f"model/attention={name}",) for name in options("model/attention")}
ATTN["sliding_window"] += ("model.attention.window=4",)          # a window that bites at T = 12
EXTRA = {
    "qkv_bias": ("model/attention=gqa", "model.attention.qkv_bias=true"),
    "all_options": ("model/attention=gqa", "model.attention.qkv_bias=true", "model.attention.qk_norm=true",
                    "model.attention.output_gate=true", "model.attention.sinks=true", "++model.attention.window=4"),
    "softcap_bites": ("model/attention=softcap", "model.attention.softcap=0.05", "++model.attention.window=5"),
    "softcap_fused": ("model/attention=softcap", "model.attention.backend=fused"),
    "pattern_SG": ("model/attention=sliding_window", "model.attention.window=4", "model.layer_pattern=SG"),
    "pattern_SN": ("model/attention=sinks", "++model.attention.window=3", "model.layer_pattern=SN"),
    "mla_q_lora_window": ("model/attention=mla", "model.attention.q_lora_rank=24", "model.attention.kv_lora_rank=16",
                          "model.attention.window=4"),
    "mla_softcap_eager": ("model/attention=mla", "model.attention.softcap=0.05", "model.attention.backend=eager"),
    "qk_norm_dyt": ("model/attention=qk_norm", "+model/norm@model.attention.norm=dyt"),
    "qk_norm_all_dyt": ("model/attention=qk_norm_all", "+model/norm@model.attention.norm=dyt"),
    "qk_norm_all_window": ("model/attention=qk_norm_all", "++model.attention.window=4", "model.layer_pattern=SG"),
    "mla_latent_layernorm": ("model/attention=mla", "model.attention.q_lora_rank=24",
                             "+model/norm@model.attention.norm=layernorm"),
    "value_residual": ("model/attention=gqa", "model.value_residual=true", "model.n_layers=3"),
    "differential_value_residual": ("model/attention=differential", "model.value_residual=true"),
    "differential_pattern_SG": ("model/attention=differential", "++model.attention.window=4", "model.layer_pattern=SG"),
}
ATTN.update(EXTRA)
POS = options("model/positional")


@functools.lru_cache(None)
def _compose(overrides: tuple):
    return compose(TINY + overrides)


def config(attn: str, pos: str = "rope", **attention):
    "The composed config of attention option `attn` with positional option `pos`, and `attention` keys set."
    cfg = _compose(ATTN[attn]).copy()
    cfg.model.positional = _compose((f"model/positional={pos}",)).model.positional
    for key, value in attention.items():
        cfg.model.attention[key] = value
    return cfg


def model(attn: str, pos: str = "rope", **attention):
    torch.manual_seed(0)
    return build_model(config(attn, pos, **attention).model).eval()


def needs(m) -> set[str]:
    "The capabilities (keys of CAPABILITIES) that the first layer of model m uses with m's positional encoding."
    return m.layers[0].attn.needs(m.positional)


def refused(attn: str, pos: str) -> str | None:
    """The error pattern if the backend of `attn` lacks what positional `pos` needs (read from the classes), else None.
    The model is built on eager, which supports everything, to ask its positional."""
    need = bias_need(model(attn, pos, backend="eager").positional)
    backend = config(attn, pos).model.attention.get("backend", "sdpa")
    if need is None or need in BACKENDS[backend].supports:
        return None
    return f"backend='{backend}' is not valid: .*backends that can: {', '.join(supporting(need))}"


def backends(m) -> list[str]:
    "The backends whose classes declare every capability the model's attention uses."
    return [name for name, b in BACKENDS.items() if needs(m) <= b.supports]


def ids(B=2, n=T):
    return torch.randint(0, V, (B, n), generator=torch.Generator().manual_seed(1))


def decode(m, x, prefill=5, key_mask=None):
    "Logits of x (B, n) from a prefill of `prefill` tokens and then one token at a time, through the cache."
    cache, n = m.new_cache(), x.shape[1]
    km = lambda e: None if key_mask is None else key_mask[:, :e]
    steps = [m(x[:, :prefill], cache, key_mask=km(prefill))]
    steps += [m(x[:, t:t + 1], cache, key_mask=km(t + 1)) for t in range(prefill, n)]
    assert cache[0].length == n
    return torch.cat(steps, 1)



# ---- every option builds and trains ------------------------------------------------------------------------

@pytest.mark.parametrize("attn", ATTN)
def test_option_builds_and_trains(attn):
    m = model(attn).train()
    x = ids()
    loss = m.loss(x[:, :-1], x[:, 1:])
    assert torch.isfinite(loss) and abs(loss.item() - math.log(V)) < 1.0
    check_gradients(m, lambda: loss, attn)        # a finite, nonzero gradient on every parameter


def test_options_take_effect():
    a = model("all_options").layers[0].attn
    assert a.q_proj.bias is not None and a.q_norm is not None and a.gate_proj is not None
    assert a.sinks.shape == (4,) and a.window == 4
    assert model("softcap").layers[0].attn.softcap == 50.0
    assert [blk.attn.window for blk in model("pattern_SG").layers] == [4, None]
    assert model("pattern_SN").nope_layers == {1}
    assert isinstance(model("mla").layers[0].attn, MLA)
    assert [model(n).layers[0].attn.n_kv_heads for n in ("mha", "gqa", "mqa")] == [4, 2, 1]
    a = model("qk_norm_all").layers[0].attn   # whole projections: n_heads * head_dim and n_kv_heads * head_dim wide
    assert a.q_norm.weight.shape == (a.n_heads * a.head_dim,) and a.k_norm.weight.shape == (a.n_kv_heads * a.head_dim,)
    assert model("qk_norm").layers[0].attn.q_norm.weight.shape == (a.head_dim,)


# ---- causality and the KV cache, for every attention x positional --------------------------------------------

@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize("attn", ATTN)
def test_causal(attn, pos):
    if err := refused(attn, pos):      # refused when the model is built (a ConfigError naming the key), or when it runs
        with pytest.raises(ValueError, match=err):
            model(attn, pos)(ids())
        return
    # earlier logits move by at most 1e-6; the changed token's own by more than 1e-4 (so the check can fail)
    check_model(model(attn, pos), x=ids(1), checks=["causality"], positions=(0, 6, T - 1), causal_atol=1e-6,
                reach=1e-4, name=f"{attn} with {pos}")


@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize("attn", ATTN)
def test_cache_decoding_equals_full_forward(attn, pos):
    if refused(attn, pos):
        pytest.skip(f"{attn}'s backend cannot apply {pos}'s score bias: refused (test_causal checks it)")
    check_model(model(attn, pos), x=ids(), checks=["decoding"], prefill=(5,), atol=1e-5, rtol=1e-4,
                name=f"{attn} with {pos}")


# ---- backends --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize("attn", ATTN)
def test_backends_agree(attn, pos):
    ref = model(attn, pos, backend="eager")
    x = ids()
    with torch.no_grad():
        want_full, want_steps = ref(x), decode(ref, x, prefill=8)
        for backend in backends(ref):
            m = model(attn, pos, backend=backend)
            m.load_state_dict(ref.state_dict())
            torch.testing.assert_close(m(x), want_full, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(decode(m, x, prefill=8), want_steps, atol=1e-5, rtol=1e-4)


def rope(t, pos, theta=10000.0):
    "Rotary embedding written out: rotate-half layout, t (..., T, d)."
    d = t.shape[-1]
    ang = pos.double()[:, None] * theta ** -(torch.arange(0, d, 2).double() / d)
    cos, sin = torch.cat([ang, ang], -1).cos().float(), torch.cat([ang, ang], -1).sin().float()
    t1, t2 = t.chunk(2, -1)
    return t * cos + torch.cat([-t2, t1], -1) * sin


def rms(t, w, eps):
    return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w


def norm(n, t):
    "The norm module n on t: RMSNorm written out here; any other norm runs its own (tested) forward."
    return rms(t, n.weight, n.eps) if type(n) is RMSNorm and not n.unit_offset else n(t)


def hidden(n, window):
    "(n, n) bool: the keys a query may not see (future, or outside the window)."
    i = torch.arange(n)
    h = i[None, :] > i[:, None]
    return h | (i[None, :] <= i[:, None] - window) if window else h


def attention_reference(a: Attention, x):
    "What `a` computes on x (B, n, dim) with RoPE at positions 0..n-1, from its weights and the papers' formulas."
    B, n, _ = x.shape
    H, G, hd = a.n_heads, a.n_heads // a.n_kv_heads, a.head_dim
    q, k, v = (p(x) for p in (a.q_proj, a.k_proj, a.v_proj))
    whole = a.q_norm is not None and a.qk_norm_scope == "all"   # OLMoE: over each token's whole q and whole k
    if whole:
        q, k = norm(a.q_norm, q), norm(a.k_norm, k)
    q, k, v = (t.view(B, n, -1, hd).transpose(1, 2) for t in (q, k, v))
    if a.q_norm is not None and not whole:
        q, k = norm(a.q_norm, q), norm(a.k_norm, k)
    pos = torch.arange(n)
    q, k = rope(q, pos), rope(k, pos)
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if a.softcap:
        s = a.softcap * torch.tanh(s / a.softcap)
    e = s.masked_fill(hidden(n, a.window), float("-inf")).exp()
    denom = e.sum(-1, keepdim=True)
    if a.sinks is not None:                       # gpt-oss: exp(sink) joins the denominator only
        denom = denom + a.sinks.exp().view(1, H, 1, 1)
    y = ((e / denom) @ v).transpose(1, 2).reshape(B, n, H * hd)
    if a.gate_proj is not None:
        y = y * torch.sigmoid(a.gate_proj(x))
    return a.o_proj(y)


@pytest.mark.parametrize("opts", [dict(), dict(window=3), dict(softcap=2.0), dict(softcap=2.0, window=4),
                                  dict(sinks=True), dict(sinks=True, window=3), dict(qk_norm=True),
                                  dict(qk_norm=True, qk_norm_scope="all"), dict(output_gate=True), dict(qkv_bias=True, qk_norm=True, sinks=True,
                                                               output_gate=True, window=5)],
                         ids=lambda o: "+".join(o) or "plain")
@pytest.mark.parametrize("kv", [4, 2, 1])
def test_attention_matches_reference(opts, kv):
    x = torch.randn(2, 10, 32)
    for backend in BACKENDS:
        if not set(opts) & set(CAPABILITIES) <= BACKENDS[backend].supports:
            continue
        torch.manual_seed(0)
        a = Attention(32, 4, kv, backend=backend, **opts)
        with torch.no_grad():
            a.q_proj.weight.mul_(8)                # scores well past the cap and the sink's scale
            if a.sinks is not None:
                a.sinks.normal_()
            if a.q_proj.bias is not None:
                a.q_proj.bias.normal_(); a.k_proj.bias.normal_()
            if a.q_norm is not None:
                a.q_norm.weight.normal_(); a.k_norm.weight.normal_()
            torch.testing.assert_close(a(x, RoPE(32, 4, 8, 16), torch.arange(10)), attention_reference(a, x),
                                       atol=1e-5, rtol=1e-4)
            if "softcap" in opts:                  # the cap changes the result, so the check above can fail
                plain = Attention(32, 4, kv, window=a.window); plain.load_state_dict(a.state_dict())
                r = RoPE(32, 4, 8, 16)
                assert (plain(x, r, torch.arange(10)) - a(x, r, torch.arange(10))).abs().max() > 1e-3


@pytest.mark.parametrize("backend", supporting("sinks"))
def test_very_negative_sink_is_plain_attention(backend):
    x, r, pos = torch.randn(2, 9, 32), RoPE(32, 4, 8, 16), torch.arange(9)
    a = Attention(32, 4, 2, sinks=True, backend=backend)
    plain = Attention(32, 4, 2, backend=backend)
    plain.load_state_dict(a.state_dict(), strict=False)
    with torch.no_grad():
        a.sinks.fill_(-1e4)
        torch.testing.assert_close(a(x, r, pos), plain(x, r, pos), atol=1e-6, rtol=0)
        a.sinks.fill_(1.0)
        assert (a(x, r, pos) - plain(x, r, pos)).abs().max() > 1e-3


# ---- MLA -----------------------------------------------------------------------------------------------------

def mla_reference(a: MLA, x):
    """MLA in the absorbed form of DeepSeek-V2: queries score the cached latents through W_UK, and the weighted
    latents go through W_UV; RoPE at positions 0..n-1 on the decoupled rotary part."""
    B, n, _ = x.shape
    H, hd, rd, r = a.n_heads, a.head_dim, a.rope_dim, a.kv_lora_rank
    if a.q_lora_rank:
        q = a.q_b_proj(norm(a.q_a_layernorm, a.q_a_proj(x)))
    else:
        q = a.q_proj(x)
    q = q.view(B, n, H, hd + rd).transpose(1, 2)
    ckv = a.kv_a_proj_with_mqa(x)
    c = norm(a.kv_a_layernorm, ckv[..., :r])                                   # (B, n, r)
    pos = torch.arange(n)
    q_rope, k_rope = rope(q[..., hd:], pos), rope(ckv[..., r:], pos)             # (B, H, n, rd), (B, n, rd)
    W = a.kv_b_proj.weight.view(H, 2 * hd, r)
    s = torch.einsum("bhtd,hdr,bsr->bhts", q[..., :hd], W[:, :hd], c) + torch.einsum("bhtd,bsd->bhts", q_rope, k_rope)
    s = s / math.sqrt(hd + rd)
    if a.softcap:
        s = a.softcap * torch.tanh(s / a.softcap)
    p = s.masked_fill(hidden(n, a.window), float("-inf")).softmax(-1)
    y = torch.einsum("bhts,bsr,hdr->bthd", p, c, W[:, hd:]).reshape(B, n, H * hd)
    return a.o_proj(y)


@pytest.mark.parametrize("opts", [dict(), dict(q_lora_rank=12), dict(window=3, qk_rope_head_dim=4),
                                  dict(softcap=0.5, kv_lora_rank=6)], ids=lambda o: "+".join(o) or "plain")
def test_mla_matches_absorbed_reference(opts):
    x = torch.randn(2, 10, 32)
    for backend in BACKENDS:
        if not set(opts) & set(CAPABILITIES) <= BACKENDS[backend].supports:
            continue
        torch.manual_seed(0)
        a = MLA(32, 4, backend=backend, **opts)
        with torch.no_grad():
            torch.testing.assert_close(a(x, RoPE(32, 4, 8, 16), torch.arange(10)), mla_reference(a, x),
                                       atol=1e-5, rtol=1e-4)


def test_mla_cache_holds_the_latent():
    m = model("mla", kv_lora_rank=24, qk_rope_head_dim=8)
    a = m.layers[0].attn
    cache = m.new_cache()
    with torch.no_grad():
        m(ids(2, 7), cache)
    assert all(isinstance(c, GrowingCache) for c in cache) and [t.shape for t in cache[0].tensors] == [(2, 7, 24 + 8)]
    assert 24 + 8 < 2 * a.n_heads * a.head_dim                 # what a KV cache of full keys and values holds
    gqa = model("gqa")
    cache = gqa.new_cache()
    with torch.no_grad():
        gqa(ids(2, 7), cache)
    assert [t.shape for t in cache[0].tensors] == [(2, 2, 7, 16)] * 2   # keys and values (B, Hkv, S, hd)
    assert all(isinstance(c, StaticCache) for c in m.new_cache(capacity=9))


@pytest.mark.parametrize("name", options("model/norm"))
def test_qk_norm_and_latent_norms_take_any_norm(name):
    "`+model/norm@model.attention.norm=<name>` puts that norm preset in QK-norm and in MLA's latent norms."
    x, r, pos = torch.randn(2, 10, 64), RoPE(64, 4, 16, 64), torch.arange(10)
    for attn in (("model/attention=qk_norm",), ("model/attention=mla", "model.attention.q_lora_rank=24")):
        cfg = compose(TINY + attn + (f"+model/norm@model.attention.norm={name}",))
        torch.manual_seed(0)
        a = build_model(cfg.model).layers[0].attn
        norms = [a.q_norm, a.k_norm] if isinstance(a, Attention) else [a.q_a_layernorm, a.kv_a_layernorm]
        assert {f"{type(n).__module__}.{type(n).__name__}" for n in norms} == {cfg.model.attention.norm._target_}
        with torch.no_grad():
            for n in norms:                                    # weights away from their init, so skipping shows
                for p in n.parameters():
                    p.normal_()
            want = attention_reference(a, x) if isinstance(a, Attention) else mla_reference(a, x)
            torch.testing.assert_close(a(x, r, pos), want, atol=1e-5, rtol=1e-4)


# ---- key_mask (left padding) ---------------------------------------------------------------------------------

def check_left_padding(m):
    "Row 1 is row 0's last 7 tokens left-padded by 3: at the real tokens it equals the unpadded forward, also decoding."
    x = ids(1)
    xp = torch.cat([x, torch.cat([torch.zeros(1, 3, dtype=torch.long), x[:, 3:]], 1)])
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, :3] = False
    with torch.no_grad():
        for got in (m(xp, key_mask=mask), decode(m, xp, prefill=6, key_mask=mask)):
            torch.testing.assert_close(got[:1], m(x), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(got[1:, 3:], m(x[:, 3:]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", supporting("key_mask"))
@pytest.mark.parametrize("attn", ATTN)
def test_key_mask_left_padding(attn, backend):
    if lacks := needs(model(attn, backend="eager")) - BACKENDS[backend].supports:
        pytest.skip(f"{backend} cannot apply {sorted(lacks)}")
    check_left_padding(model(attn, backend=backend))


@pytest.mark.parametrize("pos", POS)
def test_key_mask_left_padding_positional(pos):
    m = model("gqa", pos)
    if type(m.positional).embed is not Positional.embed:
        pytest.skip(f"{pos} is an absolute encoding: left padding shifts every position")
    check_left_padding(m)


# ---- errors --------------------------------------------------------------------------------------------------

class RelBias(Positional):
    "A T5-like additive bias without ALiBi slopes: something the fused kernel cannot apply."
    def bias(self, q_pos, k_pos):
        return -0.1 * (q_pos[:, None] - k_pos[None, :]).abs().float().expand(self.n_heads, -1, -1)


def test_errors():
    x, pos = torch.randn(1, 4, 32), torch.arange(4)
    with pytest.raises(ArgumentError, match="softcap=30.0 is not valid: backend='sdpa' cannot apply .*backends that can: eager"):
        Attention(32, 4, softcap=30.0)
    with pytest.raises(ValueError, match="model.attention.softcap=50.0 is not valid"):
        compose(TINY + ("model/attention=softcap", "model.attention.backend=sdpa"))
    with pytest.raises(ArgumentError, match="sinks=True is not valid: backend='fused' cannot apply"):
        Attention(32, 4, sinks=True, backend="fused")
    with pytest.raises(ArgumentError, match="backend='flash' is not valid: one of " + re.escape(str(list(BACKENDS)))):
        Attention(32, 4, backend="flash")
    with pytest.raises(ArgumentError, match="qk_norm_scope='heads' is not valid: one of"):
        Attention(32, 4, qk_norm=True, qk_norm_scope="heads")
    with pytest.raises(ArgumentError, match="n_kv_heads=2 is not valid: None or n_heads=4: MLA"):
        MLA(32, 4, n_kv_heads=2)
    with pytest.raises(ArgumentError, match="qk_rope_head_dim=3"):
        MLA(32, 4, qk_rope_head_dim=3)
    a = Attention(32, 4, 2, backend="fused")
    with pytest.raises(ArgumentError, match="backend='fused' is not valid: .*key padding mask"):
        a(x, NoPE(32, 4, 8, 16), pos, key_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ArgumentError, match=r"backend='fused' is not valid: .*score bias \(positional RelBias\)"):
        a(x, RelBias(32, 4, 8, 16), pos)
    with pytest.raises(ArgumentError, match=r"score bias \(positional RelBias\)"):
        a.check_positional(RelBias(32, 4, 8, 16))
    with pytest.raises(ArgumentError, match="backend='fused' is not valid: .*static cache"):
        a.new_cache(capacity=8)
    with pytest.raises(ValueError, match=r"key_mask must have shape .* = \(1, 4\); got \(1, 3\)"):
        Attention(32, 4)(x, NoPE(32, 4, 8, 16), pos, key_mask=torch.ones(1, 3, dtype=torch.bool))


# ---- the backend x capability matrix, read from the classes ---------------------------------------------------

class Slopes(Positional):
    "ALiBi written out here: slopes for the fused kernel, and the same bias for the others."
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.alibi_slopes = 2.0 ** -torch.arange(1, self.n_heads + 1).float()

    def bias(self, q_pos, k_pos):
        return -self.alibi_slopes[:, None, None] * (q_pos[:, None] - k_pos[None, :]).abs().float()


def reference(q, k, v, pos, key_pos, window=None, softcap=None, sinks=None, key_mask=None, bias=None, doc=None):
    """Attention written out in float64: q (B, H, T, D) at pos (T,), k, v (B, Hkv, S, D) at key_pos (S,); doc (B, T)
    (T = S): a packed row's document indices, a query seeing keys of its own document only."""
    G = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.repeat_interleave(G, 1).double(), v.repeat_interleave(G, 1).double()
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.double()
    d = pos[:, None] - key_pos[None, :]                       # query position - key position
    hide = (d < 0) | (d >= window if window else torch.zeros_like(d, dtype=torch.bool))
    hide = hide[None, None] | (torch.zeros(q.shape[0], 1, 1, 1, dtype=torch.bool) if key_mask is None
                               else ~key_mask[:, None, None, :])
    if doc is not None:
        hide = hide | (doc[:, None, :, None] != doc[:, None, None, :])
    e = s.masked_fill(hide, float("-inf")).exp()
    denom = e.sum(-1, keepdim=True) + (0 if sinks is None else sinks.double().exp().view(1, -1, 1, 1))
    return ((e / denom) @ v).float()


def case(option: str):
    """The inputs of `attend` that exercise one capability: q (2, 4, 5, 8) at positions 2..6 over 7 keys (GQA, two
    cached), the positional, and the keyword arguments; plus the reference's keyword arguments."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 8, generator=g) for h, n in ((4, 5), (2, 7), (2, 7)))
    pos, key_pos = torch.arange(2, 7), torch.arange(7)
    positional, kw, ref = NoPE(32, 4, 8, 16), {}, {}
    if option == "window":
        kw = ref = dict(window=3)
    elif option == "softcap":
        q = 8 * q                                              # scores past the cap
        kw = ref = dict(softcap=0.5)
    elif option == "sinks":
        kw = ref = dict(sinks=torch.randn(4, generator=g))
    elif option in ("bias", "alibi_slopes"):
        positional = (RelBias if option == "bias" else Slopes)(32, 4, 8, 16)
        ref = dict(bias=positional.bias(pos, key_pos))
    elif option == "key_mask":
        kw = ref = dict(key_mask=torch.tensor([[False, False] + [True] * 5, [True] * 7]))
    elif option == "key_pos":                                  # a static cache: 9 slots, the last two not written
        k, v = (torch.cat([t, torch.randn(2, 2, 2, 8, generator=g)], 2) for t in (k, v))
        kw = dict(key_pos=torch.arange(9))
    elif option == "doc_mask":                                 # packed rows: no cache, 7 queries over their 7 keys
        q, pos = torch.randn(2, 4, 7, 8, generator=g), torch.arange(7)   # NoPE: the rows' own positions serve
        kw = ref = dict(doc=torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 2, 2, 2]]))
    return (q, k, v, positional, pos), kw, ref


def test_every_capability_has_a_case():
    for option in CAPABILITIES:       # a new capability needs a case here before the matrix can test it
        _, kw, ref = case(option)
        assert kw or ref, option


SUPPORTED = [(b, o) for b, cls in BACKENDS.items() for o in sorted(cls.supports)]
REFUSED = [(b, o) for b, cls in BACKENDS.items() for o in CAPABILITIES if o not in cls.supports]


@pytest.mark.parametrize("backend,option", SUPPORTED, ids=[f"{b}-{o}" for b, o in SUPPORTED])
def test_supported_option_matches_eager_and_reference(backend, option):
    args, kw, ref = case(option)
    got = attend(*args, backend=backend, **kw)
    torch.testing.assert_close(got, attend(*args, backend="eager", **kw), atol=1e-5, rtol=1e-4)
    q, k, v, _, pos = args
    S = k.shape[2] if option != "key_pos" else 7               # the reference sees only the written slots
    torch.testing.assert_close(got, reference(q, k[:, :, :S], v[:, :, :S], pos, torch.arange(S), **ref),
                               atol=1e-5, rtol=1e-4)
    if kw or ref:                                              # the option changes the result, so the checks can fail
        assert (got - attend(q, k, v, NoPE(32, 4, 8, 16), pos, backend="eager")).abs().max() > 1e-3


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_all_supported_options_at_once(backend):
    "Every option the backend supports, together (an arbitrary bias when it has one, else ALiBi slopes)."
    sup = BACKENDS[backend].supports
    opts = [o for o in CAPABILITIES if o in sup and not (o == "alibi_slopes" and "bias" in sup)]
    opts = [o for o in opts if o != "doc_mask"]   # packed rows take no cache: tests/test_packing.py combines the rest
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, n, 8, generator=g) for h, n in ((4, 5), (2, 7), (2, 7)))
    pos, S = torch.arange(2, 7), 7
    kw, ref, positional = {}, {}, NoPE(32, 4, 8, 16)
    for o in opts:
        (_, _, _, p, _), okw, oref = case(o)
        kw.update(okw); ref.update(oref)
        positional = p if o in ("bias", "alibi_slopes") else positional
    if "key_pos" in opts:
        k, v = (torch.cat([t, torch.randn(2, 2, 2, 8, generator=g)], 2) for t in (k, v))
    if "softcap" in opts:
        q = 8 * q
    if "key_mask" in opts and "key_pos" in opts:               # the mask spans every slot
        kw["key_mask"] = torch.cat([kw["key_mask"], torch.ones(2, 2, dtype=torch.bool)], 1)
    got = attend(q, k, v, positional, pos, backend=backend, **kw)
    torch.testing.assert_close(got, attend(q, k, v, positional, pos, backend="eager", **kw), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got, reference(q, k[:, :, :S], v[:, :, :S], pos, torch.arange(S), **ref),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend,option", REFUSED, ids=[f"{b}-{o}" for b, o in REFUSED])
def test_unsupported_option_is_refused_naming_the_backends_that_support_it(backend, option):
    names = [b for b, cls in BACKENDS.items() if option in cls.supports]
    assert names, f"no backend supports {option}"
    pattern = f"backends that can: {', '.join(names)}$"
    args, kw, _ = case(option)
    with pytest.raises(ArgumentError, match=pattern) as e:
        attend(*args, backend=backend, **kw)
    assert e.value.arg == "backend" and e.value.value == backend
    layer_kw = {"window": dict(window=3), "softcap": dict(softcap=0.5), "sinks": dict(sinks=True)}.get(option)
    if layer_kw is not None:                                   # a constructor option: refused by the constructor
        with pytest.raises(ArgumentError, match=pattern) as e:
            Attention(32, 4, 2, backend=backend, **layer_kw)
        assert e.value.arg == option
    a = Attention(32, 4, 2, backend=backend)
    if option in ("bias", "alibi_slopes"):                     # a positional encoding: refused by check_positional
        with pytest.raises(ArgumentError, match=pattern):
            a.check_positional(args[3])
    if option == "key_pos":                                    # slot positions: refused by new_cache
        with pytest.raises(ArgumentError, match=pattern):
            a.new_cache(capacity=8)


# ---- the fused kernel itself (Triton's interpreter on a CPU) ---------------------------------------------------

@pytest.mark.parametrize("cls,opts", [(Attention, dict(n_kv_heads=2, window=3, softcap=1.0)),
                                      (MLA, dict(kv_lora_rank=8, qk_rope_head_dim=4))], ids=["gqa", "mla"])
def test_triton_kernel(cls, opts):
    pytest.importorskip("triton")
    x, pos = torch.randn(1, 6, 32), torch.arange(6)
    torch.manual_seed(0)
    a = cls(32, 4, backend="fused", **opts)
    a.impl = "triton"
    b = cls(32, 4, backend="eager", **opts)
    b.load_state_dict(a.state_dict())
    for p in (RoPE(32, 4, 8, 16), Slopes(32, 4, 8, 16)):
        with torch.no_grad():
            torch.testing.assert_close(a(x, p, pos), b(x, p, pos), atol=1e-4, rtol=1e-3)


# ---- differential attention ------------------------------------------------------------------------------------

def diff_reference(a: DiffAttention, x, window=None):
    """Differential attention from the paper's formula, head by head: (softmax(q1 k1ᵀ/√d) - λ softmax(q2 k2ᵀ/√d)) v
    with RoPE at 0..n-1, each head's output RMS-normed (its weight) and scaled by 1 - λ_init, into o_proj."""
    B, n, _ = x.shape
    H, G, hd = a.n_heads // 2, a.n_heads // a.n_kv_heads, a.head_dim
    q = a.q_proj(x).view(B, n, 2, H, hd)
    k = a.k_proj(x).view(B, n, 2, H // G, hd)
    v = a.v_proj(x).view(B, n, H // G, 2 * hd)
    lam_init = 0.8 - 0.6 * math.exp(-0.3 * a.layer_index)
    lam = (a.lambda_q1 * a.lambda_k1).sum().exp() - (a.lambda_q2 * a.lambda_k2).sum().exp() + lam_init
    pos = torch.arange(n)
    heads = []
    for h in range(H):
        g = h // G
        p = [(rope(q[:, :, c, h], pos) @ rope(k[:, :, c, g], pos).transpose(-1, -2) / math.sqrt(hd))
             .masked_fill(hidden(n, window), float("-inf")).softmax(-1) for c in (0, 1)]       # (B, n, n) each
        o = (p[0] - lam * p[1]) @ v[:, :, g]                                                  # (B, n, 2hd)
        heads.append(rms(o, a.head_norm.weight, a.head_norm.eps) * (1 - lam_init))
    return a.o_proj(torch.cat(heads, -1))


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("kv", [8, 4, 2])
def test_differential_attention_matches_the_paper(kv, window):
    x, r = torch.randn(2, 10, 64), RoPE(64, 8, 8, 16)
    for backend in BACKENDS:
        torch.manual_seed(0)
        a = DiffAttention(64, 8, kv, window=window, backend=backend)
        a.place(5, 2)
        with torch.no_grad():
            a.head_norm.weight.normal_()
            a.q_proj.weight.mul_(4)                # sharp maps, so that λ's two terms differ
            y = a(x, r, torch.arange(10))
            torch.testing.assert_close(y, diff_reference(a, x, window), atol=1e-5, rtol=1e-4)
            a.lambda_q1.mul_(3)                    # another λ: the output moves, and still follows the formula
            torch.testing.assert_close(a(x, r, torch.arange(10)), diff_reference(a, x, window), atol=1e-5, rtol=1e-4)
            assert (a(x, r, torch.arange(10)) - y).abs().max() > 1e-3


def test_differential_lambda_init_follows_the_layer():
    m = build_model(compose(TINY + ("model/attention=differential", "model.n_layers=4")).model)
    assert [blk.attn.layer_index for blk in m.layers] == [0, 1, 2, 3]
    want = [0.8 - 0.6 * math.exp(-0.3 * l) for l in range(4)]
    assert [blk.attn.lambda_init for blk in m.layers] == pytest.approx(want)
    gqa = model("gqa").param_counts()
    diff = model("differential").param_counts()
    hd, L = 16, 2
    assert diff["attention"] - gqa["attention"] == L * 4 * hd and diff["norm"] - gqa["norm"] == L * 2 * hd
    hybrid = build_model(compose(TINY + ("model/attention=differential", "model.n_layers=4",
                                         "model.layer_pattern=CG")).model)
    assert [blk.attn.layer_index for blk in hybrid.layers[1::2]] == [1, 3]   # the index among all layers


def test_lora_wrapped_projections_run_as_modules_and_fused_ones_match():
    "With many rows the plain q/k/v run as one product; a LoRA-wrapped one is called as a module, adapter included."
    pytest.importorskip("peft")
    from smollm.attention import FUSE_QKV_ROWS
    from smollm.lora import for_training
    torch.manual_seed(0)
    base = build_model(compose(TINY).model)
    x = torch.randint(0, 64, (2, FUSE_QKV_ROWS // 2 + 1))
    calls = []
    projections = lambda m: [p for blk in m.layers for p in (blk.attn.q_proj, blk.attn.k_proj, blk.attn.v_proj)]
    hooks = [p.register_forward_hook(lambda p, i, o: calls.append(p)) for p in projections(base)]
    y = base(x)
    assert calls == []                                     # fused: none of the plain modules ran
    [h.remove() for h in hooks]
    lora = for_training(copy.deepcopy(base), {"rank": 4, "alpha": 8, "targets": None, "dropout": 0.0})
    hooks = [p.register_forward_hook(lambda p, i, o: calls.append(p)) for p in projections(lora)]
    torch.testing.assert_close(lora(x), y, atol=1e-5, rtol=1e-5)   # B = 0 at init: the base model's output
    assert calls == projections(lora)
    with torch.no_grad():
        lora.layers[0].attn.k_proj.lora_B["default"].weight.normal_()   # an adapter on k alone moves the output
    assert (lora(x) - y).abs().max() > 1e-3
    [h.remove() for h in hooks]
