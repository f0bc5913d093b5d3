"""The attention family (smollm.attention): every config option x every positional encoding.

Attention options are the yaml files of conf/model/attention plus the overrides in EXTRA; positional encodings
are whatever conf/model/positional holds, so new files of either group are picked up as they land.
References are written out here with plain tensor ops (no smollm.kernels, no sdpa).
"""
import functools
import math

import pytest
import torch

from smollm.attention import MLA, Attention, KVCache, LatentCache
from smollm.config import compose, options, validate
from smollm.config import build_model
from smollm.positional import NoPE, Positional, RoPE

TINY = ("model.n_layers=2", "data.vocab_size=256", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2",
        "model.mlp_hidden=128", "model.block_size=64")
V, T = 256, 12

ATTN = {name: (f"model/attention={name}",) for name in options("model/attention")}
ATTN["sliding_window"] += ("model.attention.window=4",)          # a window that bites at T = 12
EXTRA = {
    "qkv_bias": ("model/attention=gqa", "model.attention.qkv_bias=true"),
    "all_options": ("model/attention=gqa", "model.attention.qkv_bias=true", "model.attention.qk_norm=true",
                    "model.attention.output_gate=true", "model.attention.sinks=true", "++model.attention.window=4"),
    "softcap_bites": ("model/attention=softcap", "model.attention.softcap=0.05", "++model.attention.window=5"),
    "softcap_triton": ("model/attention=softcap", "model.attention.backend=triton"),
    "pattern_SG": ("model/attention=sliding_window", "model.attention.window=4", "model.layer_pattern=SG"),
    "pattern_SN": ("model/attention=sinks", "++model.attention.window=3", "model.layer_pattern=SN"),
    "mla_q_lora_window": ("model/attention=mla", "model.attention.q_lora_rank=24", "model.attention.kv_lora_rank=16",
                          "model.attention.window=4"),
    "mla_softcap_eager": ("model/attention=mla", "model.attention.softcap=0.05", "model.attention.backend=eager"),
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
    return validate(cfg)


def model(attn: str, pos: str = "rope", **attention):
    torch.manual_seed(0)
    return build_model(config(attn, pos, **attention).model).eval()


def fused_bias_unsupported(m) -> bool:
    "Does the model's positional add a score bias that the fused kernel cannot (it applies ALiBi slopes only)?"
    p = m.positional
    return p.alibi_slopes is None and p.bias(torch.arange(3), torch.arange(3)) is not None


def backends(m) -> list[str]:
    "The backends that support the model's attention options."
    a = m.layers[0].attn
    out = ["eager"]
    if a.softcap is None:
        out.append("sdpa")
    if getattr(a, "sinks", None) is None and not fused_bias_unsupported(m):
        out.append("triton")
    return out


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
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{attn}: zero gradient for {name}"


def test_options_take_effect():
    a = model("all_options").layers[0].attn
    assert a.q_proj.bias is not None and a.q_norm is not None and a.gate_proj is not None
    assert a.sinks.shape == (4,) and a.window == 4
    assert model("softcap").layers[0].attn.softcap == 50.0
    assert [blk.attn.window for blk in model("pattern_SG").layers] == [4, None]
    assert model("pattern_SN").nope_layers == {1}
    assert isinstance(model("mla").layers[0].attn, MLA)
    assert [model(n).layers[0].attn.n_kv_heads for n in ("mha", "gqa", "mqa")] == [4, 2, 1]


# ---- causality and the KV cache, for every attention x positional --------------------------------------------

@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize("attn", ATTN)
def test_causal(attn, pos):
    m = model(attn, pos)
    if m.layers[0].attn.backend == "triton" and fused_bias_unsupported(m):
        with pytest.raises(ValueError, match="backend='triton' cannot add the score bias"):
            m(ids())
        return
    x = ids(1)
    for t in (0, 6, T - 1):
        y = x.clone()
        y[0, t] = (x[0, t] + 1) % V
        with torch.no_grad():
            a, b = m(x), m(y)
        torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
        assert (a[:, t] - b[:, t]).abs().max() > 1e-4      # the change does reach its own position


@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize("attn", ATTN)
def test_cache_decoding_equals_full_forward(attn, pos):
    m = model(attn, pos)
    if m.layers[0].attn.backend == "triton" and fused_bias_unsupported(m):
        pytest.skip("triton backend with a score bias: raises (test_causal checks it)")
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(decode(m, x), m(x), atol=1e-5, rtol=1e-4)


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


def hidden(n, window):
    "(n, n) bool: the keys a query may not see (future, or outside the window)."
    i = torch.arange(n)
    h = i[None, :] > i[:, None]
    return h | (i[None, :] <= i[:, None] - window) if window else h


def attention_reference(a: Attention, x):
    "What `a` computes on x (B, n, dim) with RoPE at positions 0..n-1, from its weights and the papers' formulas."
    B, n, _ = x.shape
    H, G, hd = a.n_heads, a.n_heads // a.n_kv_heads, a.head_dim
    q, k, v = (p(x).view(B, n, -1, hd).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
    if a.q_norm is not None:
        q, k = rms(q, a.q_norm.weight, a.q_norm.eps), rms(k, a.k_norm.weight, a.k_norm.eps)
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
                                  dict(output_gate=True), dict(qkv_bias=True, qk_norm=True, sinks=True,
                                                               output_gate=True, window=5)],
                         ids=lambda o: "+".join(o) or "plain")
