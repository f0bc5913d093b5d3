"""smollm-report: Welch's t-test against textbook values, and a real 2-configuration x 2-seed sweep."""
import math
import subprocess
import sys
from pathlib import Path

import pytest

from smollm.report import find_runs, main, report, summarize, t_two_sided_p, welch

BIN = Path(sys.executable).parent


def test_t_distribution_against_tables_and_closed_forms():
    # printed two-sided critical values: p = 0.05 at 12.706 (1 d.f.), 4.303 (2), 2.571 (5), 2.228 (10); p = 0.01 at 2.845 (20)
    for t, df, p in ((12.706, 1, 0.05), (4.303, 2, 0.05), (2.571, 5, 0.05), (2.228, 10, 0.05), (2.845, 20, 0.01)):
        assert t_two_sided_p(t, df) == pytest.approx(p, abs=2e-4)
    for t in (0.3, 1.7, 8.0):
        assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-10)   # Cauchy
        assert t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)
        assert t_two_sided_p(t, 1e8) == pytest.approx(math.erfc(t / math.sqrt(2)), rel=1e-5)      # normal limit
    # fractional degrees of freedom, as Welch's test produces: between the neighbouring integers
    assert t_two_sided_p(2.0, 3) > t_two_sided_p(2.0, 3.5) > t_two_sided_p(2.0, 4)


def test_welch_textbook_example():
    # Wikipedia, "Welch's t-test", example 1: t = -2.46, nu = 25.0, p = 0.021 (rounded there)
    a1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
    a2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
    t, df, p = welch(a1, a2)
    assert (round(t, 2), round(df, 1), round(p, 3)) == (-2.46, 25.0, 0.021)
    t2, df2, p2 = welch(a2, a1)
    assert (t2, df2, p2) == pytest.approx((-t, df, p))


SWEEP = ["model=tiny", "model.block_size=32", "data=mqar", "data.vocab_size=64", "data.num_kv_pairs=4",
         "trainer.batch_size=8", "trainer.progress=false", "schedule.warmup_steps=2", "trainer.max_steps=6", "trainer.log_every=2",
         "trainer.eval_every=3", "trainer.eval_batches=2", "trainer.ckpt_every=100"]


def test_multirun_sweep_and_report(tmp_path):
    sweep = tmp_path / "sweep"
    p = subprocess.run([str(BIN / "smollm-train"), "-m", *SWEEP, "model/attention=mha,mqa", "seed=0,1",
                        f"hydra.sweep.dir={sweep}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = find_runs(sweep)
    assert [r.path.name for r in runs] == ["0", "1", "2", "3"] and all(r.status == "done" for r in runs)
    rows, metric, base = summarize(runs)
    assert metric == "val_acc" and base == "model/attention=mha"
    assert [(r["label"], r["n"]) for r in rows] == [("model/attention=mha", 2), ("model/attention=mqa", 2)]
    for row, rs in zip(rows, (runs[:2], runs[2:])):
        vals = [r.info["val_acc"] for r in rs]
        assert row["mean"] == pytest.approx(sum(vals) / 2)
        assert row["std"] == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))
    assert rows[1]["params"] < rows[0]["params"]          # one key/value head instead of four
    md, fig = report(sweep)
    assert fig.is_file() and (sweep / "report.md").read_text() == md
    table = [l for l in md.splitlines() if l.startswith("| model/attention=")]
    assert len(table) == 2 and "(baseline)" in table[0]
    p_cell = table[1].rstrip(" |").split("|")[-1].strip()
    assert p_cell == "n/a" or 0 <= float(p_cell) <= 1      # n/a only if both configs had zero spread
    if rows[1]["p"] is not None:
        assert p_cell != "n/a"


def test_unfinished_and_failed_runs_are_listed(tmp_path, capsys):
    import json
    for i, (status, extra) in enumerate([("done", {"val_loss": 2.0}), ("done", {"val_loss": 2.2}),
                                          ("failed", {"error": "TrainingError: non-finite loss at step 3"}),
                                          ("running", {"step": 0})]):   # run.json's step: the last checkpoint
        d = tmp_path / str(i)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(f"- model/norm={'dyt' if i % 2 else 'rmsnorm'}\n- seed={i}\n")
        (d / "metrics.csv").write_text("step,tokens,train_loss,val_loss\n1,10,3.0,\n2,20,2.5,2.4\n")
        (d / "run.json").write_text(json.dumps({"status": status, "metric": "loss", "max_steps": 4, **extra}))
    main([str(tmp_path), "--baseline", "model/norm=dyt"])
    out = capsys.readouterr().out
    assert "`2` (model/norm=rmsnorm, seed 2): failed after step 2 of 4; TrainingError: non-finite loss at step 3" in out
    assert "`3` (model/norm=dyt, seed 3): in progress or killed after step 2 of 4" in out
    assert "| model/norm=dyt (baseline) | 1 of 2 | 2.2000 |" in out
    with pytest.raises(ValueError, match="matches no configuration"):
        report(tmp_path, baseline="model/norm=layernorm")


def test_a_diverging_job_fails_but_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    p = subprocess.run([str(BIN / "smollm-train"), "-m", *SWEEP, "optim.lr=3e-3,1e30", "trainer.grad_clip=0",
                        "schedule=constant", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "job 1 failed, the sweep goes on: non-finite" in p.stderr
    md, _ = report(sweep)
    assert "| optim.lr=0.003 (baseline) | 1 |" in md                  # Hydra writes the swept values normalised
    assert "| optim.lr=1e+30 | 0 of 1 | n/a |" in md
    assert "`1` (optim.lr=1e+30): failed after step 1 of 6; TrainingError: non-finite loss at step 2" in md
