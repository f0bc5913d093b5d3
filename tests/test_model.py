"""smollm.model and smollm.norms against formulas written out here: the block placements, the depth-scaled
init of residual output projections, and RMSNorm at a normal eps where eps matters."""
import math
from functools import partial

import pytest
import torch
import torch.nn as nn

from smollm.config import build_model, compose
from smollm.kernels import triton_available
from smollm.model import Block
from smollm.norms import RMSNorm
from smollm.testing import check_gradients, check_model


# ------------------------------------------------------------------------------------------------- placements

class Affine(nn.Module):
    "A stand-in norm: every one made is a different affine map, so a norm in the wrong place shows."
    made = 0

    def __init__(self):
        super().__init__()
        Affine.made += 1
        self.a, self.b = 1 + Affine.made / 7, (-1) ** Affine.made * Affine.made / 13

    def forward(self, x):
        return x * self.a + self.b


class Attn(nn.Module):
    def forward(self, h, positional, pos, cache=None, key_mask=None):
        return torch.tanh(h) * 3 - 0.5


class MLP(nn.Module):
    def forward(self, h):
        return torch.sin(h) * 2 + h.square() / 4


def A(h): return torch.tanh(h) * 3 - 0.5
def M(h): return torch.sin(h) * 2 + h.square() / 4


@pytest.mark.parametrize("placement,parallel,formula", [
    ("pre", False, lambda b, x: (h := x + A(b.attn_norm(x))) + M(b.mlp_norm(h))),
    ("post", False, lambda b, x: b.mlp_norm((h := b.attn_norm(x + A(x))) + M(h))),
    ("sandwich", False, lambda b, x: (h := x + b.attn_post_norm(A(b.attn_norm(x)))) + b.mlp_post_norm(M(b.mlp_norm(h)))),
    ("pre", True, lambda b, x: x + A(b.attn_norm(x)) + M(b.attn_norm(x))),
])
def test_block_placement_formulas(placement, parallel, formula):
    b = Block(Attn(), MLP(), Affine, placement, parallel)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(b(x, None, torch.arange(5)), formula(b, x))
    norms = [m for m in b.modules() if isinstance(m, Affine)]
    assert len(norms) == {"pre": 1 if parallel else 2, "post": 2, "sandwich": 4}[placement]
    assert len({m.a for m in norms}) == len(norms), "each norm is its own module"


def test_placements_differ():
    # the formulas are not the same function in disguise: on the same stand-ins they give different outputs
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    outs = []
    for placement, parallel in [("pre", False), ("post", False), ("sandwich", False), ("pre", True)]:
        Affine.made = 0
        outs.append(Block(Attn(), MLP(), Affine, placement, parallel)(x, None, torch.arange(5)))
    for i in range(len(outs)):
        for j in range(i):
            assert (outs[i] - outs[j]).abs().max() > 1e-2


@pytest.mark.parametrize("placement,parallel,formula", [
    ("pre", False, lambda b, x: x + A(b.attn_norm(x))),
    ("post", False, lambda b, x: b.attn_norm(x + A(x))),
    ("sandwich", False, lambda b, x: x + b.attn_post_norm(A(b.attn_norm(x)))),
    ("pre", True, lambda b, x: x + A(b.attn_norm(x))),
])
def test_block_without_mlp(placement, parallel, formula):
    # model/mlp=none: the attention half of each placement, and only its norms
    from smollm.mlp import NoMLP
    b = Block(Attn(), NoMLP(8), Affine, placement, parallel)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(b(x, None, torch.arange(5)), formula(b, x))
    assert len([m for m in b.modules() if isinstance(m, Affine)]) == (2 if placement == "sandwich" else 1)


def test_model_without_mlp_counts_no_mlp_parameters():
    cfg = ["model=tiny", "data.vocab_size=128"]
    base, none = (build_model(compose(cfg + extra).model) for extra in ([], ["model/mlp=none"]))
    counts, base_counts = none.param_counts(), base.param_counts()
    assert "mlp" not in counts and counts["attention"] == base_counts["attention"]
    assert base_counts["norm"] - counts["norm"] == 2 * 64              # one norm of width dim fewer per layer
    assert none.num_params() == base.num_params() - base_counts["mlp"] - 2 * 64


# --------------------------------------------------------------------------------------------------- init

