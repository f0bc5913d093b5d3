"""The mixture of experts (smollm.moe): the grouped form against the naive dense reference forward and backward
(fp64), transformers' Mixtral, OLMoE and Qwen3-MoE sparse blocks on copied weights (fp32, 1e-5), the balancing
loss at its known values, DeepSeek-V3's bias moving load with no gradient, the parameter counts, the config
errors, and `model/mlp=moe` in a tiny model. Tiny sizes: dim 16, 4 experts, top-2."""
import math

import pytest
import torch

from smollm.config import ConfigError, build_model, compose
from smollm.moe import MoE, experts_grouped, experts_reference, route

TINY = ["model=tiny", "data.vocab_size=128", "model/mlp=moe"]


@pytest.mark.parametrize("norm_topk", [True, False])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_grouped_equals_reference_forward_and_backward(norm_topk, k):
    g = torch.Generator().manual_seed(k)
    T, D, H, E = 20, 16, 8, 4
    x = torch.randn(T, D, dtype=torch.float64, generator=g, requires_grad=True)
    gu = torch.randn(E, 2 * H, D, dtype=torch.float64, generator=g, requires_grad=True)
    dn = torch.randn(E, D, H, dtype=torch.float64, generator=g, requires_grad=True)
    logits = torch.randn(T, E, dtype=torch.float64, generator=g)
    logits[:, 3] = -30.0                                   # an expert no token picks costs nothing and still works
    _, idx, w = route(logits, k, norm_topk)
    w = w.double().requires_grad_()
    a, b = experts_grouped(x, gu, dn, idx, w, impl="torch"), experts_reference(x, gu, dn, idx, w)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    ct = torch.randn_like(a)
    for u, v in zip(torch.autograd.grad(a, (x, gu, dn, w), ct), torch.autograd.grad(b, (x, gu, dn, w), ct)):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)


def test_module_gradients_match_reference_through_router():
    torch.manual_seed(0)
    m = MoE(16, 64, n_experts=4, top_k=2, n_shared=1).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    y = m(x)
    xf = x.reshape(-1, 16)
    _, idx, w = route(m.router(xf), 2)
    ref = experts_reference(xf, m.gate_up_proj, m.down_proj, idx, w) + m.shared(xf)
    torch.testing.assert_close(y.reshape(-1, 16), ref)
    params = [p for p in m.parameters()]
    ct = torch.randn_like(ref)
    for u, v in zip(torch.autograd.grad(y.reshape(-1, 16), params, ct, retain_graph=True),
                    torch.autograd.grad(ref, params, ct)):
        torch.testing.assert_close(u, v)
    assert all(gr.abs().sum() > 0 for gr in torch.autograd.grad((y * y).sum(), params))   # router included


def _hf_block(name, norm_topk):
    if name == "mixtral":
        from transformers.models.mixtral.configuration_mixtral import MixtralConfig as C
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as B
        cfg = C(hidden_size=16, intermediate_size=8, num_local_experts=4, num_experts_per_tok=2)
    elif name == "olmoe":
        from transformers.models.olmoe.configuration_olmoe import OlmoeConfig as C
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as B
        cfg = C(hidden_size=16, intermediate_size=8, num_experts=4, num_experts_per_tok=2, norm_topk_prob=norm_topk)
    else:
        from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig as C
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as B
        cfg = C(hidden_size=16, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2, norm_topk_prob=norm_topk)
    return B(cfg).eval()


@pytest.mark.parametrize("name,norm_topk", [("mixtral", True), ("olmoe", False), ("olmoe", True),
                                            ("qwen3_moe", True), ("qwen3_moe", False)])
def test_matches_transformers_sparse_moe_block(name, norm_topk):
    torch.manual_seed(0)
    hf = _hf_block(name, norm_topk)
    m = MoE(16, 64, n_experts=4, top_k=2, expert_hidden=8, norm_topk=norm_topk).eval()
    with torch.no_grad():
        m.router.weight.normal_(); m.gate_up_proj.normal_(); m.down_proj.normal_()
        hf.gate.weight.copy_(m.router.weight)
        hf.experts.gate_up_proj.copy_(m.gate_up_proj)
        hf.experts.down_proj.copy_(m.down_proj)
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        torch.testing.assert_close(m(x), hf(x), rtol=1e-5, atol=1e-5)
    # the opposite renormalisation must not pass: the comparison can fail
    m.norm_topk = not norm_topk
    with torch.no_grad():
        assert not torch.allclose(m(x), hf(x), rtol=1e-5, atol=1e-5)


