"""Every option of every model group composes, builds a tiny model, and trains for one step; impossible
configs raise a ConfigError that names the key."""
import math

import pytest
import torch

from smollm.config import ConfigError, build_model, compose, conf_dir, options
from smollm.testing import check_component, check_gradients

TINY = ["model=tiny", "data.vocab_size=128"]
# a mixer option binds to a letter of the layer pattern (model.mixers.C), not to model.mixer: tests/test_mixers.py
# runs this matrix for every option of model/mixer, in a hybrid pattern
GROUPS = sorted(f"model/{p.name}" for p in (conf_dir() / "model").iterdir() if p.is_dir() and p.name != "mixer")


def tiny(*overrides):
    return build_model(compose([*TINY, *overrides]).model)


def one_row(model, T=12):
    "Inputs and targets for a next-token loss: 2 random rows of T tokens."
    ids = torch.randint(0, model.vocab_size, (2, T + 1))
    return ids[:, :-1], ids[:, 1:]


def one_step(model, T=12):
    loss = model.loss(*one_row(model, T))
    loss.backward()
    return loss


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_is_a_member_of_its_family(group, option):
    # a group of conf/model/ is a component family: each option's class declares that family
    from hydra.utils import get_class
    family = group.split("/", 1)[1]
    target = compose([*TINY, f"{group}={option}"]).model[family]._target_
    assert get_class(target).family == family


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_builds_and_trains(group, option):
    cfg = compose([*TINY, f"{group}={option}"])
    model = build_model(cfg.model)
    loss = model.loss(*one_row(model))
    assert torch.isfinite(loss)
    assert abs(loss.item() - math.log(128)) < 1.0, "a fresh model should be near the uniform loss"
    check_gradients(model, lambda: loss, f"{group}={option}")   # a finite, nonzero gradient on every parameter
    # and the option's component, from its yaml, passes its family's checks (what users run on theirs)
    check_component(cfg.model[group.split("/", 1)[1]], name=f"{group}={option}")


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
    assert set(counts) == {"attention", "mlp", "embedding", "lm_head", "norm"}


def test_param_counts_follow_the_owning_module():
    # QK-norm weights sit inside attention but count as norm; sinks are attention; learned positions positional
    base = tiny().param_counts()
    qk = tiny("model/attention=qk_norm").param_counts()
    hd, L = 64 // 4, 2
    assert qk["norm"] - base["norm"] == L * 2 * hd and qk["attention"] == base["attention"]
    sinks = tiny("model/attention=sinks").param_counts()
    assert sinks["attention"] - base["attention"] == L * 4 and sinks["norm"] == base["norm"]
    learned = tiny("model/positional=learned").param_counts()
    assert learned["positional"] == 64 * 64 and "positional" not in base
    tied = tiny("model.tie_embeddings=true").param_counts()
    assert "lm_head" not in tied and tied["embedding"] == base["embedding"]


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
    (["model/attention=sinks", "model.attention.backend=fused"], "model.attention.sinks=True"),
    (["model/attention=differential", "model.n_kv_heads=1"], "model.n_kv_heads=1 is not valid: an even number"),
    (["model/attention=mla", "model.value_residual=true"], "model.value_residual=True is not valid: False"),
    (["model=tinyllama_1b", "data.vocab_size=40000"], "model.vocab_size=32000"),
    (["model/norm=batchnorm"], "model/norm='batchnorm'"),
    (["model=tinyllama_7b"], "model='tinyllama_7b'"),
])
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        compose(overrides)
    assert key in str(e.value), str(e.value)


@pytest.mark.parametrize("overrides,message", [
    # a value build_model passes itself names the model-level key
    (["model.n_layers=0"], "model.n_layers=0 is not valid: a positive integer"),
    (["model.dim=0"], "model.dim=0 is not valid"),
    (["model.block_size=0"], "model.block_size=0 is not valid"),
    (["model.mlp_hidden=0"], "model.mlp_hidden=0 is not valid"),
    (["model=tinyllama_1b", "model.vocab_size=0", "data.vocab_size=0"], "model.vocab_size=0 is not valid"),
    # an argument from a component's own yaml names model.<group>.<arg>, nested keys included
    (["model/positional=t5", "model.positional.num_buckets=7"], "model.positional.num_buckets=7 is not valid"),
    (["model/positional=rope_yarn", "model.positional.scaling.factor=0.5"],
     "model.positional.scaling.factor=0.5 is not valid"),
    (["model/attention=softcap", "model.attention.softcap=-1.0"], "model.attention.softcap=-1.0 is not valid"),
    (["+model.attention.window=0", "model.layer_pattern=S"], "model.attention.window=0 is not valid"),
    # an interpolated value names the key it points at
    (["model.n_kv_heads=3"], "model.n_kv_heads=3 is not valid: a divisor of model.n_heads=8"),
    (["model=tiny", "data.vocab_size=0"], "data.vocab_size=0 is not valid"),
    # the model asks each layer's backend about the positional that layer uses
    (["model/positional=t5", "model.attention.backend=fused"], "model.attention.backend='fused' is not valid"),
])
def test_construction_errors_map_to_config_keys(overrides, message):
    with pytest.raises(ConfigError) as e:
        compose(overrides)
    assert message in str(e.value), str(e.value)


