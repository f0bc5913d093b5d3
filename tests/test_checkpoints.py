"""Sharded checkpoints (torch.distributed.checkpoint) across world sizes, on CPU with gloo: a checkpoint saved by 2 ranks
(FSDP2, DDP) resumes in one process with the same next-step loss and weights, and one saved in one process resumes on
2 ranks; load_run consolidates a sharded run in a plain process; a failed or half-written save is never trusted; the
single-process format of before still loads. The ranks are tests/dist_worker_ckpt.py, launched once by torchrun."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_worker_ckpt import CFG, GLOBAL_BATCH, T, batch, tiny, train_step  # noqa: E402

from smollm.config import compose
from smollm.runs import (latest_checkpoint, load_checkpoint, load_run, read_checkpoint_state, rng_state,
                         save_checkpoint, save_config)
from smollm.train import adamw

BIN = Path(sys.executable).parent
WORKER = Path(__file__).resolve().parent / "dist_worker_ckpt.py"
TOL = 1e-5


def trained(steps: int = 2):
    "The tiny model and its AdamW after `steps` steps on the global batches, in this one process."
    model = tiny()
    opt = adamw(model)
    for step in range(steps):
        train_step(model, opt, step)
    return model, opt


def save_old_format(folder: Path, model, opt, state: dict):
    "A checkpoint as smollm wrote them before DCP: model.safetensors, and state.pt holding the optimizer's state_dict()."
    from safetensors.torch import save_model
    folder.mkdir(parents=True)
    save_model(model, str(folder / "model.safetensors"))
    torch.save({**state, "optimizer": opt.state_dict()}, folder / "state.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Save a one-process checkpoint (step 2), then run the 2-rank worker once; returns (folder, results, the
    one-process next-step loss)."""
    out = tmp_path_factory.mktemp("ckpt")
    model, opt = trained()
    torch.manual_seed(1000)
    torch.save(torch.get_rng_state(), out / "w1_rng.pt")
    save_checkpoint(out / "w1" / "checkpoints", 2, model, opt, {"rng": rng_state(), "tokens": 2 * GLOBAL_BATCH * T})
    save_old_format(out / "w1_old" / "step_0000002", model, opt, {"step": 2, "tokens": 5, "rng": rng_state()})
    next_loss = train_step(model, opt, 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(WORKER), str(out)],
                       env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return out, json.loads((out / "results.json").read_text()), next_loss


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_one_process_checkpoint_resumes_on_two_ranks(ranks, strategy):
    out, results, next_loss = ranks
    assert abs(results[f"{strategy}_from_w1"] - next_loss) < TOL
    assert results[f"{strategy}_from_w1_rng"] == [True, True]     # both ranks continue the one saved stream
    assert abs(results[f"{strategy}_from_w1_old"] - next_loss) < TOL   # the format of before, too


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_rank_checkpoint_resumes_in_one_process(ranks, strategy):
    out, results, next_loss = ranks
    assert not dist.is_initialized()
    ckpt = latest_checkpoint(out / f"{strategy}_run" / "checkpoints")
    assert ckpt.name == "step_0000002" and sorted(p.name for p in ckpt.glob("__*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    model = tiny()
    opt = adamw(model)
    state = load_checkpoint(ckpt, model, opt)
    at_save = torch.load(out / f"{strategy}_at_save.pt", weights_only=True)["weights"]
    assert sorted(at_save) == sorted(model.state_dict())
    assert max((model.state_dict()[k] - v).abs().max().item() for k, v in at_save.items()) == 0.0
    assert abs(train_step(model, opt, state["step"]) - results[f"{strategy}_next"]) < TOL
    assert abs(results[f"{strategy}_next"] - next_loss) < TOL     # and the 2-rank run is the 1-process run


def test_every_rank_rng_state_is_kept(ranks):
    out, results, _ = ranks
    ckpt = latest_checkpoint(out / "fsdp_run" / "checkpoints")
    saved = torch.load(ckpt / "state.pt", weights_only=True)
    assert saved["world_size"] == 2 and len(saved["rng"]) == 2
    for rank, rng in enumerate(saved["rng"]):
        torch.manual_seed(1000 + rank)
        assert torch.equal(rng["torch"], torch.get_rng_state())
    state = read_checkpoint_state(ckpt)                           # one process: rank 0's
    assert torch.equal(state["rng"]["torch"], saved["rng"][0]["torch"]) and state["tokens"] == 2 * GLOBAL_BATCH * T


def test_load_run_consolidates_a_sharded_run_in_a_plain_process(ranks):
    """smollm-generate, smollm-chat (load_model) and to_hf(load_run(run)[0], out) read a run trained on 2 ranks in a
    fresh process, without torchrun and without a process group."""
    out, _, _ = ranks
    code = ("import sys, torch, torch.distributed as dist; from smollm.runs import load_run, load_model; "
            "from smollm.hf import to_hf; "
            "m, cfg = load_run(sys.argv[1]); x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(7)); "
            "hf = load_model(to_hf(m, sys.argv[2] + '.hf')); assert not dist.is_initialized(); "
            "torch.save([m(x).detach(), load_model(sys.argv[1])(x).detach(), hf(x).detach()], sys.argv[2])")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    for strategy in ("fsdp", "ddp"):
        p = subprocess.run([sys.executable, "-c", code, str(out / f"{strategy}_run"), str(out / "logits.pt")],
                           env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-3000:]
        expected = torch.load(out / f"{strategy}_at_save.pt", weights_only=True)["logits"]
        run, model, exported = torch.load(out / "logits.pt", weights_only=True)   # load_run, load_model, to_hf's folder
        torch.testing.assert_close(run, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(model, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(exported, expected, atol=1e-5, rtol=0)


def test_a_save_failing_on_one_rank_fails_on_every_rank(ranks):
    out, results, _ = ranks
    assert all(e and "disk full (simulated on rank 1)" in e for e in results["failed_save_errors"]), results
    assert results["after_failed_save"] == "step_0000002" and results["saved_world_size"] == 2
    ckpt_dir = out / "fsdp_run" / "checkpoints"
    assert not (ckpt_dir / "step_0000005").exists() and (ckpt_dir / ".tmp_step_0000005").is_dir()
    assert latest_checkpoint(ckpt_dir).name == "step_0000002"


def test_a_half_written_checkpoint_is_never_trusted(tmp_path):
    "A save killed half-way leaves a temporary folder, or a step folder without DCP's .metadata: neither is trusted."
    model, opt = trained(1)
    save_checkpoint(tmp_path, 1, model, opt, {"tokens": 1})
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, opt, 1)
    save_checkpoint(tmp_path, 2, model, opt, {"tokens": 2}, keep=2)
    shutil.copytree(tmp_path / "step_0000002", tmp_path / ".tmp_step_0000003")   # killed before the rename
    (tmp_path / "step_0000002" / ".metadata").unlink()                          # and a step folder missing its index
    (tmp_path / "latest").write_text("step_0000002")
    assert latest_checkpoint(tmp_path).name == "step_0000001"
    fresh = tiny()
    state = load_checkpoint(latest_checkpoint(tmp_path), fresh, adamw(fresh))
    assert state["tokens"] == 1 and all(torch.equal(fresh.state_dict()[k], v) for k, v in expected.items())
    with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
        load_checkpoint(tmp_path / "step_0000002", fresh)


def test_the_single_process_format_of_before_still_loads(tmp_path):
    "model.safetensors + state.pt (with the optimizer), as smollm wrote checkpoints before DCP: weights, optimizer, state."
    model, opt = trained()
    run = tmp_path / "run"
    old = run / "checkpoints" / "step_0000002"
    save_old_format(old, model, opt, {"step": 2, "tokens": 5, "rng": rng_state()})
    (run / "checkpoints" / "latest").write_text(old.name)
    save_config(compose(CFG), run)
    x, _ = batch(0)
    with torch.no_grad():
        logits = model(x)
    fresh = tiny()
    fresh_opt = adamw(fresh)
    state = load_checkpoint(latest_checkpoint(run / "checkpoints"), fresh, fresh_opt)
    assert (state["step"], state["tokens"], sorted(state["rng"])) == (2, 5, ["cuda", "numpy", "python", "torch"])
    assert abs(train_step(fresh, fresh_opt, 2) - train_step(model, opt, 2)) < TOL
    with torch.no_grad():   # as `logits` was: with grad on, RMSNorm trains through its own Function (other rounding)
        torch.testing.assert_close(load_run(run)[0](x), logits, atol=0, rtol=0)   # the readers too


def test_the_format_of_before_with_tied_embeddings_and_muon(tmp_path):
    "Tied weights (stored once by safetensors) and Muon + AdamW (smollm.train.Optimizers, one state per optimizer)."
    from smollm.config import build_model
    from smollm.train import muon
    cfg = compose(CFG + ["model.tie_embeddings=true"]).model
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = muon(model)
    for step in range(2):
        train_step(model, opt, step)
    save_old_format(tmp_path / "step_0000002", model, opt, {"step": 2})
    torch.manual_seed(1)
    fresh = build_model(cfg)
    fresh_opt = muon(fresh)
    load_checkpoint(tmp_path / "step_0000002", fresh, fresh_opt)
    assert fresh.lm_head.weight is fresh.embed.weight and torch.equal(fresh.embed.weight, model.embed.weight)
    assert abs(train_step(fresh, fresh_opt, 2) - train_step(model, opt, 2)) < TOL
    with pytest.raises(ValueError, match=r"the checkpoint's optimizer has groups of \[\[14\], \[6\]\] parameters \(one list per optimizer\), this one \[\[14, 6\]\]"):
        load_checkpoint(tmp_path / "step_0000002", fresh, adamw(fresh))