@pytest.mark.parametrize("attention", ["gqa", "mla"])
@pytest.mark.parametrize("n_layers", [2, 8])
def test_depth_scaled_init_std(attention, n_layers):
    m = build_model(compose(["model=tiny", "data.vocab_size=256", "model.dim=256", f"model.n_layers={n_layers}",
                             f"model/attention={attention}", "model.mlp_hidden=512"]).model)
    out_std = 0.02 / math.sqrt(2 * n_layers)
    for name, p in m.named_parameters():
        if p.dim() < 2:
            continue
        residual_out = name.endswith(("o_proj.weight", "down_proj.weight"))
        want = out_std if residual_out else 0.02
        assert p.std().item() == pytest.approx(want, rel=0.05), name
        assert abs(p.mean().item()) < 4 * want / math.sqrt(p.numel()), name


def test_init_std_setting_and_zero_biases():
    m = build_model(compose(["model=tiny", "data.vocab_size=256", "model.dim=256", "model.n_layers=4",
                             "model.init_std=0.05", "model.attention.qkv_bias=true", "model.mlp.bias=true"]).model)
    assert m.layers[0].attn.q_proj.weight.std().item() == pytest.approx(0.05, rel=0.05)
    assert m.layers[0].attn.o_proj.weight.std().item() == pytest.approx(0.05 / math.sqrt(8), rel=0.05)
    assert m.layers[0].mlp.down_proj.weight.std().item() == pytest.approx(0.05 / math.sqrt(8), rel=0.05)
    assert m.embed.weight.std().item() == pytest.approx(0.05, rel=0.05)
    biases = [p for n, p in m.named_parameters() if n.endswith(".bias") and ("proj" in n)]
    assert biases and all(torch.count_nonzero(b) == 0 for b in biases)


# ------------------------------------------------------------------------------------------------ RMSNorm

IMPLS = ["torch"] + (["triton"] if triton_available() else [])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_rmsnorm_eps_inside_the_square_root(impl, eps):
    # inputs whose mean square is a tenth of eps: eps inside sqrt gives outputs of rms ~0.3, outside ~1
    x = torch.randn(3, 7, 64, dtype=torch.float64) * math.sqrt(eps / 10)
    w = torch.rand(64, dtype=torch.float64) + 0.5
    ms = x.pow(2).mean(-1, keepdim=True)
    want = x / torch.sqrt(ms + eps) * w
    n = RMSNorm(64, eps=eps)
    n.impl = impl
    with torch.no_grad():
        n.weight.copy_(w.float())
    got = n(x.float()).double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    wrong = x / (ms.sqrt() + eps) * w
    assert (wrong - want).abs().max() > 0.5


@pytest.mark.parametrize("impl", IMPLS)
def test_rmsnorm_gradient_matches_the_formula(impl):
    x = (torch.randn(4, 32, dtype=torch.float64) * 3e-3).requires_grad_()
    xf = x.detach().float().requires_grad_()
    n = RMSNorm(32)
    n.impl = impl
    n(xf).pow(3).sum().backward()
    (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)).pow(3).sum().backward()
    torch.testing.assert_close(xf.grad.double(), x.grad, rtol=1e-3, atol=1e-3 * x.grad.abs().max().item())


# ------------------------------------------------------------------------------------- value residual learning

def tiny_model(*overrides, seed=0):
    torch.manual_seed(seed)
    return build_model(compose(["model=tiny", "data.vocab_size=128", *overrides]).model).eval()


def test_value_residual_off_is_the_plain_model_bit_for_bit():
    off, on = tiny_model(), tiny_model("model.value_residual=true")
    assert off.value_layers == frozenset() and on.value_layers == {0, 1}
    assert not any("value_lambdas" in k for k in off.state_dict())
    assert [k for k in on.state_dict() if "value_lambdas" in k] == ["layers.1.attn.value_lambdas"]
    on.load_state_dict(off.state_dict(), strict=False)
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        on.layers[1].attn.value_lambdas.copy_(torch.tensor([1.0, 0.0]))   # λ1 V + 0 V_1 is V exactly
        assert torch.equal(on(x), off(x))
        on.layers[1].attn.value_lambdas.copy_(torch.tensor([1.0, 0.5]))
        assert (on(x) - off(x)).abs().max() > 1e-3


