"""The positional-encoding family (smollm.positional) against the papers' formulas and HF transformers.

Every expected value is computed here independently: with `math` in fp64 from the published formulas, by hand,
or by HF transformers' own functions; never by calling the class under test a second time.
"""
import math

import pytest
import torch

from smollm.config import compose, options
from smollm.kernels import attention_ref
from smollm.config import build_model
from smollm.positional import (ALiBi, LearnedAbsolute, NoPE, RoPE, Sinusoidal, T5Bias, alibi_slopes,
                               rope_scaling, t5_buckets)
from smollm.testing import check_model


# ---------------------------------------------------------------------------------------------------------- ALiBi

def test_alibi_slopes_power_of_two():
    # Press et al.: for n heads, the geometric sequence starting at 2^(-8/n) with that same ratio
    assert alibi_slopes(8).tolist() == [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]
    assert alibi_slopes(1).tolist() == [1 / 256]
    torch.testing.assert_close(alibi_slopes(16), torch.tensor([2 ** -(k / 2) for k in range(1, 17)]))


def test_alibi_slopes_not_power_of_two():
    # 12 heads: the 8 slopes of 8 heads, then every other slope of 16 heads (2^-0.5, 2^-1.5, ...) for the other 4
    want = [2 ** -k for k in range(1, 9)] + [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(want))
    # 5 heads: 4 heads' slopes (2^-2, 2^-4, 2^-6, 2^-8), then the first of 8 heads' every-other: 2^-1
    torch.testing.assert_close(alibi_slopes(5), torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1]))


def test_alibi_bias_and_fused_slopes_agree():
    a = ALiBi(dim=96, n_heads=12, head_dim=8, max_seq_len=64)
    q_pos, k_pos = torch.arange(4, 9), torch.arange(9)          # 5 new queries after 4 cached keys
    b = a.bias(q_pos, k_pos)
    assert b.shape == (12, 5, 9)
    want = [2 ** -k for k in range(1, 9)] + [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5]
    for h, i, j in [(0, 0, 0), (0, 4, 0), (9, 2, 3), (11, 4, 8)]:
        assert b[h, i, j].item() == pytest.approx(-want[h] * abs(int(q_pos[i]) - int(k_pos[j])))
    # the additive bias and the kernel's alibi_slopes path give the same attention
    q, k, v = torch.randn(2, 12, 5, 8), torch.randn(2, 12, 9, 8), torch.randn(2, 12, 9, 8)
    torch.testing.assert_close(attention_ref(q, k, v, bias=b), attention_ref(q, k, v, alibi_slopes=a.alibi_slopes))
    assert a.to(torch.bfloat16).alibi_slopes.dtype == torch.float32   # a cast model keeps exact slopes


# ------------------------------------------------------------------------------------------- RoPE frequencies

