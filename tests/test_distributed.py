"""Training in several processes on the CPU: torchrun with 2 gloo ranks, DDP and FSDP2, against one process with the
same global batch; rank 0 alone writing the run folder; a rank killed mid-run; refusals that name the key.

Every launch is a subprocess with a timeout and one thread per process. The one-process reference runs once per
module, in this process. The data is a 20-file slice of the standard library with a 300-token BPE, so that every
target counts and the training loss of two ranks is exactly the mean of their losses.
"""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from smollm.config import ConfigError, compose
from smollm.distributed import close
from smollm.runs import latest_checkpoint, load_run, read_metrics, read_run_json
from smollm.train import set_up, train

BIN = Path(sys.executable).parent
TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2"]
TOL = 1e-5   # fp32 on the CPU: the ranks' sums differ from one process's only in rounding

RUN = ["model=tiny", "data=pystdlib", "data.max_files=20", "data.vocab_size=300", "trainer.max_steps=6",
       "trainer.global_batch_size=8", "trainer.grad_accum=2", "trainer.log_every=1", "trainer.eval_every=3",
       "trainer.eval_batches=2", "trainer.ckpt_every=100", "trainer.progress=false", "schedule.warmup_steps=2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def overrides(cache, *extra):
    return RUN + [f"data.cache_dir={cache}", *extra]


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    "The 1-process run of the global batch (8 sequences a step, 4 per micro-batch, 2 micro-batches); its folder."
    run_dir = tmp_path_factory.mktemp("one") / "run"
    train(compose(overrides(cache)), run_dir)
    return run_dir


def launch(cmd, tmp_path, timeout=240, **kw):
    "Run `cmd` (one thread per process, temporary files under tmp_path) to the end; the CompletedProcess."
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def max_differences(a, b):
    "(max |loss difference| over metrics.csv's train and val losses, max |weight difference|) between two run folders."
    ra, rb = read_metrics(Path(a) / "metrics.csv"), read_metrics(Path(b) / "metrics.csv")
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, 7))
    assert [r["tokens"] for r in ra] == [r["tokens"] for r in rb]
    dl = max(abs(x[k] - y[k]) for x, y in zip(ra, rb) for k in ("train_loss", "val_loss") if x[k] is not None)
    wa, wb = load_run(a)[0].state_dict(), load_run(b)[0].state_dict()
    assert wa.keys() == wb.keys()
    return dl, max((wa[k] - wb[k]).abs().max().item() for k in wa)


# --- the same numbers as one process ------------------------------------------------------------------------

@pytest.mark.parametrize("parallel,extra", [
    ("ddp", []), ("fsdp", []),
    pytest.param("fsdp", ["trainer.activation_checkpointing=true", "trainer.compile_blocks=aot_eager"],
                 marks=pytest.mark.slow)],   # tracing the blocks in two processes is slow on a shared CPU
    ids=["ddp", "fsdp", "fsdp-checkpointed-compiled-blocks"])

def test_two_processes_match_one_with_the_same_global_batch(parallel, extra, reference, cache, tmp_path):
    """DDP through `python -m smollm.train`, FSDP2 through the console script (also with activation checkpointing
    and compiled blocks): losses and final weights within 1e-5 of one process's."""
    entry = ["-m", "smollm.train"] if parallel == "ddp" else [str(BIN / "smollm-train")]
    p = launch(TORCHRUN + entry + overrides(cache, f"trainer.parallel={parallel}", *extra,
                                            f"hydra.run.dir={tmp_path / 'run'}"), tmp_path)

    assert p.returncode == 0, p.stderr[-3000:]
    assert f"on 2 process(es) ({parallel} over gloo, cpu; 2 sequences x 2 micro-batch(es) per process)" in p.stdout
    dl, dw = max_differences(reference, tmp_path / "run")
    print(f"{parallel} {' '.join(extra)}: max |loss difference| {dl:.2g}, max |weight difference| {dw:.2g}")

    assert dl <= TOL and dw <= TOL, (dl, dw)
    assert read_run_json(tmp_path / "run")["world_size"] == 2


