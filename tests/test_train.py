"""The training loop end to end, at a tiny size: exact resume (in-process and after SIGKILL), the stop on a
non-finite loss, metrics.csv, checkpoint atomicity, the command line on real text, config errors, the MoE router
columns and the multi-token prediction column."""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from smollm.config import ConfigError, compose
from smollm.config import build_model
from smollm.runs import (MetricsLog, latest_checkpoint, load_checkpoint, read_checkpoint_state, read_metrics, rng_state,
                         save_checkpoint, set_rng_state)
from smollm.train import TrainingError, adamw, final_line, resume, set_up, train

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

TINY = ["model=tiny", "model.block_size=32", "data=mqar", "data.vocab_size=64", "data.num_kv_pairs=4",
        "trainer.batch_size=8", "trainer.progress=false", "schedule.warmup_steps=2", "trainer.log_every=1",
        "trainer.eval_every=4", "trainer.eval_batches=2", "trainer.max_steps=8"]


def cfg_of(*extra):
    return compose(TINY + list(extra))


def weights(run_dir, cfg):
    m = build_model(cfg.model)
    load_checkpoint(latest_checkpoint(Path(run_dir) / "checkpoints"), m)
    return m.state_dict()


def assert_same_run(a, b, cfg):
    "Same losses at every logged step and bit-identical final weights."
    ra, rb = read_metrics(Path(a) / "metrics.csv"), read_metrics(Path(b) / "metrics.csv")
    key = lambda rows: [(r["step"], r["tokens"], r["train_loss"], r["val_loss"], r.get("val_acc"), r["lr"]) for r in rows]
    assert key(ra) == key(rb)
    assert [r["step"] for r in ra] == list(range(1, cfg.trainer.max_steps + 1))
    wa, wb = weights(a, cfg), weights(b, cfg)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("extra", [[], ["optim=muon", "schedule=wsd", "trainer.grad_accum=2"]],
                         ids=["adamw-cosine", "muon-wsd-accum"])
def test_resume_is_exact(tmp_path, extra):
    cfg = cfg_of("trainer.ckpt_every=3", *extra)
    train(cfg, tmp_path / "straight")
    out = train(cfg, tmp_path / "resumed", stop_at=4)
    assert out["status"] == "stopped"
    assert json.loads((tmp_path / "resumed" / "run.json").read_text())["status"] == "stopped"
    assert latest_checkpoint(tmp_path / "resumed" / "checkpoints").name == "step_0000004"
    train(cfg_of("trainer.ckpt_every=3", "trainer.resume=true", *extra), tmp_path / "resumed")
    assert_same_run(tmp_path / "straight", tmp_path / "resumed", cfg)
    assert json.loads((tmp_path / "resumed" / "run.json").read_text())["status"] == "done"


KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch.distributed.checkpoint as dcp
    import smollm.train
    real, calls = dcp.save, []
    def save_then_die(state_dict, *a, **k):
        calls.append(k.get("checkpoint_id"))
        real(state_dict, *a, **k)
        if len(calls) == 2:   # inside the second checkpoint: state and shards written, folder not renamed
            os.kill(os.getpid(), signal.SIGKILL)
    dcp.save = save_then_die
    sys.argv = ["smollm-train", *sys.argv[1:]]
    smollm.train.main()
