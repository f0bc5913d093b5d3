"""benchmarks/train_step.py --quick (a tiny shape, every mode, every installed library) keeps working: it builds the
same model in smollm, transformers and litgpt, checks their step-0 losses agree, and prints one table per mode. This
checks the tables' rows and that their figures are positive; it times nothing."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tables(stdout: str) -> dict[str, list[dict]]:
    "mode -> the rows of its table, each a dict column -> cell."
    out, mode, cols = {}, None, None
    for line in stdout.splitlines():
        if line.startswith("### "):
            mode, cols = line.split(",")[1].split(":")[0].strip(), None
        elif line.startswith("| ") and mode:
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cols is None:
                cols = cells
            else:
                out.setdefault(mode, []).append(dict(zip(cols, cells)))
    return out


def test_train_step_quick_mode_runs():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--quick"], capture_output=True,
                         text=True, timeout=600, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    has_litgpt = importlib.util.find_spec("litgpt") is not None
    impls = {"smollm", "transformers"} | ({"litgpt"} if has_litgpt else set())
    if not has_litgpt:
        assert "litgpt is not installed" in out.stdout and "bench" in out.stdout, out.stdout
    found = tables(out.stdout)
    assert set(found) == {"eager", "compile", "bf16"}, out.stdout
    assert out.stdout.count("step-0 loss: smollm") == 3, out.stdout
    for mode, rows in found.items():
        assert {r["impl"] for r in rows} == impls, (mode, out.stdout)
        for r in rows:
            for col in ("median s/step", "tokens/s", "efficiency"):
                assert float(r[col]) > 0, (mode, col, r)
            assert float(r["peak MiB"]) >= 0, (mode, r)
            assert float(r["vs transformers"].rstrip("x")) > 0, (mode, r)
            if has_litgpt:
                assert float(r["vs litgpt"].rstrip("x")) > 0, (mode, r)
            if mode == "compile":
                assert int(r["graphs"]) >= 1, r
        ref = next(r for r in rows if r["impl"] == "transformers")
        assert ref["vs transformers"] == "1.00x", ref


def test_train_step_without_litgpt_leaves_it_out(tmp_path):
    # a litgpt package that fails to import stands in for a missing one: the run goes on without it and says why
    (tmp_path / "litgpt").mkdir()
    (tmp_path / "litgpt" / "__init__.py").write_text("raise ImportError('no litgpt here')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--quick", "--mode", "eager"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "litgpt is not installed" in out.stdout and "`bench` extra" in out.stdout, out.stdout
    rows = tables(out.stdout)["eager"]
    assert {r["impl"] for r in rows} == {"smollm", "transformers"} and "vs litgpt" not in rows[0], out.stdout


def test_matmul_limit_counts_every_linear_weight_three_times():
    # the limit's products, counted from the architecture's widths, against the weights of the model smollm builds:
    # each matrix takes 3 products of 2 * tokens * its size (forward, dX, dW); attention 6 of B*H*T*T*hd, half of them
    import importlib.util as iu

    import torch
    from smollm.config import build_model, compose
    spec = iu.spec_from_file_location("train_step", ROOT / "benchmarks" / "train_step.py")
    bench = sys.modules["train_step"] = iu.module_from_spec(spec)   # dataclasses look their module up there
    spec.loader.exec_module(bench)
    cfg = compose(bench.QUICK["overrides"])
    model = build_model(cfg.model)
    m = cfg.model
    s = bench.Shape(m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.dim // m.n_heads, m.mlp_hidden, m.vocab_size, 3, 16)
    weights = sum(p.numel() for name, p in model.named_parameters() if p.ndim == 2 and "embed" not in name)
    attention = 6 * 2 * s.batch * s.n_heads * s.seq ** 2 * s.head_dim * s.n_layers / 2
    limit = bench.MatmulLimit(s, torch.float32)
    assert limit.flops == 6 * s.batch * s.seq * weights + attention
    assert limit.time() > 0
