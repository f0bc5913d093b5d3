"""Every option of every model group composes, builds a tiny model, and trains for one step; impossible
configs raise a ConfigError that names the key."""
import math

import pytest
import torch

from smollm.config import ConfigError, compose, options
from smollm.config import build_model

TINY = ["data.vocab_size=128", "model.n_layers=2", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2",
        "model.mlp_hidden=96", "model.block_size=128"]
GROUPS = ["model/attention", "model/norm", "model/positional", "model/mlp"]


def tiny(*overrides):
    return build_model(compose([*TINY, *overrides]).model)


def one_step(model, T=12):
    ids = torch.randint(0, model.vocab_size, (2, T + 1))
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    return loss


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_builds_and_trains(group, option):
    model = tiny(f"{group}={option}")
    loss = one_step(model)
    assert torch.isfinite(loss)
    assert abs(loss.item() - math.log(128)) < 1.0, "a fresh model should be near the uniform loss"
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{group}={option}: no gradient on {name}"


@pytest.mark.parametrize("overrides", [["model.placement=post"], ["model.placement=sandwich"],
                                       ["model.parallel_residual=true"], ["model.tie_embeddings=true"],
                                       ["model.layer_pattern=GN"], ["model.mlp_sizing=fixed", "model/mlp=gelu"]])
def test_model_options_build_and_train(overrides):
    model = tiny(*overrides)
    assert torch.isfinite(one_step(model))
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("preset", options("model"))
def test_presets_build_on_meta(preset):
    with torch.device("meta"):
        model = build_model(compose([f"model={preset}"]).model)
    assert model.num_params() > 0


def test_tinyllama_1b_parameter_count():
    with torch.device("meta"):
        model = build_model(compose(["model=tinyllama_1b"]).model)
    assert model.num_params() == 1_100_048_384
    counts = model.param_counts()
    # Independent arithmetic from the published architecture.
    d, L, V, hd, kv, f = 2048, 22, 32000, 64, 4, 5632
    attn = L * (d * d + 2 * d * kv * hd + d * d)
    assert counts["attention"] == attn
    assert counts["mlp"] == L * 3 * d * f
    assert counts["embedding"] == counts["lm_head"] == V * d
    assert counts["norm"] == (2 * L + 1) * d


@pytest.mark.parametrize("overrides,key", [
    (["model.n_heads=7"], "model.n_heads=7"),
    (["model.attention.n_kv_heads=3"], "model.attention.n_kv_heads=3"),
    (["+model.attention.window=100000"], "model.attention.window=100000"),
    (["model.layer_pattern=GGG"], "model.layer_pattern='GGG'"),
    (["model.layer_pattern=GX"], "model.layer_pattern='GX'"),
    (["model.layer_pattern=SG"], "model.attention.window"),
    (["model.positional.fraction=0.1"], "model.positional.fraction=0.1"),
    (["model.placement=middle"], "model.placement='middle'"),
    (["model.parallel_residual=true", "model.placement=post"], "model.parallel_residual"),
    (["model.mlp_sizing=equal"], "model.mlp_sizing='equal'"),
    (["model.kernels=cuda"], "model.kernels='cuda'"),
    (["model.attention.backend=flash"], "model.attention.backend='flash'"),
    (["model/attention=softcap", "model.attention.backend=sdpa"], "model.attention.softcap=50.0"),
    (["model/attention=sinks", "model.attention.backend=triton"], "model.attention.sinks=True"),
    (["model=tinyllama_1b", "data.vocab_size=40000"], "model.vocab_size=32000"),
    (["model/norm=batchnorm"], "model/norm='batchnorm'"),
    (["model=tinyllama_7b"], "model='tinyllama_7b'"),
])
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        compose(overrides)
    assert key in str(e.value), str(e.value)


def test_unknown_option_lists_the_alternatives():
    with pytest.raises(ConfigError, match="available: .*rmsnorm"):
        compose(["model/norm=batchnorm"])


@pytest.mark.parametrize("experiment", [e for e in options("experiment") if e.startswith("ablate_")])
def test_ablation_experiments_sweep_existing_options(experiment):
    from omegaconf import OmegaConf
    from smollm.config import conf_dir
    params = OmegaConf.load(conf_dir() / "experiment" / f"{experiment}.yaml").hydra.sweeper.params
    groups = [k for k in params if "/" in k]
    assert len(groups) == 1, "an ablation sweeps one family"
    group = groups[0]
    values = str(params[group]).split(",")
    assert len(values) >= 3 and len(str(params.seed).split(",")) >= 2, "several options and several seeds"
    for v in values:
        assert v in options(group), f"{experiment}: {group}={v} is not an option ({options(group)})"
        compose([f"experiment={experiment}", f"{group}={v}"])