""")


def test_sigkill_then_resume_matches(tmp_path):
    run = tmp_path / "killed"
    args = TINY + ["trainer.ckpt_every=3", f"hydra.run.dir={run}"]
    p = subprocess.run([sys.executable, "-c", KILLER, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    # killed while saving step 6: step 3 is still the whole, pointed-to checkpoint; the log reached step 6
    assert latest_checkpoint(run / "checkpoints").name == "step_0000003"
    assert [r["step"] for r in read_metrics(run / "metrics.csv")] == list(range(1, 7))
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    cfg = cfg_of("trainer.ckpt_every=3")
    train(cfg_of("trainer.ckpt_every=3", "trainer.resume=true"), run)
    train(cfg, tmp_path / "straight")
    assert_same_run(tmp_path / "straight", run, cfg)
    assert not list((run / "checkpoints").glob(".tmp*"))    # the half-written step 6 was redone and renamed


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import smollm.train as tr
    real_build = tr.build_model

    def build_poisoned(cfg):   # a model whose loss turns NaN at the 5th training step (the 5th call)
        m = real_build(cfg)
        loss, calls = m.loss, []

        def poisoned(x, y, **kw):
            calls.append(1)
            out = loss(x, y, **kw)
            return out * float("nan") if len(calls) == 5 else out
        m.loss = poisoned
        return m
    monkeypatch.setattr(tr, "build_model", build_poisoned)
    with pytest.raises(TrainingError, match="non-finite loss at step 5") as e:
        train(cfg_of("trainer.ckpt_every=2", "trainer.eval_every=100"), tmp_path)
    assert "step_0000004" in str(e.value)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_0000004"
    w = weights(tmp_path, cfg_of())
    assert all(torch.isfinite(v).all() for v in w.values())
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["status"] == "failed" and "step 5" in info["error"]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.csv")] == [1, 2, 3, 4]


def test_absurd_learning_rate_diverges_with_a_message(tmp_path):
    with pytest.raises(TrainingError, match=r"non-finite (loss|gradient norm) at step \d"):
        train(cfg_of("optim.lr=1e30", "trainer.grad_clip=0", "schedule=constant", "schedule.warmup_steps=0"), tmp_path)


def test_metrics_csv_is_flushed_row_by_row(tmp_path):
    log = MetricsLog(tmp_path / "metrics.csv", ["step", "train_loss", "val_loss"])
    log.write(dict(step=1, train_loss=1 / 3, val_loss=None))
    # read by another handle while the log is still open: the row is on disk, in full precision
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["step,train_loss,val_loss", f"1,{1 / 3!r},"]
    log.write(dict(step=2, train_loss=0.25, val_loss=0.5))
    log.close()
    log = MetricsLog(tmp_path / "metrics.csv", ["step", "train_loss", "val_loss"], keep_until=1)   # a resume at step 1
    log.close()
    assert read_metrics(tmp_path / "metrics.csv") == [dict(step=1, train_loss=1 / 3, val_loss=None)]


@pytest.mark.parametrize("where", ["dcp", "torch.save"])
def test_interrupted_checkpoint_leaves_the_previous_one_whole(tmp_path, monkeypatch, where):
    cfg = cfg_of()
    m = build_model(cfg.model)
    opt = adamw(m)
    save_checkpoint(tmp_path, 3, m, opt, {"tokens": 1})
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        for p in m.parameters(): p.add_(1.0)

    def boom(*a, **k): raise OSError("disk full (simulated)")
    if where == "dcp":   # the model and optimizer's shards
        import torch.distributed.checkpoint as dcp
        monkeypatch.setattr(dcp, "save", boom)
    else:
        monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 6, m, opt, {"tokens": 2})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "step_0000003"
    assert not (tmp_path / "step_0000006").exists()
    fresh = build_model(cfg.model)
    state = load_checkpoint(latest_checkpoint(tmp_path), fresh, adamw(fresh))
    assert state["tokens"] == 1 and all(torch.equal(fresh.state_dict()[k], before[k]) for k in before)
    save_checkpoint(tmp_path, 6, m, opt, {"tokens": 2})     # the leftover temporary folder does not get in the way
    assert latest_checkpoint(tmp_path).name == "step_0000006" and not (tmp_path / "step_0000003").exists()


def test_tied_embeddings_round_trip(tmp_path):
    cfg = cfg_of("model.tie_embeddings=true")
    m = build_model(cfg.model)
    save_checkpoint(tmp_path, 1, m, adamw(m), {})
    fresh = build_model(cfg.model)
    load_checkpoint(latest_checkpoint(tmp_path), fresh)
    assert fresh.lm_head.weight is fresh.embed.weight and torch.equal(fresh.embed.weight, m.embed.weight)


def test_command_line_on_text(tmp_path):
    "smollm-train on a small slice of the embedded corpus: artifacts, samples, the summary line."
    run = tmp_path / "run"
    env = {**os.environ, "SMOLLM_CACHE": str(tmp_path / "cache")}
    args = ["model=tiny", "model.block_size=32", "data=pystdlib", "data.max_files=20", "data.vocab_size=300",
            "trainer.max_steps=6", "trainer.batch_size=4", "trainer.log_every=2", "trainer.eval_every=3",
            "trainer.eval_batches=2", "trainer.ckpt_every=3", "trainer.sample_tokens=8", "schedule.warmup_steps=2",
            f"hydra.run.dir={run}"]
    p = subprocess.run([str(BIN / "smollm-train"), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for name in ("config.yaml", "run.json", "metrics.csv", "loss.png", "samples.txt", ".hydra/overrides.yaml"):
        assert (run / name).is_file(), name
    rows = read_metrics(run / "metrics.csv")
    assert [r["step"] for r in rows] == [2, 3, 4, 6] and "val_acc" not in rows[0]
    assert rows[-1]["val_ppl"] == pytest.approx(math.exp(rows[-1]["val_loss"]))
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "done" and info["unigram_loss"] > 0 and info["val_loss"] == rows[-1]["val_loss"]
    # the closing line compares with the baseline in words: six steps may end on either side of it
    gap = info["unigram_loss"] - info["val_loss"]
    assert f"validation loss {info['val_loss']:.3f} nats/token" in p.stdout
    assert f"{abs(gap):.2f} {'below' if gap >= 0 else 'above'} the unigram baseline {info['unigram_loss']:.3f}" in p.stdout
    assert (run / "samples.txt").read_text().count("--- continuation ---") == 3
    assert "data:" in (run / "config.yaml").read_text() and "${" not in (run / "config.yaml").read_text()
    # the run folder is a checkpoint smollm-generate reads: its model and its tokenizer
    from smollm.generate import generate
    from smollm.runs import load_model
    from smollm.hf import load_tokenizer
    tok, model = load_tokenizer(run), load_model(run)
    ids = torch.tensor([tok.encode("def ")])
    expected = "def " + tok.decode(generate(model, ids, 6)[0, ids.shape[1]:].tolist())
    g = subprocess.run([str(BIN / "smollm-generate"), str(run), "--prompt", "def ", "--max-new-tokens", "6"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert g.returncode == 0, g.stderr[-3000:]
    assert g.stdout.rstrip("\n") == expected.rstrip("\n")


def test_final_line_says_above_or_below_the_baseline(tmp_path):
    s = dict(step=8, tokens=4096, tokens_per_s=1000.0, metric="loss", val_loss=6.9, val_ppl=992.3, unigram_loss=6.6)
    assert "0.30 above the unigram baseline 6.600" in final_line(s, 5.0, tmp_path)
    assert "-0.30" not in final_line(s, 5.0, tmp_path)
    assert "2.10 below the unigram baseline 6.600" in final_line({**s, "val_loss": 4.5}, 5.0, tmp_path)


def draws():
    "One draw from each generator a run may use: torch's, Python's and NumPy's."
    import random
    import numpy as np
    return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist()


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    m = build_model(cfg_of().model)
    state = rng_state()
    save_checkpoint(tmp_path, 1, m, adamw(m), {"rng": state})
    expected = draws()
    assert draws() != expected                   # the generators moved on
    set_rng_state(read_checkpoint_state(latest_checkpoint(tmp_path))["rng"])
    assert draws() == expected


def test_resume_restores_the_rng_states(tmp_path):
    "A resumed run continues the generators from the checkpoint, not from a fresh seed."
    run = set_up(cfg_of(), tmp_path)
    draws()                                      # randomness drawn during training (dropout, say)
    save_checkpoint(run.ckpt_dir, 3, run.model, run.optimizer, run.state())
    expected = draws()
    back = set_up(cfg_of("trainer.resume=true"), tmp_path)   # seeded afresh from cfg.seed, as a new process is
    assert resume(back).name == "step_0000003" and back.step == 3
    assert draws() == expected


def test_resume_errors(tmp_path):
    with pytest.raises(ConfigError, match="trainer.resume=true but .* holds no checkpoint"):
        train(cfg_of("trainer.resume=true"), tmp_path)
    train(cfg_of("trainer.max_steps=2"), tmp_path)
    with pytest.raises(ConfigError, match=r"model.dim=64 there, 32 now"):
        train(cfg_of("trainer.max_steps=4", "trainer.resume=true", "model.dim=32"), tmp_path)
    assert train(cfg_of("trainer.resume=auto"), tmp_path / "fresh")["status"] == "done"   # auto: none yet, start


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="trainer.max_steps=0"):
        train(cfg_of("trainer.max_steps=0"), tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="trainer.device='cuda' but CUDA is not available"):
            train(cfg_of("trainer.device=cuda"), tmp_path)
    with pytest.raises(Exception, match="warmup_steps=-1"):
        train(cfg_of("schedule.warmup_steps=-1"), tmp_path)


def test_experiment_configs_compose():
    cfg = compose(["experiment=mqar_recall"])
    assert cfg.data._target_ == "smollm.data.MQAR" and cfg.model.attention.window is not None
    assert compose([]).get("experiment") is None


@pytest.mark.slow
def test_compile_on_cpu(tmp_path):
    "torch.compile of the loss gives the eager losses (to float tolerance)."
    eager = train(cfg_of("trainer.max_steps=3", "trainer.eval_every=3"), tmp_path / "eager")
    comp = train(cfg_of("trainer.max_steps=3", "trainer.eval_every=3", "trainer.compile=true"), tmp_path / "compiled")
    a, b = read_metrics(tmp_path / "eager" / "metrics.csv"), read_metrics(tmp_path / "compiled" / "metrics.csv")
    assert [r["train_loss"] for r in a] == pytest.approx([r["train_loss"] for r in b], rel=1e-4)
    assert eager["val_loss"] == pytest.approx(comp["val_loss"], rel=1e-4)


def test_command_line_bad_input_is_one_clear_line(tmp_path):
    "A bad override stops smollm-train before anything runs, with the message and no stack trace."
    p = subprocess.run([str(BIN / "smollm-train"), "model.n_heads=7", f"hydra.run.dir={tmp_path / 'run'}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "ConfigError: model.n_heads=7 is not valid: a divisor of model.dim=256" in p.stderr
    assert "Traceback" not in p.stderr


MOE = ["model/mlp=moe", "model.mlp.bias_update_rate=0.01"]     # the balancing loss at its default weight, 0.01


def test_moe_bias_steps_once_per_optimizer_step(tmp_path, monkeypatch):
    "Each optimizer step takes one bias step per MoE layer, from the load of its micro-batches and nothing else."
    from smollm.moe import MoE, bias_step
    calls, real = [], MoE.end_step

    def spy(self):
        sums, before = self.step_sums.clone(), self.expert_bias.clone()
        real(self)
        calls.append((self, sums, before, self.expert_bias.clone()))
    monkeypatch.setattr(MoE, "end_step", spy)
    cfg = cfg_of(*MOE, "trainer.grad_accum=2", "trainer.eval_every=2", "trainer.max_steps=4")
    train(cfg, tmp_path)                       # evaluations at steps 2 and 4, between the steps' end_step calls
    layers = list(dict.fromkeys(c[0] for c in calls))
    assert len(layers) == cfg.model.n_layers and len(calls) == 4 * len(layers)
    for layer in layers:
        mine = [c for c in calls if c[0] is layer]
        for (_, sums, before, after), nxt in zip(mine, mine[1:] + [None]):
            assert sums[-1] == 2 * 8 * 32          # two micro-batches of 8 x 32 tokens: no evaluation tokens
            assert sums[:-2].sum() == 2 * 8 * 32 * layer.top_k
            torch.testing.assert_close(after - before, bias_step(sums[:-2], 0.01))
            if nxt is not None:
                assert torch.equal(nxt[2], after)  # nothing moved it between two steps (the evaluations)
    saved = weights(tmp_path, cfg)
    assert torch.equal(saved["layers.1.mlp.expert_bias"], [c[3] for c in calls if c[0] is layers[1]][-1])
    assert any(not torch.equal(before, after) for _, _, before, after in calls)     # the bias did move


def text_cfg(tmp_path, *extra):
    "A tiny run on a slice of the embedded corpus (the Python standard library), its tokenizer cached in tmp_path."
    return compose(["model=tiny", "model.block_size=32", "data=pystdlib", "data.max_files=20", "data.vocab_size=300",
                    f"data.cache_dir={tmp_path / 'cache'}", "trainer.batch_size=4", "trainer.progress=false",
                    "schedule.warmup_steps=2", "trainer.log_every=1", "trainer.eval_every=3", "trainer.eval_batches=2",
                    "trainer.max_steps=6", "trainer.sample_tokens=4", "trainer.samples=1", *extra])


def test_moe_trains_on_text_logs_router_columns_and_resumes_exactly(tmp_path):
    cfg = text_cfg(tmp_path, *MOE, "trainer.ckpt_every=3", "trainer.grad_accum=2")
    out = train(cfg, tmp_path / "straight")
    assert out["status"] == "done" and math.isfinite(out["val_loss"])
    rows = read_metrics(tmp_path / "straight" / "metrics.csv")
    assert list(rows[0])[-5:] == ["aux_loss", "load_max", "load_min", "load_cv", "router_entropy"]
    for r in rows:
        assert 0.01 * 0.5 < r["aux_loss"] < 0.01 * 4                # weight x a balancing loss near 1 (at most E)
        assert r["load_max"] >= 1 >= r["load_min"] >= 0 and r["load_cv"] >= 0
        assert 0 < r["router_entropy"] <= math.log(4) + 1e-6
    assert rows[0]["train_loss"] > 4                                 # the token loss alone, near log(300) at the start
    info = json.loads((tmp_path / "straight" / "run.json").read_text())
    assert info["active_params"] < info["params"]
    # stopped at step 4 and resumed: the same rows (router columns included) and the same weights and biases
    train(cfg, tmp_path / "resumed", stop_at=4)
    train(text_cfg(tmp_path, *MOE, "trainer.ckpt_every=3", "trainer.grad_accum=2", "trainer.resume=true"),
          tmp_path / "resumed")
    assert_same_run(tmp_path / "straight", tmp_path / "resumed", cfg)
    cols = ["aux_loss", "load_max", "load_min", "load_cv", "router_entropy"]
    resumed = read_metrics(tmp_path / "resumed" / "metrics.csv")
    assert [[r[c] for c in cols] for r in rows] == [[r[c] for c in cols] for r in resumed]


def test_dense_run_has_no_router_or_mtp_columns(tmp_path):
    train(cfg_of("trainer.max_steps=2"), tmp_path)
    assert not {"aux_loss", "mtp_loss"} & set(read_metrics(tmp_path / "metrics.csv")[0])
    assert "active_params" not in json.loads((tmp_path / "run.json").read_text())


def test_moe_with_activation_checkpointing_is_the_same_run(tmp_path):
    "A checkpointed block re-runs its forward in the backward pass: the aux loss, the bias and the statistics do not change."
    cfg = cfg_of(*MOE, "trainer.grad_accum=2", "trainer.max_steps=4")
    train(cfg, tmp_path / "eager")
    train(cfg_of(*MOE, "trainer.grad_accum=2", "trainer.max_steps=4", "trainer.activation_checkpointing=true"),
          tmp_path / "checkpointed")
    cols = ["train_loss", "aux_loss", "load_max", "load_min", "load_cv", "router_entropy", "val_loss"]
    a, b = (read_metrics(tmp_path / d / "metrics.csv") for d in ("eager", "checkpointed"))
    assert [[r[c] for c in cols] for r in a] == [[r[c] for c in cols] for r in b]
    wa, wb = weights(tmp_path / "eager", cfg), weights(tmp_path / "checkpointed", cfg)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_moe_compiled_matches_eager(tmp_path):
    "torch.compile of the loss keeps the aux loss, the router statistics and the bias step (to float tolerance)."
    cfg = cfg_of(*MOE, "trainer.grad_accum=2", "trainer.max_steps=4")
    train(cfg, tmp_path / "eager")
    train(cfg_of(*MOE, "trainer.grad_accum=2", "trainer.max_steps=4", "trainer.compile=true"), tmp_path / "compiled")
    cols = ["train_loss", "aux_loss", "load_max", "router_entropy"]
    a, b = (read_metrics(tmp_path / d / "metrics.csv") for d in ("eager", "compiled"))
    assert [r[c] for r in a for c in cols] == pytest.approx([r[c] for r in b for c in cols], rel=1e-4)


@pytest.mark.slow   # 30-40 s each; test_moe's gloo test checks the same sum over ranks in a few seconds
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_moe_on_two_processes_matches_one(tmp_path, parallel):
    """torchrun with 2 gloo ranks, each holding half of every micro-batch: the bias step takes the load of both ranks,
    so the run is one process's with the same global batch (the bias alone: a micro-batch's balancing loss depends on
    which tokens it holds, so aux_loss_weight=0 here), and the ranks' biases agree."""
    common = [*MOE, "model.mlp.aux_loss_weight=0", "trainer.global_batch_size=8", "trainer.grad_accum=2",
              "trainer.max_steps=4", "trainer.ckpt_every=100"]
    train(cfg_of(*common), tmp_path / "one")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    p = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "smollm.train", *TINY,
                        *common, f"trainer.parallel={parallel}", f"hydra.run.dir={tmp_path / 'two'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = (read_metrics(tmp_path / d / "metrics.csv") for d in ("one", "two"))
    for ra, rb in zip(a, b, strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-5)
        assert ra["load_max"] == rb["load_max"] and ra["router_entropy"] == pytest.approx(rb["router_entropy"], abs=1e-5)
    cfg = cfg_of(*common)
    wa, wb = weights(tmp_path / "one", cfg), weights(tmp_path / "two", cfg)
    assert torch.equal(wa["layers.0.mlp.expert_bias"], wb["layers.0.mlp.expert_bias"])
    assert wa["layers.0.mlp.expert_bias"].abs().sum() > 0
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