def attention_by_hand(a, h, v, rope, pos):
    "Causal GQA of layer a on h (B, T, dim) with the given values v (B, T, Hkv * hd): explicit softmax, RoPE."
    B, T, _ = h.shape
    H, Hkv, hd = a.n_heads, a.n_kv_heads, a.head_dim
    q = a.q_proj(h).view(B, T, H, hd).transpose(1, 2)
    k = a.k_proj(h).view(B, T, Hkv, hd).transpose(1, 2)
    q, k = rope.rotate(q, k, pos)
    k = k.repeat_interleave(H // Hkv, 1)
    v = v.view(B, T, Hkv, hd).transpose(1, 2).repeat_interleave(H // Hkv, 1)
    s = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    return a.o_proj((s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * hd))


def test_value_residual_mixes_the_first_layers_values():
    # three layers, pre-norm: every layer after the first attends over λ1 V_n + λ2 V_1, V_1 the first layer's values
    m = tiny_model("model.value_residual=true", "model.n_layers=3")
    with torch.no_grad():
        m.layers[1].attn.value_lambdas.copy_(torch.tensor([0.7, 1.9]))
        m.layers[2].attn.value_lambdas.copy_(torch.tensor([-0.4, 1.3]))
    x, pos = torch.randint(0, 128, (2, 9)), torch.arange(9)
    with torch.no_grad():
        h = m.embed(x)
        v1 = None
        for blk in m.layers:
            a, n = blk.attn, blk.attn_norm(h)
            v = a.v_proj(n)
            if v1 is None:
                v1 = v
            else:
                l1, l2 = a.value_lambdas.tolist()
                v = l1 * v + l2 * v1
            h = h + attention_by_hand(a, n, v, m.positional, pos)
            h = h + blk.mlp(blk.mlp_norm(h))
        torch.testing.assert_close(m(x), m.lm_head(m.norm(h)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pattern", ["GCG", "CGG"])
def test_value_residual_in_a_hybrid_decodes_as_the_full_forward(pattern):
    # the first attention layer gives the values wherever it sits; mixers pass them by; left padding, a cache
    m = tiny_model("model.value_residual=true", "model.n_layers=3", f"model.layer_pattern={pattern}")
    first = pattern.index("G")
    assert m.value_layers == {i for i, c in enumerate(pattern) if c == "G"}
    assert [m.layers[i].attn.value_lambdas is None for i in sorted(m.value_layers)] == [True, False]
    x = torch.randint(1, 128, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :3] = False
    with torch.no_grad():
        full = m(x, key_mask=mask)
        cache = m.new_cache()
        steps = [m(x[:, :4], cache, key_mask=mask[:, :4])]
        steps += [m(x[:, t:t + 1], cache, key_mask=mask[:, :t + 1]) for t in range(4, 10)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
    check_model(m, x=x, checks=["gradients"], name=f"value residual, {pattern}")
    assert first in m.value_layers


# ------------------------------------------------------------------------------------- multi-token prediction

def with_mtp(m, depth, weight=0.3, seed=1):
    "A model of m's blocks, norm and positional with `depth` MTP modules (everything freshly initialised)."
    import copy
    from smollm.model import Transformer
    torch.manual_seed(seed)
    layers, norm, positional = copy.deepcopy((list(m.layers), m.norm, m.positional))
    return Transformer(m.vocab_size, m.dim, layers, norm, positional, nope_layers=tuple(m.nope_layers),
                       mtp_depth=depth, mtp_weight=weight)


def mtp_reference(m, x, y, doc=None, ignore_index=-100, drop=True):
    """DeepSeek-V3's MTP losses written out: h^k_i = Block_k(W_k [norm(h^{k-1}_i); norm(Emb(x_{i+k}))]) on the first
    T - k positions, logits lm_head(norm(h^k_i)) against y_{i+k}, dropped across documents; the mean over depths."""
    import torch.nn.functional as F
    from smollm.positional import doc_positions
    T, h, losses = x.shape[1], m.residual_stream(x, doc=doc), []
    for k, mod in enumerate(m.mtp, 1):
        n = T - k
        if n < 1:
            break
        tgt = y[:, k:].clone()
        d = None if doc is None else doc[:, :n]
        if doc is not None and drop:
            tgt[doc[:, k:] != d] = ignore_index
        pos = torch.arange(n) if doc is None else doc_positions(d)
        u = torch.cat([mod.h_norm(h[:, :n]), mod.e_norm(m.embed(x[:, k:]))], -1) @ mod.proj.weight.T
        h = mod.block(u, m.layer_positional(len(m.layers) - 1), pos, doc=d)
        logits = mod.out_norm(h) @ m.lm_head.weight.T
        losses.append(F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=ignore_index))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("overrides", [[], ["model/attention=differential", "model.value_residual=true"],
                                       ["model.n_layers=3", "model.layer_pattern=GGC"]],
                         ids=["gqa", "differential_value_residual", "last_layer_a_mixer"])
def test_mtp_loss_is_the_extra_heads_loss(overrides):
    m = with_mtp(tiny_model(*overrides), 2, weight=0.25).train()
    x = torch.randint(0, 128, (2, 11))
    y = x.roll(-1, 1)
    y[0, 3] = -100
    main = linear_ce(m, x, y)
    want = mtp_reference(m, x, y)
    loss = m.loss(x, y)
    torch.testing.assert_close(m.mtp_loss, want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, main + 0.25 * want, atol=1e-5, rtol=1e-5)
    assert m.mtp_loss.requires_grad is False and (want - main).abs() > 1e-3
    check_gradients(m, lambda: loss, "MTP")      # the heads' parameters learn, and so does the trunk


def linear_ce(m, x, y):
    import torch.nn.functional as F
    return F.cross_entropy(m.lm_head(m.hidden_states(x)).flatten(0, 1), y.flatten(), ignore_index=-100)


def test_mtp_with_packed_rows_drops_targets_across_documents():
    m = with_mtp(tiny_model(), 2).train()
    x = torch.randint(0, 128, (2, 12))
    doc = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 12])
    y = x.roll(-1, 1)
    y[doc != doc.roll(-1, 1)] = -100
    m.loss(x, y, doc=doc)
    torch.testing.assert_close(m.mtp_loss, mtp_reference(m, x, y, doc), atol=1e-5, rtol=1e-5)
    # the dropping can be seen: keeping the targets across documents gives another loss
    assert (mtp_reference(m, x, y, doc, drop=False) - m.mtp_loss).abs() > 1e-4


def test_mtp_off_and_in_evaluation_is_the_plain_model():
    from smollm.generate import generate
    base = tiny_model()
    x = torch.randint(0, 128, (2, 9))
    y = x.roll(-1, 1)
    zero = with_mtp(base, 0)
    assert len(zero.mtp) == 0 and set(zero.state_dict()) == set(base.state_dict())
    two = with_mtp(base, 2)
    plain = with_mtp(base, 0)
    plain.load_state_dict(two.state_dict(), strict=False)
    two.train(), plain.train()
    plain.loss(x, y)
    assert plain.mtp_loss is None
    two.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(two.loss(x, y), plain.loss(x, y)) and torch.equal(two(x), plain(x))
        assert torch.equal(generate(two, x[:, :4], 6), generate(plain, x[:, :4], 6))
    assert (two.train().loss(x, y) - plain.train().loss(x, y)).abs() > 1e-3   # in training the heads count


def test_mtp_depths_beyond_the_row_are_left_out_and_arguments_checked():
    m = with_mtp(tiny_model(), 4).train()
    x = torch.randint(0, 128, (2, 3))
    y = x.roll(-1, 1)
    assert m.mtp_losses(m.residual_stream(x), x, y).shape == (2,)           # T = 3: depths 1 and 2 only
    torch.testing.assert_close(m.loss(x, y), linear_ce(m, x, y) + 0.3 * mtp_reference(m, x, y), atol=1e-5, rtol=1e-5)
    one = torch.randint(0, 128, (2, 1))
    assert m.mtp_losses(m.residual_stream(one), one, one).shape == (0,)
    torch.testing.assert_close(m.loss(one, one), linear_ce(m, one, one))
    from smollm.errors import ArgumentError
    for bad in (dict(depth=-1), dict(depth=1.5), dict(weight=-0.1)):
        with pytest.raises(ArgumentError):
            with_mtp(tiny_model(), bad.get("depth", 1), bad.get("weight", 0.3))


def test_mtp_from_the_config_counts_its_own_parameters():
    from smollm.config import ConfigError, build_model, compose
    base = build_model(compose(["model=tiny", "data.vocab_size=128"]).model)
    m = build_model(compose(["model=tiny", "data.vocab_size=128", "model.mtp.depth=2", "model.mtp.weight=0.1"]).model)
    assert len(m.mtp) == 2 and m.mtp_weight == 0.1 and "mtp" not in base.param_counts()
    counts = m.param_counts()
    assert sum(counts.values()) == m.num_params()                  # every parameter in exactly one family
    assert counts["mtp"] == m.num_params() - base.num_params() > 0    # the trunk is the same model
    assert {k: v for k, v in counts.items() if k != "mtp"} == base.param_counts()
    with pytest.raises(ConfigError, match="model.mtp.depth=-1"):
        build_model(compose(["model=tiny", "model.mtp.depth=-1"]).model)
