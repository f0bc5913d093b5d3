"""The ranks of tests/test_checkpoints.py, launched by `torchrun --standalone --nproc_per_node=2` on CPU (gloo).

    torchrun ... tests/dist_worker_ckpt.py OUT

OUT/w1/checkpoints holds a checkpoint that the test saved in one process, OUT/w1_old/step_0000002 the same in the
single-process format of before. Every rank:
1. loads each into an FSDP2 model and into a DDP one and takes the next step (resharding 1 -> 2);
2. trains a fresh FSDP2 model and a fresh DDP one for two steps, saves run folders OUT/<strategy>_run (config.yaml
   and checkpoints/step_0000002), takes the next step, and writes the full weights at the save and the logits of a
   fixed input (for 2 -> 1, read back by the test in one process);
3. makes a save fail on rank 1 alone, which must raise on both ranks and leave step 2 the trusted checkpoint.
Rank 0 writes what the test checks to OUT/results.json.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from smollm.config import build_model, compose
from smollm.runs import latest_checkpoint, load_checkpoint, read_checkpoint_state, rng_state, save_checkpoint, save_config
from smollm.train import adamw

CFG = ["model=tiny", "data.vocab_size=64"]
GLOBAL_BATCH, T = 4, 16


def tiny():
    "The tiny model, initialised the same way in every process (the test's included)."
    torch.manual_seed(0)
    return build_model(compose(CFG).model)


def batch(step: int, rank: int = 0, world: int = 1):
    "This rank's rows of global batch `step`: (inputs, targets); the global batch does not depend on the world size."
    x = torch.randint(0, 64, (GLOBAL_BATCH, T + 1), generator=torch.Generator().manual_seed(100 + step))
    rows = x.chunk(world)[rank]
    return rows[:, :-1], rows[:, 1:]


def train_step(model, opt, step: int, rank: int = 0, world: int = 1) -> float:
    "One optimizer step on global batch `step` through the model's forward (the hooks of DDP and FSDP2); the global mean loss."
    x, y = batch(step, rank, world)
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss = loss.detach()
    if world > 1:
        dist.all_reduce(loss)
        loss /= world
    return loss.item()


def wrap(model, strategy: str):
    if strategy == "ddp":
        return DDP(model)
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def main(out: Path):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    probe = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(7))

    saved_rng = torch.load(out / "w1_rng.pt", weights_only=True)
    for strategy in ("fsdp", "ddp"):           # 1 -> 2: the one-process checkpoint in either sharding
        model = wrap(tiny(), strategy)
        opt = adamw(model)
        state = load_checkpoint(latest_checkpoint(out / "w1" / "checkpoints"), model, opt)
        results[f"{strategy}_from_w1"] = train_step(model, opt, state["step"], rank, world)
        flags = [None] * world
        dist.all_gather_object(flags, torch.equal(state["rng"]["torch"], saved_rng))
        results[f"{strategy}_from_w1_rng"] = flags
        model = wrap(tiny(), strategy)          # and the single-process format of before
        opt = adamw(model)
        state = load_checkpoint(out / "w1_old" / "step_0000002", model, opt)
        results[f"{strategy}_from_w1_old"] = train_step(model, opt, state["step"], rank, world)

    for strategy in ("fsdp", "ddp"):           # 2 -> 1: saved here, read back by the test in one process
        run = out / f"{strategy}_run"
        model = wrap(tiny(), strategy)
        opt = adamw(model)
        for step in range(2):
            train_step(model, opt, step, rank, world)
        torch.manual_seed(1000 + rank)          # a different RNG state on each rank
        if rank == 0:
            save_config(compose(CFG), run)
        save_checkpoint(run / "checkpoints", 2, model, opt, {"rng": rng_state(), "tokens": 2 * GLOBAL_BATCH * T})
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        with torch.no_grad():
            logits = model(probe)
        if rank == 0:   # before the next step: in a DDP model the full state dict is the parameters themselves
            torch.save({"weights": full, "logits": logits}, out / f"{strategy}_at_save.pt")
        results[f"{strategy}_next"] = train_step(model, opt, 2, rank, world)

    # a save that fails on rank 1 alone, inside DCP's writing of the shards: both ranks raise, nothing is renamed
    import torch.distributed.checkpoint as dcp
    model = wrap(tiny(), "fsdp")
    opt = adamw(model)
    real = dcp.FileSystemWriter.write_data
    def broken(self, *a, **k):
        raise OSError("disk full (simulated on rank 1)")
    if rank == 1:
        dcp.FileSystemWriter.write_data = broken
    try:
        save_checkpoint(out / "fsdp_run" / "checkpoints", 5, model, opt, {})
        err = None
    except BaseException as e:   # DCP's CheckpointException is a BaseException
        err = f"{type(e).__name__}: {e}"
    dcp.FileSystemWriter.write_data = real
    errors = [None] * world
    dist.all_gather_object(errors, err)
    results["failed_save_errors"] = errors
    results["after_failed_save"] = latest_checkpoint(out / "fsdp_run" / "checkpoints").name
    results["saved_world_size"] = read_checkpoint_state(latest_checkpoint(out / "fsdp_run" / "checkpoints"))["world_size"]
    dist.barrier()
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