# ------------------------------------------------------------------------------------- multi-token prediction

@pytest.fixture
def mtp_models(monkeypatch):
    """Every model built during the test (by train, set_up, build_model) has one multi-token prediction depth at the
    default weight 0.3: the presets have no key that reaches Transformer's mtp_depth yet."""
    import smollm.model

    class WithMTP(smollm.model.Transformer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "mtp_depth": kwargs.get("mtp_depth") or 1})
    monkeypatch.setattr(smollm.model, "Transformer", WithMTP)


MTP = ["trainer.grad_accum=2", "trainer.max_steps=4"]


def test_mtp_run_logs_mtp_loss_and_keeps_train_and_val_loss_next_token(tmp_path, mtp_models):
    import torch.nn.functional as F
    cfg = cfg_of(*MTP)
    train(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert list(rows[0])[-1] == "mtp_loss" and [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["mtp_loss"]) and 0.5 * r["train_loss"] < r["mtp_loss"] < 2 * r["train_loss"] for r in rows)
    # step 1 by hand, from the same initial weights and micro-batches: the next-token loss and the MTP loss apart
    run = set_up(cfg, tmp_path / "by_hand")
    m, tc = run.model.train(), cfg.trainer
    assert len(m.mtp) == 1
    ce, extra = [], []
    with torch.no_grad():
        for i in range(tc.grad_accum):
            x, y = run.source.batch("train", i, tc.batch_size, run.block, cfg.seed, 0, 1)[:2]
            ce.append(F.cross_entropy(m(x).flatten(0, 1), y.flatten()))           # the main head alone
            extra.append(m.mtp_losses(m.residual_stream(x), x, y).mean())
    ce, extra = float(sum(ce) / len(ce)), float(sum(extra) / len(extra))
    assert rows[0]["train_loss"] == pytest.approx(ce, abs=1e-5)              # not ce + 0.3 * extra
    assert rows[0]["mtp_loss"] == pytest.approx(extra, abs=1e-5)
    assert abs(extra - ce) > 1e-3                                           # the two columns can be told apart
    # the validation loss at step 4 is the trained model's plain next-token loss
    saved = build_model(cfg.model)
    load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"), saved)
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y, *_ in run.val:
            total += float(F.cross_entropy(saved.eval()(x).flatten(0, 1), y.flatten(), reduction="sum"))
            count += int((y != -100).sum())
            with_mtp = float(saved.train().loss(x, y))                      # what training mode would have given
            assert abs(with_mtp - float(saved.eval().loss(x, y))) > 1e-3
    assert rows[-1]["val_loss"] == pytest.approx(total / count, abs=1e-5)


