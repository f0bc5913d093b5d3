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
