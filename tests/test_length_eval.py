"""trainer.eval_lengths: the validation loss at context lengths past the training block (smollm.train), its columns in
metrics.csv and run.json, the refusal of a positional table that stops at the block, the models that run past their
block, and smollm-report's table by length (smollm.report)."""
import json
import math

import pytest
import torch

from smollm.config import ConfigError, build_model, compose
from smollm.report import find_runs, report, summarize, summarize_lengths, welch
from smollm.runs import read_metrics
from smollm.train import evaluate, set_up, train

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    "One tokenizer and token cache for the module's runs."
    return tmp_path_factory.mktemp("cache")


def text_cfg(cache, *extra):
    "A tiny run on a slice of the embedded corpus (its tokenizer cached in `cache`), block 32."
    return compose(["model=tiny", "model.block_size=32", "data=pystdlib", "data.max_files=20", "data.vocab_size=300",
                    f"data.cache_dir={cache}", "trainer.batch_size=4", "trainer.progress=false",
                    "schedule.warmup_steps=2", "trainer.log_every=2", "trainer.eval_every=4", "trainer.eval_batches=2",
                    "trainer.max_steps=4", "trainer.samples=0", *extra])


def test_columns_appear_and_the_training_length_is_val_loss(tmp_path, cache):
    out = train(text_cfg(cache, "trainer.eval_lengths=[32,64,128]"), tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [c for c in rows[0] if "@" in c] == ["val_loss@32", "val_loss@64", "val_loss@128"]
    assert [r["val_loss@128"] is not None for r in rows] == [False, True]        # at the evaluation only
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert all(math.isfinite(info[f"val_loss@{L}"]) for L in (32, 64, 128)) and out["val_loss@64"] == info["val_loss@64"]
    # the column at the block: the same windows as val_loss, its own batches and its own pass over them
    assert abs(info["val_loss@32"] - info["val_loss"]) < 1e-6
    # the longer columns are the validation loss of windows of that length, recomputed here from the checkpoint
    from smollm.runs import load_run
    model, _ = load_run(tmp_path / "run")
    from smollm.data import build_data
    src = build_data(text_cfg(cache).data)
    got = evaluate(model, src.val_batches(2, 4, 128), torch.device("cpu"))["val_loss"]
    assert abs(got - info["val_loss@128"]) < 1e-5
    assert abs(info["val_loss@128"] - info["val_loss"]) > 1e-4             # other windows: another figure


def test_default_is_no_length_columns(tmp_path, cache):
    run = set_up(text_cfg(cache), tmp_path / "run")
    assert run.long_val == {}


def test_learned_positions_are_refused_at_start_up(tmp_path, cache):
    cfg = text_cfg(cache, "model/positional=learned", "trainer.eval_lengths=[32,64]")
    with pytest.raises(ConfigError) as e:
        set_up(cfg, tmp_path / "run")
    msg = str(e.value)
    for words in ("trainer.eval_lengths=[32, 64]", "64 tokens", "32 positions", "LearnedAbsolute", "rope, alibi, nope"):
        assert words in msg, (words, msg)
    assert not (tmp_path / "run" / "metrics.csv").exists()                  # refused before the run opened
    set_up(text_cfg(cache, "model/positional=learned", "trainer.eval_lengths=[16,32]"), tmp_path / "ok")   # within


@pytest.mark.parametrize("bad", ["[0]", "[64,64]", "64", "[1.5]"])
def test_bad_lengths_are_refused(tmp_path, cache, bad):
    with pytest.raises(ConfigError, match=r"trainer\.eval_lengths=.* is not valid"):
        set_up(text_cfg(cache, f"trainer.eval_lengths={bad}"), tmp_path / "run")


def test_a_length_the_data_cannot_give_is_named(tmp_path, cache):
    with pytest.raises(ConfigError, match=r"trainer.eval_lengths: the data cannot give validation windows of 10000000"):
        set_up(text_cfg(cache, "trainer.eval_lengths=[10000000]"), tmp_path / "run")


@pytest.mark.parametrize("positional", ["rope", "alibi", "nope", "t5", "sinusoidal"])
def test_models_run_past_their_block(positional):
    "4x the block: finite, and causal (the first block's logits are those of the block alone), so positions past it are real."
    cfg = compose(["model=tiny", "model.block_size=16", f"model/positional={positional}", "data=mqar", "data.vocab_size=64"])
    model = build_model(cfg.model).eval()
    x = torch.randint(0, 64, (2, 64))
    with torch.no_grad():
        long, short = model(x), model(x[:, :16])
    assert torch.isfinite(long).all()
    torch.testing.assert_close(long[:, :16], short, atol=1e-5, rtol=1e-5)


def _sweep_jobs(experiment):
    "The jobs (tuples of overrides) that `smollm-train -m experiment=...` runs, from Hydra's own sweeper."
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode
    from smollm.config import conf_dir
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(conf_dir())))
    cfg = loader.load_configuration("train", overrides=[f"experiment={experiment}"], run_mode=RunMode.MULTIRUN)
    overrides = OverridesParser.create(config_loader=loader).parse_overrides(
        [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
    return [tuple(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def test_the_experiment_sweeps_four_encodings_over_seeds_at_1x_2x_4x():
    from smollm.train import check_eval_lengths, eval_lengths
    jobs = _sweep_jobs("length_extrapolation")
    assert sorted(jobs) == sorted((f"model/positional={p}", f"seed={s}") for p in ("rope", "alibi", "nope", "t5")
                                  for s in range(3))
    for p in ("rope", "alibi", "nope", "t5"):
        cfg = compose(["experiment=length_extrapolation", f"model/positional={p}"])
        T = cfg.model.block_size
        assert eval_lengths(cfg.trainer) == [T, 2 * T, 4 * T]
        check_eval_lengths(eval_lengths(cfg.trainer), build_model(cfg.model))   # each encoding reaches 4x
        if p == "t5": assert cfg.model.positional.max_distance <= T   # every bucket of T5's bias is trained
    with pytest.raises(ConfigError, match="trainer.eval_lengths"):
        cfg = compose(["experiment=length_extrapolation", "model/positional=learned"])
        check_eval_lengths(eval_lengths(cfg.trainer), build_model(cfg.model))


def test_report_has_a_table_by_length(tmp_path):
    at = {"alibi": ([3.00, 3.10, 3.05], [2.95, 3.00, 3.00]), "rope": ([3.02, 3.08, 3.06], [3.60, 3.90, 3.75])}
    for num, (pe, seed) in enumerate((p, s) for p in at for s in range(3)):
        d = tmp_path / str(num); (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(f"- model/positional={pe}\n- seed={seed}\n")
        short, long = at[pe][0][seed], at[pe][1][seed]
        (d / "metrics.csv").write_text(f"step,tokens,train_loss,val_loss,val_loss@64,val_loss@256\n10,640,3.5,{short},{short},{long}\n")
        (d / "run.json").write_text(json.dumps({"status": "done", "metric": "loss", "val_loss": short,
                                                "val_loss@64": short, "val_loss@256": long}))
    runs = find_runs(tmp_path)
    rows, _, base = summarize(runs, baseline="model/positional=rope")
    assert all(r["scores"] == {} for r in rows)                              # not beside the headline
    cols, stats = summarize_lengths(runs, rows, base)
    assert cols == ["val_loss@64", "val_loss@256"]
    alibi = stats[rows[0]["key"]]
    assert abs(alibi["val_loss@256"]["p"] - welch(at["alibi"][1], at["rope"][1])[2]) < 1e-12
    md, _ = report(tmp_path, baseline="model/positional=rope")
    assert "| configuration | n | @64 | @256 | @256 − @64 |" in md
    line = next(l for l in md.splitlines() if l.startswith("| model/positional=alibi | 3 | 3.050 ±"))
    assert "2.983 ± 0.029" in line and "-0.067 ± 0.029" in line
    assert (tmp_path / "lengths.png").is_file()