def test_mtp_resume_is_exact(tmp_path, mtp_models):
    cfg = cfg_of(*MTP, "trainer.ckpt_every=3")
    train(cfg, tmp_path / "straight")
    train(cfg, tmp_path / "resumed", stop_at=2)
    train(cfg_of(*MTP, "trainer.ckpt_every=3", "trainer.resume=true"), tmp_path / "resumed")
    cfg = cfg_of(*MTP)
    a, b = (read_metrics(tmp_path / d / "metrics.csv") for d in ("straight", "resumed"))
    assert [r["mtp_loss"] for r in a] == [r["mtp_loss"] for r in b] and all(r["mtp_loss"] > 0 for r in a)
    assert_same_run(tmp_path / "straight", tmp_path / "resumed", cfg)
    assert any(k.startswith("mtp.0.") for k in weights(tmp_path / "straight", cfg))   # the MTP weights resumed too


MTP_MAIN = textwrap.dedent("""
    import sys
    import smollm.model, smollm.train
    class WithMTP(smollm.model.Transformer):   # as the mtp_models fixture, in each process torchrun starts
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "mtp_depth": kwargs.get("mtp_depth") or 1})
    smollm.model.Transformer = WithMTP
    sys.argv = ["smollm-train", *sys.argv[1:]]
    smollm.train.main()
""")


