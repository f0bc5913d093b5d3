"""Hydra's launcher plugins (conf/hydra/launcher/, the `launchers` extra): the slurm launcher's keys reach sbatch, and
a 2-job sweep runs side by side through the local launcher and reports like any sweep."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

# The `launchers` extra, which the dev install includes: without it these tests fail here, by name, rather than skip.
import hydra_plugins.hydra_joblib_launcher  # noqa: F401
import hydra_plugins.hydra_submitit_launcher  # noqa: F401

from smollm.report import find_runs, report, summarize

BIN = Path(sys.executable).parent
SLURM = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.nodes=2",
         "hydra.launcher.gpus_per_node=8", "hydra.launcher.timeout_min=90"]


def _cfg_hydra(*overrides, cwd):
    p = subprocess.run([str(BIN / "smollm-train"), *overrides, "--cfg", "hydra", "--resolve"], cwd=cwd,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    import yaml
    return yaml.safe_load(p.stdout)["hydra"]


def _launcher(*overrides):
    "hydra.launcher as Hydra's compose API builds it (the same tree `smollm-train ... --cfg hydra` prints)."
    from hydra import compose, initialize_config_dir
    from smollm.config import conf_dir
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True).hydra.launcher


def test_slurm_launcher_composes_with_its_keys(tmp_path):
    launcher = _cfg_hydra(*SLURM, cwd=tmp_path)["launcher"]
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["partition"], launcher["nodes"], launcher["gpus_per_node"], launcher["timeout_min"]) == ("gpu", 2, 8, 90)
    assert launcher["tasks_per_node"] == 8                 # one process per GPU unless set
    assert _launcher("hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4").tasks_per_node == 4
    assert _launcher("hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4",
                     "hydra.launcher.tasks_per_node=1").tasks_per_node == 1
    local = _launcher("hydra/launcher=local")
    assert local._target_.endswith("joblib_launcher.JoblibLauncher") and local.n_jobs == 2
    assert _launcher("hydra/launcher=local", "hydra.launcher.n_jobs=3").n_jobs == 3


def _fake(path: Path, body: str):
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_launcher_writes_the_sbatch_script(tmp_path):
    # No cluster here: a stand-in `sbatch` keeps the script submitit hands it and refuses the job, so the launch fails
    # after the script is written; a stand-in `srun` is what submitit looks for to believe it is on a SLURM host.
    fake = tmp_path / "bin"; fake.mkdir()
    _fake(fake / "srun", "exit 0\n")
    _fake(fake / "sbatch", f'cp "$1" {tmp_path}/job.sh; echo "sbatch: error: no cluster in a test" >&2; exit 1\n')
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    p = subprocess.run([str(BIN / "smollm-train"), "-m", *SLURM, "model=tiny", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "no cluster in a test" in p.stdout + p.stderr
    script = (tmp_path / "job.sh").read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --ntasks-per-node=8", "#SBATCH --time=90", "#SBATCH --cpus-per-task=8"):
        assert line in script.splitlines(), f"{line!r} not in:\n{script}"
    assert any(l.startswith("srun ") and "submitit.core._submit" in l for l in script.splitlines()), script


SWEEP = ["model=tiny", "model.dim=32", "model.block_size=32", "data=mqar", "data.vocab_size=64", "data.num_kv_pairs=4",
         "trainer.batch_size=8", "trainer.progress=false", "schedule.warmup_steps=2", "trainer.max_steps=6",
         "trainer.log_every=2", "trainer.eval_every=3", "trainer.eval_batches=2", "trainer.ckpt_every=100"]


def test_local_launcher_runs_a_sweep_side_by_side_and_it_reports(tmp_path):
    sweep = tmp_path / "sweep"
    p = subprocess.run([str(BIN / "smollm-train"), "-m", "hydra/launcher=local", *SWEEP, "seed=0,1",
                        f"hydra.sweep.dir={sweep}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2," in p.stdout + p.stderr          # the jobs went through joblib, two at a time
    runs = find_runs(sweep)
    assert [r.path.name for r in runs] == ["0", "1"] and all(r.status == "done" for r in runs)
    rows, metric, _ = summarize(runs)
    assert metric == "val_acc" and [r["n"] for r in rows] == [2]
    md, fig = report(sweep)
    assert fig.is_file() and "| (one configuration) (baseline) | 2 |" in md


def test_local_launcher_jobs_share_the_cores():
    # What conf/hydra/launcher/local.yaml relies on: joblib's process pool gives each of n_jobs workers
    # cores // n_jobs torch threads, so parallel jobs do not oversubscribe the CPU.
    import joblib
    n_jobs = _launcher("hydra/launcher=local").n_jobs
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    code = ("import joblib\ndef threads(_):\n    import torch\n    return torch.get_num_threads()\n"
            f"print(joblib.Parallel(n_jobs={n_jobs})(joblib.delayed(threads)(i) for i in range({n_jobs})))")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == str([max(1, joblib.cpu_count() // n_jobs)] * n_jobs)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_slurm_job_of_two_tasks_trains_as_one_world(tmp_path):
    # What srun does in the job that slurm.yaml writes, without a cluster: two tasks of one job, each the same
    # smollm-train with SLURM's variables and no torchrun's; smollm.distributed makes them ranks 0 and 1 of one world.
    slurm = dict(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_NODEID="0",
                 SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(_free_port()),
                 OMP_NUM_THREADS="1")
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    run = tmp_path / "run"
    tasks = [subprocess.Popen([str(BIN / "smollm-train"), *SWEEP, "trainer.parallel=ddp", f"hydra.run.dir={run}"],
                              cwd=tmp_path, env={**base, **slurm, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [t.communicate(timeout=120)[0] for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    import json
    info = json.loads((run / "run.json").read_text())
    assert (info["status"], info["parallel"], info["world_size"]) == ("done", "ddp", 2)
    assert "on 2 process(es) (ddp over gloo" in outs[0] and "smollm-train: tiny" not in outs[1]   # rank 0 speaks


def test_a_missing_launcher_plugin_names_the_extra(monkeypatch, capsys):
    # smollm-train with hydra/launcher=local but no hydra-joblib-launcher: one line naming the extra, no traceback
    import importlib.util
    import smollm.train as st
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == st.LAUNCHER_PLUGINS["local"] else real(name, *a))
    monkeypatch.setattr(sys, "argv", ["smollm-train", "-m", "hydra/launcher=local", "seed=0,1"])
    with pytest.raises(SystemExit) as e:
        st.main()
    assert "hydra/launcher=local" in str(e.value) and "pip install 'smollm[launchers]'" in str(e.value)
