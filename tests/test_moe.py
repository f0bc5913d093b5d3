"""The mixture of experts (smollm.moe): the grouped form against the naive dense reference forward and backward
(fp64), transformers' Mixtral, OLMoE and Qwen3-MoE sparse blocks on copied weights (fp32, 1e-5), the balancing
loss at its known values, DeepSeek-V3's bias moving load with no gradient, the parameter counts, the config
errors, and `model/mlp=moe` in a tiny model. Tiny sizes: dim 16, 4 experts, top-2."""
import math

import pytest
import torch

from smollm.config import ConfigError, build_model, compose
from smollm.errors import ArgumentError
from smollm.testing import check_gradients
from smollm.moe import (ROUTER_COLUMNS, MoE, bias_step, end_step, experts_grouped, experts_reference, metric_columns,
                        route, router_stats, take_aux_loss)

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


def test_gated_shared_expert_matches_transformers_qwen3_next():
    "Qwen3-Next's sparse block: routed experts plus a shared SwiGLU that sigmoid(shared_expert_gate(x)) scales."
    from transformers.models.qwen3_next.configuration_qwen3_next import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock
    torch.manual_seed(0)
    cfg = Qwen3NextConfig(hidden_size=16, moe_intermediate_size=8, shared_expert_intermediate_size=16, num_experts=6,
                          num_experts_per_tok=3, norm_topk_prob=True)
    hf = Qwen3NextSparseMoeBlock(cfg).eval()
    m = MoE(16, 64, n_experts=6, top_k=3, n_shared=2, expert_hidden=8, shared_gate=True).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
        hf.gate.weight.copy_(m.router.weight)
        hf.experts.gate_up_proj.copy_(m.gate_up_proj); hf.experts.down_proj.copy_(m.down_proj)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(hf.shared_expert, name).weight.copy_(getattr(m.shared, name).weight)
        hf.shared_expert_gate.weight.copy_(m.shared_gate.weight)
        x = torch.randn(2, 9, 16)
        torch.testing.assert_close(m(x), hf(x), rtol=1e-5, atol=1e-5)
        gate = m.shared_gate
        m.shared_gate = None                                  # the ungated shared expert must not pass
        assert not torch.allclose(m(x), hf(x), rtol=1e-5, atol=1e-5)
        m.shared_gate = gate
        gate.weight.zero_(); hf.shared_expert_gate.weight.zero_()   # sigmoid(0) = 1/2: half the shared expert
        routed = MoE(16, 64, n_experts=6, top_k=3, expert_hidden=8).eval()
        routed.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("shared")})
        ungated = MoE(16, 64, n_experts=6, top_k=3, n_shared=2, expert_hidden=8).eval()
        ungated.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("shared_gate")})
        torch.testing.assert_close(m(x), (routed(x) + ungated(x)) / 2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hf(x), m(x), rtol=1e-5, atol=1e-5)


def test_shared_gate_counts_and_needs_a_shared_expert():
    m = MoE(16, 96, n_experts=8, top_k=2, n_shared=1, shared_gate=True)
    c = m.param_counts()
    assert c["total"] == sum(p.numel() for p in m.parameters())
    assert c["active"] == 16 * 8 + 16 + 3 * 16 * 32 + 2 * 3 * 16 * 32   # router, gate, shared, two experts
    with pytest.raises(ArgumentError, match="shared_gate=True is not valid: .*n_shared=0"):
        MoE(16, 96, shared_gate=True)
    model = build_model(compose([*TINY, "model.mlp.n_shared=1", "model.mlp.shared_gate=true"]).model)
    assert model.layers[0].mlp.shared_gate.weight.shape == (1, model.dim)
    assert model.param_totals()["total"] == model.num_params()
    assert build_model(compose(list(TINY)).model).layers[0].mlp.shared_gate is None   # off by default


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
    m.step_sums.zero_()
    m(torch.rand(40, 16) + 0.5)
    assert m.load.tolist() == pytest.approx([0.5, 0.5, 0.0, 0.0])
    m.end_step()
    s = m.stats()
    assert (s["load_max"], s["load_min"], s["load_cv"]) == pytest.approx((2.0, 0.0, 1.0))   # n_experts / top_k: the worst
    assert m.balance_loss.item() == pytest.approx(4 * 0.5 * 1.0, rel=1e-3)   # P = (~1, ~0, ...)


def test_aux_free_bias_moves_load_without_gradients():
    m = MoE(16, 64, n_experts=4, top_k=2, aux_loss_weight=0.0, bias_update_rate=0.05)
    with torch.no_grad():
        m.router.weight.zero_(); m.router.weight[:2, 0] = 1.0
    x = torch.rand(64, 16) + 0.1
    m.eval(); m(x)
    assert m.expert_bias.abs().sum() == 0, "no bias step outside training"
    m.end_step()
    assert m.expert_bias.abs().sum() == 0, "no bias step outside training"
    m.train()
    for _ in range(20):
        y = m(x)
        assert m.expert_bias.abs().sum() <= 2 * 4 * 0.05 * _ + 1e-6   # steps only in end_step
        m.end_step()
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