def test_balance_loss_values():
    m = MoE(16, 64, n_experts=4, top_k=2)
    with torch.no_grad():
        m.router.weight.zero_()                            # uniform scores: P_i = 1/4, and f sums to 1
    m(torch.randn(40, 16))
    assert m.balance_loss.item() == pytest.approx(1.0)
    assert m.router_entropy.item() == pytest.approx(math.log(4))
    assert m.aux_loss.item() == pytest.approx(0.01)
    assert m.aux_loss.requires_grad
    with torch.no_grad():
        m.router.weight[0, 0] = 50.0; m.router.weight[1, 0] = 49.0   # every token: experts 0 and 1
    m(torch.rand(40, 16) + 0.5)
    assert m.load.tolist() == pytest.approx([0.5, 0.5, 0.0, 0.0])
    assert m.stats()["load_max"] == pytest.approx(2.0)            # n_experts / top_k: the worst
    assert m.balance_loss.item() == pytest.approx(4 * 0.5 * 1.0, rel=1e-3)   # P = (~1, ~0, ...)


def test_aux_free_bias_moves_load_without_gradients():
    m = MoE(16, 64, n_experts=4, top_k=2, aux_loss_weight=0.0, bias_update_rate=0.05)
    with torch.no_grad():
        m.router.weight.zero_(); m.router.weight[:2, 0] = 1.0
    x = torch.rand(64, 16) + 0.1
    m.eval(); m(x)
    assert m.expert_bias.abs().sum() == 0, "no bias step outside training"
    m.train()
    for _ in range(20):
        y = m(x)
    assert m.load[2:].sum() > 0.2
    assert not m.expert_bias.requires_grad and "expert_bias" in m.state_dict()
    # the bias picks experts but does not weight them: outputs still equal the reference on unbiased weights
    p, idx, w = route(m.router(x), 2, True, m.expert_bias)
    torch.testing.assert_close(w, p.gather(-1, idx) / p.gather(-1, idx).sum(-1, keepdim=True))


def test_param_counts():
    m = MoE(16, 96, n_experts=8, top_k=2, n_shared=1)         # expert_hidden = 96 // 3 = 32
    assert m.expert_hidden == 32
    c = m.param_counts()
    assert c["total"] == sum(p.numel() for p in m.parameters())
    assert c["active"] == 16 * 8 + 3 * 16 * 32 + 2 * 3 * 16 * 32
    assert c["active"] - 16 * 8 == 3 * 16 * 96               # active experts = a SwiGLU of width hidden


@pytest.mark.parametrize("override,key", [("model.mlp.top_k=5", "top_k"), ("model.mlp.n_experts=0", "n_experts"),
                                          ("model.mlp.n_shared=-1", "n_shared"),
                                          ("model.mlp.aux_loss_weight=-1", "aux_loss_weight")])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        build_model(compose([*TINY, override]).model)


def test_tiny_model_with_moe_trains_and_counts():
    torch.manual_seed(0)
    model = build_model(compose([*TINY, "model.mlp.n_shared=1", "model.mlp.bias_update_rate=0.001"]).model)
    ids = torch.randint(0, 128, (2, 17))
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    aux = sum(m.aux_loss for m in model.modules() if isinstance(m, MoE))
    (loss + aux).backward()
    assert torch.isfinite(loss) and aux.item() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert moes and all(set(m.stats()) == {"load_max", "router_entropy", "balance_loss"} for m in moes)


def test_balance_loss_is_mixtral_load_balancing_loss_over_top_k():
    # transformers' f sums to top_k over the experts, ours to 1: theirs is top_k times ours
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    torch.manual_seed(0)
    m = MoE(16, 64, n_experts=4, top_k=2)
    x = torch.randn(30, 16)
    m(x)
    theirs = load_balancing_loss_func((m.router(x),), num_experts=4, top_k=2)
    assert theirs.item() == pytest.approx(2 * m.balance_loss.item(), rel=1e-5)


def test_match_sizes_experts_to_active_or_total():
    active, total = MoE(16, 96, n_experts=8, top_k=2), MoE(16, 96, n_experts=8, top_k=2, match="total")
    dense = 3 * 16 * 96
    assert active.param_counts()["active"] - 16 * 8 == dense
    assert total.param_counts()["total"] - 16 * 8 == dense
    with pytest.raises(ConfigError, match="match"):
        build_model(compose([*TINY, "model.mlp.match=all"]).model)


def test_builds_on_meta():
    with torch.device("meta"):
        model = build_model(compose(["model=tinyllama_120m", "model/mlp=moe"]).model)
    assert any(isinstance(m, MoE) for m in model.modules())