@pytest.mark.slow   # about 30 s each
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_mtp_on_two_processes_matches_one(tmp_path, mtp_models, parallel):
    """torchrun with 2 gloo ranks, each holding half of every micro-batch (MQAR: the same count of next-token and of
    MTP targets in every row): train_loss and mtp_loss are one process's, reduced over micro-batches and ranks."""
    common = ["trainer.global_batch_size=8", "trainer.grad_accum=2", "trainer.max_steps=4", "trainer.ckpt_every=100"]
    train(cfg_of(*common), tmp_path / "one")
    script = tmp_path / "mtp_main.py"
    script.write_text(MTP_MAIN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    p = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(script), *TINY, *common,
                        f"trainer.parallel={parallel}", f"hydra.run.dir={tmp_path / 'two'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = (read_metrics(tmp_path / d / "metrics.csv") for d in ("one", "two"))
    for ra, rb in zip(a, b, strict=True):
        assert rb["mtp_loss"] > 0
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-5)
        assert ra["mtp_loss"] == pytest.approx(rb["mtp_loss"], abs=1e-5)
    assert a[-1]["val_loss"] == pytest.approx(b[-1]["val_loss"], abs=1e-5)


@pytest.mark.slow
def test_mtp_compiled_matches_eager(tmp_path, mtp_models):
    "torch.compile of the loss keeps the MTP loss the model leaves in mtp_loss (to float tolerance)."
    train(cfg_of(*MTP), tmp_path / "eager")
    train(cfg_of(*MTP, "trainer.compile=true"), tmp_path / "compiled")
    cols = ["train_loss", "mtp_loss"]
    a, b = (read_metrics(tmp_path / d / "metrics.csv") for d in ("eager", "compiled"))
    assert all(r["mtp_loss"] > 0 for r in b)
    assert [r[c] for r in a for c in cols] == pytest.approx([r[c] for r in b for c in cols], rel=1e-4)