@pytest.mark.parametrize("shared_gate", [False, True])
def test_tiny_model_with_moe_trains_and_counts(shared_gate):
    torch.manual_seed(0)
    model = build_model(compose([*TINY, "model.mlp.n_shared=1", "model.mlp.bias_update_rate=0.001",
                                 f"model.mlp.shared_gate={str(shared_gate).lower()}"]).model)
    ids = torch.randint(0, 128, (2, 17))
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    aux = take_aux_loss(model)
    assert torch.allclose(aux, sum(m.aux_loss_weight * m.balance_loss for m in model.modules() if isinstance(m, MoE)))
    assert torch.isfinite(loss) and aux.item() > 0
    check_gradients(model, lambda: loss + aux, "MoE model")
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert moes and all(m.stats() == {} for m in moes)            # statistics are per optimizer step
    end_step(model)
    assert all(set(m.stats()) == {"load_max", "load_min", "load_cv", "router_entropy"} for m in moes)
    assert set(router_stats(model)) == set(ROUTER_COLUMNS)
    assert metric_columns(model) == ("aux_loss", *ROUTER_COLUMNS)


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


def test_bias_steps_once_per_optimizer_step_from_all_micro_batches():
    "Micro-batches add up; eval forwards and no_grad forwards in training mode add nothing; end_step steps once."
    m = MoE(16, 64, n_experts=4, top_k=2, bias_update_rate=0.01)
    with torch.no_grad():
        m.router.weight.zero_(); m.router.weight[:, :4] = torch.eye(4)   # expert i scores feature i
    def tokens(n, experts):
        x = torch.zeros(n, 16); x[:, experts] = 1.0; return x + 0.01 * torch.rand(n, 16)
    # micro-batch 1: 12 tokens to experts 1 and 3; micro-batch 2: 8 tokens to experts 0 and 2
    m(tokens(12, [1, 3])); m(tokens(8, [0, 2]))
    m.eval(); m(tokens(100, [0, 1])); m.train()     # an evaluation in the middle of a step
    with torch.no_grad():
        m(tokens(100, [0, 1]))                      # sampling in training mode
    assert m.expert_bias.abs().sum() == 0           # no step in any forward
    m.end_step()
    # the step's counts (8, 12, 8, 12), mean 10: up for 0 and 2, down for 1 and 3. Stepping per micro-batch would
    # give 0 everywhere, the last micro-batch alone the opposite signs, counting the evaluations other signs again
    torch.testing.assert_close(m.expert_bias, torch.tensor([0.01, -0.01, 0.01, -0.01]))
    torch.testing.assert_close(m.step_load, torch.tensor([8.0, 12.0, 8.0, 12.0]) / 40)
    m.end_step()                                    # no training forward since: nothing moves
    torch.testing.assert_close(m.expert_bias, torch.tensor([0.01, -0.01, 0.01, -0.01]))


def test_bias_step_sums_the_load_over_ranks():
    "With torch.distributed initialised, end_step takes the load of every rank (gloo, 2 processes on the CPU)."
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    ps = [ctx.Process(target=_rank_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in ps: p.start()
    for p in ps: p.join(120)
    out = dict(q.get() for _ in range(2))
    assert all(p.exitcode == 0 for p in ps)
    c0, c1 = out[0]["counts"], out[1]["counts"]
    assert out[0]["bias"] == out[1]["bias"]                                   # the ranks agree
    expected = bias_step(torch.tensor(c0) + torch.tensor(c1), 0.01).tolist()
    assert out[0]["bias"] == pytest.approx(expected)


def _rank_worker(rank, world, port, q):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        m = MoE(16, 64, n_experts=4, top_k=2, bias_update_rate=0.01)   # the same weights on both ranks
        torch.manual_seed(1 + rank)
        x = torch.randn(5 + 20 * rank, 16)                             # different data and sizes per rank
        m(x)
        counts = (m.load * x.shape[0] * 2).tolist()
        m.end_step()
        q.put((rank, {"counts": counts, "bias": m.expert_bias.tolist()}))
    finally:
        dist.destroy_process_group()


def test_model_init_reaches_the_stacked_experts():
    "The model's init_std, and its depth scaling for residual outputs, reach the (n_experts, ...) weights."
    torch.manual_seed(0)
    cfg = compose([*TINY, "model.dim=128", "model.n_layers=8", "model.init_std=0.05", "model.mlp.n_experts=8"])
    model = build_model(cfg.model)
    moe = model.layers[3].mlp
    assert moe.gate_up_proj.shape[0] == 8
    assert moe.gate_up_proj.std().item() == pytest.approx(0.05, rel=0.02)
    assert moe.down_proj.std().item() == pytest.approx(0.05 / math.sqrt(2 * 8), rel=0.03)
    assert moe.router.weight.std().item() == pytest.approx(0.05, rel=0.1)
    dense = model.layers[3].attn.o_proj.weight.std().item()          # the same rule as the dense residual outputs
    assert moe.down_proj.std().item() == pytest.approx(dense, rel=0.1)


def test_model_reports_active_parameters():
    model = build_model(compose([*TINY, "model.mlp.n_experts=8", "model.mlp.top_k=2", "model.mlp.n_shared=1"]).model)
    totals = model.param_totals()
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert totals["total"] == model.num_params()
    idle = sum(m.param_counts()["total"] - m.param_counts()["active"] for m in moes)
    assert idle == len(moes) * (8 - 2) * 3 * model.dim * moes[0].expert_hidden
    assert totals["active"] == totals["total"] - idle
    dense = build_model(compose(["model=tiny", "data.vocab_size=128"]).model).param_totals()
    assert dense["active"] == dense["total"]