def omega(theta, d):
    return [theta ** (-2 * i / d) for i in range(d // 2)]


def llama3_ref(theta, d, factor, L, low, high):
    out = []
    for w in omega(theta, d):
        lam = 2 * math.pi / w
        if lam < L / high:
            out.append(w)
        elif lam > L / low:
            out.append(w / factor)
        else:
            g = (L / lam - low) / (high - low)
            out.append((1 - g) * w / factor + g * w)
    return out


def yarn_ref(theta, d, factor, L, beta_fast=32, beta_slow=1):
    # Peng et al.: pair i turns r_i = L * omega_i / (2 pi) times in L; the ramp runs over the pair index between the
    # pairs that turn beta_fast and beta_slow times (ends rounded outwards, clipped to [0, d - 1])
    dim_for = lambda r: d * math.log(L / (2 * math.pi * r)) / (2 * math.log(theta))
    lo, hi = max(math.floor(dim_for(beta_fast)), 0), min(math.ceil(dim_for(beta_slow)), d - 1)
    out = []
    for i, w in enumerate(omega(theta, d)):
        gamma = 1 - min(max((i - lo) / (hi - lo), 0.0), 1.0)     # 1: keep, 0: interpolate
        out.append((1 - gamma) * w / factor + gamma * w)
    return out, 0.1 * math.log(factor) + 1


@pytest.mark.parametrize("theta,d", [(10000.0, 16), (500000.0, 64)])
def test_rope_inv_freq_formulas(theta, d):
    T = lambda xs: torch.tensor(xs, dtype=torch.float32)
    mk = lambda sc: RoPE(dim=4 * d, n_heads=4, head_dim=d, max_seq_len=256, theta=theta, scaling=sc)
    torch.testing.assert_close(mk(None).inv_freq(d), T(omega(theta, d)), rtol=1e-6, atol=0)
    torch.testing.assert_close(mk({"type": "linear", "factor": 4}).inv_freq(d),
                               T([w / 4 for w in omega(theta, d)]), rtol=1e-6, atol=0)
    l3 = mk({"type": "llama3", "factor": 8, "original_max_seq_len": 64, "low_freq_factor": 1, "high_freq_factor": 4})
    torch.testing.assert_close(l3.inv_freq(d), T(llama3_ref(theta, d, 8, 64, 1, 4)), rtol=1e-6, atol=0)
    want, af = yarn_ref(theta, d, 4.0, 64)
    y = mk({"type": "yarn", "factor": 4, "original_max_seq_len": 64})
    torch.testing.assert_close(y.inv_freq(d), T(want), rtol=1e-6, atol=0)
    assert y.attention_factor == pytest.approx(af)
    # dynamic NTK: plain up to L = 256, then base theta * (s * n / L - (s - 1))^(d / (d - 2)) at length n
    dyn = mk({"type": "dynamic", "factor": 2})
    torch.testing.assert_close(dyn.inv_freq(d, 200), T(omega(theta, d)), rtol=1e-6, atol=0)
    base = theta * (2 * 600 / 256 - 1) ** (d / (d - 2))
    torch.testing.assert_close(dyn.inv_freq(d, 600), T(omega(base, d)), rtol=1e-6, atol=0)


def test_rope_llama3_bands_at_known_indices():
    # theta 10000, d 16 -> omega_i = 10^(-i/2); L = 64: wavelengths 6.3 (kept), 19.9 and 62.8 (blended), 199 (/ 8)
    r = RoPE(64, 4, 16, 256, scaling={"type": "llama3", "factor": 8, "original_max_seq_len": 64})
    inv = r.inv_freq(16)
    assert inv[0].item() == pytest.approx(1.0, rel=1e-6)
    g = (64 / (2 * math.pi / 10 ** -0.5) - 1) / 3
    assert inv[1].item() == pytest.approx((1 - g) * 10 ** -0.5 / 8 + g * 10 ** -0.5, rel=1e-6)
    assert inv[3].item() == pytest.approx(10 ** -1.5 / 8, rel=1e-6)


HF_CASES = [
    ("linear", {"factor": 4.0}, {}, None),
    ("linear", {"factor": 2.0, "partial_rotary_factor": 0.5}, {}, None),
    ("dynamic", {"factor": 2.0}, {}, 300),
    ("dynamic", {"factor": 3.0}, {}, 100),
    ("llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}, {}, None),
    ("llama3", {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, {"rope_theta": 500000.0}, None),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 32}, {}, None),
    ("yarn", {"factor": 40.0, "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 0.707, "beta_fast": 16, "beta_slow": 2}, {}, None),
    ("yarn", {"factor": 8.0, "original_max_position_embeddings": 64, "attention_factor": 1.3, "truncate": False}, {"rope_theta": 150000.0}, None),
    ("yarn", {"factor": 4.0, "partial_rotary_factor": 0.5}, {}, None),
]


def _hf_config(kind, params, extra, head_dim=32, max_pos=128):
    from transformers import LlamaConfig
    rp = {"rope_type": kind, "rope_theta": extra.get("rope_theta", 10000.0), **params}
    return LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                       max_position_embeddings=max_pos, rope_parameters=rp)


@pytest.mark.parametrize("kind,params,extra,seq_len", HF_CASES)
def test_rope_inv_freq_matches_hf(kind, params, extra, seq_len):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    inv_hf, af_hf = ROPE_INIT_FUNCTIONS[kind](_hf_config(kind, params, extra), "cpu", seq_len=seq_len)
    theta, frac = extra.get("rope_theta", 10000.0), params.get("partial_rotary_factor", 1.0)
    # the HF dict goes in as it is, HF key names and all
    r = RoPE(128, 4, 32, 128, theta=theta, fraction=frac, scaling={"rope_type": kind, **params})
    torch.testing.assert_close(r.inv_freq(r.rot_dim, seq_len), inv_hf, rtol=1e-6, atol=0)
    assert r.attention_factor == pytest.approx(af_hf)


@pytest.mark.parametrize("kind,params", [("default", {}), ("linear", {"factor": 4.0}), ("dynamic", {"factor": 2.0}),
                                         ("llama3", HF_CASES[4][1]), ("yarn", HF_CASES[6][1])])
def test_rope_cos_sin_and_rotation_match_hf(kind, params):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    T = 200   # past max_position_embeddings = 128, where dynamic NTK kicks in
    hf = LlamaRotaryEmbedding(_hf_config(kind, params, {}))
    x = torch.randn(1, T, 128)
    cos_hf, sin_hf = hf(x, torch.arange(T)[None])
    r = RoPE(128, 4, 32, 128, scaling={"rope_type": kind, **params})
    cos, sin = r.cos_sin(torch.arange(T), 32)
    torch.testing.assert_close(cos, cos_hf[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, sin_hf[0], rtol=0, atol=1e-6)
    q, k = torch.randn(2, 4, T, 32), torch.randn(2, 2, T, 32)
    for mine, theirs in zip(r.rotate(q, k, torch.arange(T)), apply_rotary_pos_emb(q, k, cos_hf, sin_hf)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)


def test_rope_rotation_is_the_papers():
    # channel pair (i, i + d/2) of a vector at position m is rotated by m * omega_i (rotate-half layout)
    r = RoPE(32, 2, 16, 64, theta=100.0)
    q = torch.randn(1, 2, 5, 16)
    qr, _ = r.rotate(q, q[:, :1], torch.arange(5))
    m, i, h = 3, 2, 1
    a = m * 100.0 ** (-2 * i / 16)
    x, y = q[0, h, m, i].item(), q[0, h, m, i + 8].item()
    assert qr[0, h, m, i].item() == pytest.approx(x * math.cos(a) - y * math.sin(a), abs=1e-5)
    assert qr[0, h, m, i + 8].item() == pytest.approx(x * math.sin(a) + y * math.cos(a), abs=1e-5)


def test_dynamic_kicks_in_past_the_original_length():
    plain = RoPE(64, 4, 16, 32)
    dyn = RoPE(64, 4, 16, 32, scaling={"type": "dynamic", "factor": 4})
    q, k = torch.randn(1, 4, 48, 16), torch.randn(1, 4, 48, 16)
    same = lambda p: all(torch.equal(a, b) for a, b in zip(plain.rotate(q[:, :, :len(p)], k[:, :, :len(p)], p),
                                                            dyn.rotate(q[:, :, :len(p)], k[:, :, :len(p)], p)))
    assert same(torch.arange(32))           # up to the original 32 positions: plain RoPE
    assert not same(torch.arange(33))       # one more: the base grows
    assert not same(torch.arange(40, 48))   # decoding after 40 cached tokens: length 48


# ------------------------------------------------------------------------------------- config, errors, others

def test_scaling_configs_compose_and_override():
    cfg = compose(["model=tiny", "model/positional=rope_yarn", "model.positional.scaling.factor=8"])
    r = build_model(cfg.model).positional
    assert isinstance(r, RoPE) and r.scaling.factor == 8 and r.scaling.original_max_seq_len == 64
    assert r.attention_factor == pytest.approx(0.1 * math.log(8) + 1)
    for opt, kind in [("rope_linear", "linear"), ("rope_dynamic", "dynamic"), ("rope_llama3", "llama3")]:
        assert compose([f"model/positional={opt}"]).model.positional.scaling.type == kind
    assert compose(["model/positional=rope"]).model.positional.scaling is None


@pytest.mark.parametrize("make,match", [
    (lambda: rope_scaling({"type": "ntk", "factor": 2}, 64), "scaling.type='ntk'"),
    (lambda: rope_scaling({"type": "linear", "factor": 2, "beta_fast": 3}, 64), r"\['beta_fast'\]"),
    (lambda: rope_scaling({"type": "llama3"}, 64), "needs a factor"),
    (lambda: rope_scaling({"type": "yarn", "factor": 0.5}, 64), "factor=0.5"),
    (lambda: rope_scaling({"type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1}, 64), "low_freq_factor=4"),
    (lambda: rope_scaling({"factor": 2}, 64), "no type"),
    (lambda: rope_scaling("yarn", 64), "scaling='yarn'"),
    (lambda: RoPE(64, 4, 16, 64, scaling={"rope_type": "linear", "factor": 2, "rope_theta": 5e5}), "rope_theta"),
    (lambda: RoPE(64, 4, 16, 64, fraction=0.1), "even"),
    (lambda: Sinusoidal(63, 1, 63, 8), "dim=63"),
    (lambda: T5Bias(64, 4, 16, 8, num_buckets=7), "num_buckets=7"),
    (lambda: T5Bias(64, 4, 16, 8, num_buckets=32, max_distance=10), "max_distance=10"),
    (lambda: alibi_slopes(0), "n_heads=0"),
    (lambda: LearnedAbsolute(8, 2, 4, 16).embed(torch.zeros(1, 2, 8), torch.tensor([15, 16])), "position 16"),
])
def test_bad_input_is_named(make, match):
    with pytest.raises((ValueError, IndexError), match=match):
        make()


def test_hf_default_rope_type_is_plain():
    r = RoPE(64, 4, 16, 64, scaling={"rope_type": "default", "rope_theta": 10000.0})
    assert type(r.scaling).__name__ == "RopeScaling" and r.attention_factor == 1.0


def test_sinusoidal_table_values():
    d = 16
    s = Sinusoidal(d, 2, 8, 32)
    pe = s.embed(torch.zeros(1, 40, d), torch.arange(40))[0]     # rows 32..39 are past the stored table
    for p, i in [(0, 0), (1, 0), (5, 3), (17, 7), (31, 1), (39, 5)]:
        a = p / 10000 ** (2 * i / d)
        assert pe[p, 2 * i].item() == pytest.approx(math.sin(a), abs=1e-6)
        assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(a), abs=1e-6)


def test_learned_absolute_adds_its_rows():
    la = LearnedAbsolute(8, 2, 4, 16)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(la.embed(x, torch.arange(5, 8)), x + la.wpe.weight[5:8])


# T5, 32 causal buckets up to 128: 0..15 exact; then 16 + floor(ln(n / 16) / ln(8) * 16), capped at 31
T5_CAUSAL = [(-7, 0), (0, 0), (1, 1), (15, 15), (16, 16), (20, 17), (32, 21), (64, 26), (100, 30), (127, 31),
             (128, 31), (5000, 31)]
# 32 bidirectional: 16 per direction, 8 exact; then 8 + floor(ln(n / 8) / ln(16) * 8); future keys + 16
T5_BIDIR = [(0, 0), (3, 3), (-3, 19), (8, 8), (16, 10), (-16, 26), (32, 12), (127, 15), (-500, 31)]


def test_t5_buckets_by_hand():
    d, want = zip(*T5_CAUSAL)
    assert t5_buckets(torch.tensor(d)).tolist() == list(want)
    d, want = zip(*T5_BIDIR)
    assert t5_buckets(torch.tensor(d), bidirectional=True).tolist() == list(want)
    # 8 buckets up to 20: 4 exact, then 4 + floor(ln(n / 4) / ln(5) * 4): 8 -> 5, 19 -> 7, 20 -> 8 -> capped 7
    assert t5_buckets(torch.tensor([3, 4, 8, 19, 20]), 8, 20).tolist() == [3, 4, 5, 7, 7]


@pytest.mark.parametrize("bidirectional", [False, True])
def test_t5_buckets_match_hf(bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention
    dist = torch.arange(-300, 300)[:, None] + torch.zeros(1, 3, dtype=torch.long)
    theirs = T5Attention._relative_position_bucket(-dist, bidirectional=bidirectional, num_buckets=32, max_distance=128)
    assert torch.equal(t5_buckets(dist, 32, 128, bidirectional), theirs)


# --------------------------------------------------------------------------------- relative vs absolute

VARIANTS = {
    "nope": (lambda: NoPE(64, 4, 16, 64), True),
    "rope": (lambda: RoPE(64, 4, 16, 64), True),
    "rope_partial": (lambda: RoPE(64, 4, 16, 64, fraction=0.5), True),
    "rope_linear": (lambda: RoPE(64, 4, 16, 64, scaling={"type": "linear", "factor": 4}), True),
    "rope_llama3": (lambda: RoPE(64, 4, 16, 64, scaling={"type": "llama3", "factor": 8, "original_max_seq_len": 16}), True),
    "rope_yarn": (lambda: RoPE(64, 4, 16, 64, scaling={"type": "yarn", "factor": 4, "original_max_seq_len": 16}), True),
    "alibi": (lambda: ALiBi(64, 4, 16, 64), True),
    "t5": (lambda: T5Bias(64, 4, 16, 64), True),
    "t5_bidirectional": (lambda: T5Bias(64, 4, 16, 64, bidirectional=True), True),
    "learned": (lambda: LearnedAbsolute(64, 4, 16, 64), False),
    "sinusoidal": (lambda: Sinusoidal(64, 4, 16, 64), False),
}


@pytest.mark.parametrize("name", VARIANTS)
@torch.no_grad()
def test_relative_encodings_are_shift_invariant(name):
    make, relative = VARIANTS[name]
    p = make()
    x, wq, wk = torch.randn(2, 10, 64), torch.randn(64, 64) / 8, torch.randn(64, 64) / 8

    def scores(pos):   # all three hooks, as the model and attention layers apply them
        h = p.embed(x, pos)
        q, k = (h @ wq).view(2, 10, 4, 16).transpose(1, 2), (h @ wk).view(2, 10, 4, 16).transpose(1, 2)
        q, k = p.rotate(q, k, pos)
        s = q @ k.transpose(-1, -2)
        b = p.bias(pos, pos)
        return s if b is None else s + b

    a, b = scores(torch.arange(10)), scores(torch.arange(10) + 23)
    if relative:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    else:
        assert (a - b).abs().max() > 1e-2


# ---------------------------------------------------------------------------------- every option trains

TINY = ["model=tiny", "model.n_layers=4", "data.vocab_size=256", "model.dim=32", "model.block_size=32"]
# the class each option builds, by the option's first word: rope_linear, rope_yarn, ... are RoPE with a scaling
CLASSES = {"nope": NoPE, "rope": RoPE, "alibi": ALiBi, "t5": T5Bias, "learned": LearnedAbsolute, "sinusoidal": Sinusoidal}


@pytest.mark.parametrize("option,extra", [(o, []) for o in options("model/positional")]
                         + [("rope", ["model.layer_pattern=GGGN"]), ("alibi", ["model.layer_pattern=GN"])])
def test_every_option_composes_builds_and_trains(option, extra):
    m = build_model(compose([f"model/positional={option}", *TINY, *extra]).model)
    assert type(m.positional) is CLASSES[option.split("_")[0]]
    assert m.positional.max_positions == (32 if option == "learned" else None)
    if extra:
        assert m.nope_layers == ({3} if "GGGN" in extra[0] else {1, 3})
    ids = torch.randint(0, 256, (2, 25))
    check_model(m, x=ids, checks=["gradients"], name=option)
    # decoding with a cache equals the full forward, whichever hook the encoding uses
    check_model(m, x=ids[:, :24], checks=["decoding"], prefill=(20,), atol=1e-4, rtol=1e-4, name=option)