@pytest.mark.parametrize("kv", [4, 2, 1])
def test_attention_matches_reference(opts, kv):
    x = torch.randn(2, 10, 32)
    for backend in ("sdpa", "eager", "triton"):
        if (backend == "sdpa" and "softcap" in opts) or (backend == "triton" and "sinks" in opts):
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


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
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
        q = a.q_b_proj(rms(a.q_a_proj(x), a.q_a_layernorm.weight, a.q_a_layernorm.eps))
    else:
        q = a.q_proj(x)
    q = q.view(B, n, H, hd + rd).transpose(1, 2)
    ckv = a.kv_a_proj_with_mqa(x)
    c = rms(ckv[..., :r], a.kv_a_layernorm.weight, a.kv_a_layernorm.eps)        # (B, n, r)
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
    for backend in ("sdpa", "eager", "triton"):
        if backend == "sdpa" and "softcap" in opts:
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
    assert all(isinstance(c, LatentCache) for c in cache) and set(vars(cache[0])) == {"latent"}
    assert cache[0].latent.shape == (2, 7, 24 + 8)
    assert 24 + 8 < 2 * a.n_heads * a.head_dim                 # what a KV cache of full keys and values holds
    assert isinstance(model("gqa").new_cache()[0], KVCache)


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


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("attn", ATTN)
def test_key_mask_left_padding(attn, backend):
    if config(attn).model.attention.get("softcap") and backend == "sdpa":
        pytest.skip("softcap needs backend eager or triton")
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
    with pytest.raises(ValueError, match="softcap=30.0 cannot run on backend='sdpa'.*backend='eager'"):
        Attention(32, 4, softcap=30.0)
    with pytest.raises(ValueError, match="model.attention.softcap=50.0 is not valid"):
        build_model(config("softcap", backend="sdpa").model)
    with pytest.raises(ValueError, match="sinks=True is not supported by backend='triton'"):
        Attention(32, 4, sinks=True, backend="triton")
    with pytest.raises(ValueError, match="backend='flash' is not one of"):
        Attention(32, 4, backend="flash")
    with pytest.raises(ValueError, match="n_kv_heads=2: MLA"):
        MLA(32, 4, n_kv_heads=2)
    with pytest.raises(ValueError, match="qk_rope_head_dim=3"):
        MLA(32, 4, qk_rope_head_dim=3)
    a = Attention(32, 4, 2, backend="triton")
    with pytest.raises(ValueError, match="does not support key_mask"):
        a(x, NoPE(32, 4, 8, 16), pos, key_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="cannot add the score bias of positional RelBias"):
        a(x, RelBias(32, 4, 8, 16), pos)
    with pytest.raises(ValueError, match=r"key_mask must have shape .* = \(1, 4\); got \(1, 3\)"):
        Attention(32, 4)(x, NoPE(32, 4, 8, 16), pos, key_mask=torch.ones(1, 3, dtype=torch.bool))


# ---- the fused kernel itself (Triton's interpreter on a CPU) ---------------------------------------------------

class Slopes(Positional):
    "ALiBi written out here: slopes for the fused kernel, and the same bias for the others."
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.alibi_slopes = 2.0 ** -torch.arange(1, self.n_heads + 1).float()

    def bias(self, q_pos, k_pos):
        return -self.alibi_slopes[:, None, None] * (q_pos[:, None] - k_pos[None, :]).abs().float()


@pytest.mark.parametrize("cls,opts", [(Attention, dict(n_kv_heads=2, window=3, softcap=1.0)),
                                      (MLA, dict(kv_lora_rank=8, qk_rope_head_dim=4))], ids=["gqa", "mla"])
def test_triton_kernel(cls, opts):
    pytest.importorskip("triton")
    x, pos = torch.randn(1, 6, 32), torch.arange(6)
    torch.manual_seed(0)
    a = cls(32, 4, backend="triton", **opts)
    a.impl = "triton"
    b = cls(32, 4, backend="eager", **opts)
    b.load_state_dict(a.state_dict())
    for p in (RoPE(32, 4, 8, 16), Slopes(32, 4, 8, 16)):
        with torch.no_grad():
            torch.testing.assert_close(a(x, p, pos), b(x, p, pos), atol=1e-4, rtol=1e-3)