def test_nope_layers_take_no_bias_so_fused_passes():
    # only the layers that see T5's bias need a backend that applies it: N layers see none
    compose(["model=tiny", "model/positional=t5", "model.attention.backend=fused", "model.layer_pattern=N"])
    with pytest.raises(ConfigError, match="backend='fused'"):
        compose(["model=tiny", "model/positional=t5", "model.attention.backend=fused", "model.layer_pattern=NG"])


def test_unknown_layer_letter_on_the_dict_path():
    # build_model on a plain dict, no compose: an unknown letter used to build a global layer silently
    from omegaconf import OmegaConf
    cfg = OmegaConf.to_container(compose(TINY).model, resolve=True)
    assert len(build_model({**cfg, "layer_pattern": "GN"}).nope_layers) == 1
    with pytest.raises(ConfigError, match=r"model.layer_pattern='GX' is not valid: a string of the letters G .*S .*N"):
        build_model({**cfg, "layer_pattern": "GX"})
    with pytest.raises(ConfigError, match=r"S \(sliding-window attention\) layers need model.attention.window set"):
        build_model({**cfg, "layer_pattern": "S"})


def test_layer_kinds_build_what_they_say():
    m = tiny("model/attention=sliding_window", "model.attention.window=8", "model.n_layers=4", "model.layer_pattern=SGNS")
    assert [blk.attn.window for blk in m.layers] == [8, None, None, 8]
    assert m.nope_layers == {2}
    assert [blk.attn.window for blk in tiny("model/attention=sliding_window").layers] == [64, 64]   # no pattern


def test_compose_builds_on_meta_only():
    # the dry build spends no memory: composing TinyLlama-1.1B leaves no new parameters on the CPU
    made = []
    real = torch.nn.Module.register_parameter

    def spy(self, name, p):
        if p is not None:
            made.append(p.device.type)
        return real(self, name, p)
    torch.nn.Module.register_parameter = spy
    try:
        compose(["model=tinyllama_1b"])
    finally:
        torch.nn.Module.register_parameter = real
    assert made and set(made) == {"meta"}


def _sweep_jobs(experiment):
    "The jobs Hydra's basic sweeper launches for `smollm-train -m experiment=...`, each a tuple of overrides."
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(conf_dir())))
    cfg = loader.load_configuration("train", overrides=[f"experiment={experiment}"], run_mode=RunMode.MULTIRUN)
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    overrides = OverridesParser.create(config_loader=loader).parse_overrides(params)
    return [tuple(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


@pytest.mark.parametrize("experiment", [e for e in options("experiment") if e.startswith("ablate_")])
def test_ablation_experiments_sweep_existing_options(experiment):
    jobs = _sweep_jobs(experiment)
    swept = {o.partition("=")[0] for job in jobs for o in job} - {"seed"}
    assert len(swept) == 1 and "/" in next(iter(swept)), "an ablation sweeps one family"
    group = swept.pop()
    values = sorted({o.partition("=")[2] for job in jobs for o in job if o.startswith(group + "=")})
    seeds = {o for job in jobs for o in job if o.startswith("seed=")}
    assert len(values) >= 3 and len(seeds) >= 2, "several options and several seeds"
    assert len(jobs) == len(values) * len(seeds)
    for v in values:
        assert v in options(group), f"{experiment}: {group}={v} is not an option ({options(group)})"
        compose([f"experiment={experiment}", f"{group}={v}"])


@pytest.mark.parametrize("experiment,group,left_out", [
    ("ablate_norm", "model/norm", set()), ("ablate_mlp", "model/mlp", {"none"}),
    ("ablate_attention", "model/attention", {"softcap", "sinks"}),
    ("ablate_positional", "model/positional", {o for o in options("model/positional") if o.startswith("rope_")}),
])
def test_ablations_sweep_every_option_of_their_group(experiment, group, left_out):
    # the sweeps are globs: a new option file joins its family's ablation without editing the experiment
    values = {o.partition("=")[2] for job in _sweep_jobs(experiment) for o in job if o.startswith(group + "=")}
    assert values == set(options(group)) - left_out