def test_torchrun_without_a_choice_picks_ddp_and_rank_0_alone_writes(reference, cache, tmp_path):
    p = launch(TORCHRUN + ["-m", "smollm.train"] + overrides(cache, f"hydra.run.dir={tmp_path / 'run'}"), tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("trainer.parallel is not set and torchrun started 2 process(es): using ddp") == 1
    assert p.stdout.count("smollm-train: done in") == 1                    # one closing line: rank 0's
    run = tmp_path / "run"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["run", "tmp"]    # no folder of rank 1's
    assert sorted(q.name for q in run.iterdir()) == sorted([q.name for q in reference.iterdir()] + [".hydra", "train.log"])

    assert not list((tmp_path / "tmp").glob("smollm-train-rank*"))        # rank 1's Hydra folder is gone

    assert [r["step"] for r in read_metrics(run / "metrics.csv")] == list(range(1, 7))   # each row once
    assert read_run_json(run)["status"] == "done" and read_run_json(run)["parallel"] == "ddp"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_muon_runs_under_both_strategies(parallel, cache, tmp_path):
    """Muon's Newton-Schulz iterations act on whole matrices: under FSDP2 on DTensors, whose matmuls are those of the
    whole matrix. They run in bf16, which turns the ranks' rounding into differences of about 1e-4 in the weights."""
    one = tmp_path / "one"
    train(compose(overrides(cache, "optim=muon")), one)
    p = launch(TORCHRUN + ["-m", "smollm.train"] + overrides(cache, "optim=muon", f"trainer.parallel={parallel}",
                                                            f"hydra.run.dir={tmp_path / 'run'}"), tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    dl, dw = max_differences(one, tmp_path / "run")
    print(f"muon under {parallel}: max |loss difference| {dl:.2g}, max |weight difference| {dw:.2g}")
    assert dl <= 1e-3 and dw <= 1e-2, (dl, dw)


MUON_STEP = '''
import torch, torch.distributed as dist
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
dist.init_process_group("gloo")
mesh, g = init_device_mesh("cpu", (2,)), torch.randn(128, 64, generator=torch.Generator().manual_seed(0))
def step(p, grad):
    opt = torch.optim.Muon([p], lr=0.1, weight_decay=0.0); p.grad = grad; opt.step(); return p.detach()
full = step(torch.nn.Parameter(torch.zeros(128, 64)), g.clone())
sharded = step(torch.nn.Parameter(distribute_tensor(torch.zeros(128, 64), mesh, [Shard(0)])),
               distribute_tensor(g.clone(), mesh, [Shard(0)])).full_tensor()
halves = torch.cat([step(torch.nn.Parameter(torch.zeros_like(h)), h.clone()) for h in g.chunk(2)])
if dist.get_rank() == 0: print("DIFF", (sharded - full).abs().max().item(), (halves - full).abs().max().item())
dist.destroy_process_group()
'''


def test_muon_on_fsdp_shards_steps_the_whole_matrix(tmp_path):
    "One Muon step on a DTensor sharded over 2 ranks is the step of the whole matrix, not of each shard."
    (tmp_path / "muon_step.py").write_text(MUON_STEP)
    p = launch(TORCHRUN + [str(tmp_path / "muon_step.py")], tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    sharded, per_shard = map(float, p.stdout.split("DIFF")[1].split())
    assert sharded < per_shard / 4, (sharded, per_shard)   # bf16 iterations: not exact, far from per-shard


def test_fsdp_outside_torchrun_runs_as_world_size_one_and_says_so(
reference, cache, tmp_path, capsys):
    try:
        train(compose(overrides(cache, "trainer.parallel=fsdp")), tmp_path / "run")
    finally:
        close()
    assert "trainer.parallel=fsdp outside torchrun: running as world size 1" in capsys.readouterr().out
    dl, dw = max_differences(reference, tmp_path / "run")
    assert dl <= 1e-6 and dw <= 1e-6, (dl, dw)


def test_checkpointed_and_compiled_blocks_keep_the_losses(reference, cache, tmp_path):
    "trainer.activation_checkpointing and trainer.compile_blocks (aot_eager: traced, no code generated), on FSDP2 shards."
    try:
        train(compose(overrides(cache, "trainer.parallel=fsdp", "trainer.activation_checkpointing=true",
                                "trainer.compile_blocks=aot_eager")), tmp_path / "run")
    finally:
        close()
    dl, dw = max_differences(reference, tmp_path / "run")
    assert dl <= TOL and dw <= TOL, (dl, dw)


# --- faults -------------------------------------------------------------------------------------------------

def children(pid: int) -> list[int]:
    "The pids of the processes that `pid` started, and theirs (Linux /proc)."
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for c in (task / "children").read_text().split():
            out += [int(c)] + children(int(c))
    return out


def rank_of(pid: int) -> int | None:
    try:
        env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
    except OSError:
        return None
    return int(env["RANK"]) if "RANK" in env and "LOCAL_RANK" in env else None


def wait_for(cond, seconds: float, what: str):
    end = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > end: pytest.fail(f"waited {seconds} s for {what}")
        time.sleep(0.2)


LONG = ["trainer.max_steps=100000", "trainer.ckpt_every=2", "trainer.eval_every=100000"]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the ranks through Linux's /proc")
def test_a_killed_rank_fails_the_launch_and_the_last_checkpoint_resumes(cache, tmp_path):
    "SIGKILL to rank 1 mid-run: torchrun stops rank 0 and exits non-zero within seconds; the last checkpoint resumes."
    run = tmp_path / "run"
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp")}
    agent = subprocess.Popen(TORCHRUN + ["-m", "smollm.train"] + overrides(cache, *LONG, f"hydra.run.dir={run}"),
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        wait_for(lambda: latest_checkpoint(run / "checkpoints") is not None, 120, "a first checkpoint")
        rank1 = [c for c in children(agent.pid) if rank_of(c) == 1]
        assert rank1, "rank 1 not found"
        t0 = time.monotonic()
        os.kill(rank1[0], signal.SIGKILL)
        out, _ = agent.communicate(timeout=90)
        seconds = time.monotonic() - t0
    finally:
        if agent.poll() is None: os.killpg(agent.pid, signal.SIGKILL); agent.wait()
    print(f"torchrun exited {agent.returncode} {seconds:.1f} s after rank 1 was killed")
    assert agent.returncode != 0 and seconds < 60, out[-2000:]
    ckpt = latest_checkpoint(run / "checkpoints")
    step = int(ckpt.name.split("_")[1])
    out = train(compose(overrides(cache, "trainer.resume=true", f"trainer.max_steps={step + 2}")), run)
    assert out["status"] == "done" and out["step"] == step + 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_killed_rank_fails_the_others_without_torchrun(cache, tmp_path):
    """Ranks started by hand (as a cluster's own launcher would): after rank 1 dies, rank 0's next collective fails,
    by gloo's broken connection or at trainer.dist_timeout, and it exits non-zero."""
    port, run, procs = free_port(), tmp_path / "run", []
    (tmp_path / "tmp").mkdir()
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp"), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "smollm.train"] + overrides(
            cache, *LONG, "trainer.dist_timeout=20", f"hydra.run.dir={run}"), cwd=tmp_path, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        wait_for(lambda: (run / "metrics.csv").is_file() and len(read_metrics(run / "metrics.csv")) >= 2, 120,
                 "two metrics rows")
        t0 = time.monotonic()
        procs[1].kill()
        _, err = procs[0].communicate(timeout=90)
        seconds = time.monotonic() - t0
    finally:
        for q in procs:
            if q.poll() is None: q.kill()
            q.wait()
    print(f"rank 0 exited {procs[0].returncode} {seconds:.1f} s after rank 1 was killed")
    assert procs[0].returncode != 0 and seconds < 60, err[-2000:]
    assert read_run_json(run)["status"] == "failed"


# --- bad input ----------------------------------------------------------------------------------------------

def test_a_global_batch_that_does_not_divide_is_refused_naming_the_key(cache, tmp_path):
    p = launch(TORCHRUN + ["-m", "smollm.train"] + overrides(cache, "trainer.global_batch_size=6",
                                                            f"hydra.run.dir={tmp_path / 'run'}"), tmp_path)
    assert p.returncode != 0
    assert ("ConfigError: trainer.global_batch_size=6 is not valid with trainer.grad_accum=2 on 2 process(es): a "
            "positive multiple of 4") in p.stderr
    assert p.stderr.count("ConfigError: trainer.global_batch_size=6") == 2    # one line from each rank
    assert not [l for l in p.stderr.splitlines() if l.strip().startswith("File") and "smollm" in l]   # no trace of ours

    assert not (tmp_path / "run" / "metrics.csv").exists()                 # refused before training



@pytest.mark.parametrize("extra,message", [
    (["trainer.parallel=none"], "trainer.parallel='none' is not valid with the 2 processes torchrun started"),
    (["trainer.parallel=zero3"], "trainer.parallel='zero3' is not valid: null (choose), 'none', 'ddp' or 'fsdp'"),
    (["trainer.global_batch_size=8", "trainer.grad_accum=3"], "trainer.global_batch_size=8 is not valid with "
                                                              "trainer.grad_accum=3 on 2 process(es)"),
    (["trainer.activation_checkpointing=maybe"], "trainer.activation_checkpointing='maybe' is not valid"),
    (["trainer.dist_timeout=0"], "trainer.dist_timeout=0 is not valid: a positive number of seconds"),
])
def test_refusals_under_torchrun_name_the_key(extra, message, cache, tmp_path, monkeypatch):
    "set_up as rank 0 of 2 (torchrun's variables set) refuses before it joins a process group."
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")): monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        set_up(compose(overrides(cache, *extra)), tmp_path / "run")
    assert not torch.distributed.is_initialized()
