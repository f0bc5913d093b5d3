"""The two mixer experiments of `smollm-train -m`: experiment=mqar_mixers (Zoology's MQAR comparison) and
experiment=ablate_mixer (the mixers in a hybrid on the embedded corpus). Every job of each sweep composes, and
builds the layers it names; nothing trains here."""
import pytest
import torch

from smollm.config import build_model, compose, options
from test_config import _sweep_jobs      # the jobs Hydra's basic sweeper launches for an experiment


def _configs(experiment):
    "The distinct configurations of an experiment's sweep (its jobs without their seeds), and the seeds."
    jobs = _sweep_jobs(experiment)
    configs = sorted({tuple(o for o in job if not o.startswith("seed=")) for job in jobs})
    seeds = {o for job in jobs for o in job if o.startswith("seed=")}
    assert len(jobs) == len(configs) * len(seeds)
    return configs, seeds


def _layers(cfg):
    "What each layer of the model `cfg` builds: its token mixer's (or attention's) class name and window."
    with torch.device("meta"):
        model = build_model(cfg.model)
    return [(type(b.attn).__name__, getattr(b.attn, "window", None)) for b in model.layers]


def _mixer_class(node):
    return str(node._target_).rsplit(".", 1)[-1]


MQAR_CONFIGS, MQAR_SEEDS = _configs("mqar_mixers")


def test_mqar_mixers_sweeps_every_bound_mixer_attention_and_a_hybrid_at_two_widths_over_seeds():
    patterns = {o.partition("=")[2] for c in MQAR_CONFIGS for o in c if o.startswith("model.layer_pattern=")}
    widths = {o for c in MQAR_CONFIGS for o in c if o.startswith("model.dim=")}
    assert len(widths) == 2 and len(MQAR_SEEDS) >= 2
    assert {"G", "S"} <= patterns, "global and sliding-window attention"
    bound = set(compose(["experiment=mqar_mixers"]).model.mixers)
    assert bound <= set("".join(patterns)), "every letter the experiment binds is swept"
    assert any(set(p) & bound and set(p) & {"G", "S"} for p in patterns), "a hybrid of a mixer and attention"
    for letter in bound:
        assert letter in patterns, f"{letter}: the mixer alone is swept too"


@pytest.mark.parametrize("overrides", MQAR_CONFIGS, ids=" ".join)
def test_mqar_mixers_job_composes_and_builds_its_pattern(overrides):
    cfg = compose(["experiment=mqar_mixers", *overrides])
    assert cfg.data._target_ == "smollm.data.MQAR" and cfg.trainer.threads == 1
    m, window = cfg.model, cfg.model.attention.window
    letters = [m.layer_pattern[i % len(m.layer_pattern)] for i in range(m.n_layers)]
    want = [(_mixer_class(m.mixers[c]), None) if c in m.mixers else ("Attention", window if c == "S" else None)
            for c in letters]
    assert _layers(cfg) == want


ABLATE_CONFIGS, ABLATE_SEEDS = _configs("ablate_mixer")


def test_ablate_mixer_sweeps_every_mixer_option():
    swept = {o.partition("=")[2] for c in ABLATE_CONFIGS for o in c if o.startswith("model/mixer=")}
    assert swept == set(options("model/mixer")) and len(ABLATE_SEEDS) >= 2


@pytest.mark.parametrize("overrides", ABLATE_CONFIGS, ids=" ".join)
def test_ablate_mixer_job_builds_three_mixer_layers_and_one_attention_layer(overrides):
    cfg = compose(["experiment=ablate_mixer", *overrides])
    assert cfg.data._target_ == "smollm.data.PyStdlib", "the embedded corpus, as make train"
    names = [name for name, _ in _layers(cfg)]
    mixer = _mixer_class(cfg.model.mixer)
    assert names == [mixer, mixer, mixer, "Attention"] * (cfg.model.n_layers // 4)


def test_mqar_mixers_takes_another_mixer_on_the_command_line():
    # the yaml's header shows how to add a letter, e.g. RetNet as R, alone and in a hybrid
    cfg = compose(["experiment=mqar_mixers", "+model/mixer@model.mixers.R=retnet", "model.layer_pattern=RG"])
    assert _layers(cfg) == [(_mixer_class(cfg.model.mixers.R), None), ("Attention", None)]


def test_ablate_mixer_attention_baseline_is_attention_only():
    # the baseline sweep of the yaml's header: the named mixer only replaces the glob; no layer holds it
    jobs = [j for j in _sweep_jobs("ablate_mixer") if "model/mixer=short_conv" in j]
    cfg = compose(["experiment=ablate_mixer", "model/mixer=short_conv", "model.layer_pattern=G"])
    assert len(jobs) >= 2 and _layers(cfg) == [("Attention", None)] * cfg.model.n_layers
