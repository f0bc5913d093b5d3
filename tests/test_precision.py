"""trainer.precision: the start-up check of bf16 on the CPU, what 'auto' picks and records, a bf16 CPU training run
against fp32's on a tiny model, and the fused AdamW against the foreach one."""
import json

import pytest
import torch

import smollm.train as tr
from smollm.config import ConfigError, build_model, compose
from smollm.train import accumulate, adamw, choose_precision, evaluate, set_up, train

TINY = ["model=tiny", "model.block_size=32", "data=mqar", "data.vocab_size=64", "data.num_kv_pairs=4",
        "trainer.batch_size=8", "trainer.progress=false", "schedule.warmup_steps=2", "trainer.log_every=1",
        "trainer.eval_every=4", "trainer.eval_batches=2", "trainer.max_steps=4", "trainer.samples=0"]
CPU = torch.device("cpu")


def test_cpu_capability_reads_the_hardware():
    "The check agrees with the CPU's own flags (Linux): AVX512_BF16 or AMX-BF16 on x86."
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    if "avx512f" not in flags and "avx2" not in flags:
        pytest.skip("not an x86 CPU")
    assert tr.cpu_bf16_native() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_bf16_is_refused_at_set_up_on_a_cpu_without_it(monkeypatch, tmp_path):
    monkeypatch.setattr(tr, "cpu_bf16_native", lambda: False)
    built = []
    monkeypatch.setattr(tr, "initial_model", lambda cfg: built.append(cfg))   # nothing is built before the check
    with pytest.raises(ConfigError) as e:
        set_up(compose(TINY + ["trainer.precision=bf16"]), tmp_path)
    msg = str(e.value)
    assert "trainer.precision='bf16'" in msg and "cpu" in msg and "AVX512_BF16" in msg
    assert "trainer.precision=fp32" in msg and "auto" in msg
    assert built == []


def test_unknown_precision_is_refused():
    with pytest.raises(ConfigError, match="'fp32', 'bf16' or 'auto'"):
        choose_precision("fp16", CPU)
    with pytest.raises(ConfigError, match="resolve 'auto'"):
        tr.autocast(CPU, "auto")


@pytest.mark.parametrize("native", [True, False])
def test_auto_picks_and_records(monkeypatch, tmp_path, capsys, native):
    monkeypatch.setattr(tr, "cpu_bf16_native", lambda: native)
    want = "bf16" if native else "fp32"
    assert choose_precision("auto", CPU) == want
    train(compose(TINY + ["trainer.precision=auto", "trainer.max_steps=1"]), tmp_path)
    assert json.loads((tmp_path / "run.json").read_text())["precision"] == want
    opening = capsys.readouterr().out.splitlines()[0]
    assert ("in bf16 autocast (trainer.precision=auto)" if native else "in fp32 (trainer.precision=auto)") in opening
    assert "precision: auto" in (tmp_path / "config.yaml").read_text()      # what was asked, to pick again elsewhere


def _losses(precision, steps=30):
    "A tiny model trained `steps` AdamW steps on MQAR batches from one seed: (training losses, validation loss)."
    from smollm.data import build_data
    torch.manual_seed(0)
    cfg = compose(TINY)
    m, data = build_model(cfg.model), build_data(cfg.data)
    data.prepare()
    opt, out = adamw(m, lr=3e-3), []
    for step in range(steps):
        loss, _, _ = accumulate(m.loss, [data.batch("train", step, 8, 32, 0)], CPU, precision)
        assert loss.dtype == torch.float32
        opt.step(); opt.zero_grad()
        out.append(loss.item())
    return out, evaluate(m, data.val_batches(2, 8, 32), CPU, precision)["val_loss"]


def test_bf16_cpu_trains_near_fp32():
    "bf16 autocast on the CPU (emulated where the CPU lacks it: the numbers are the same) lowers the loss as fp32 does."
    fp32, v32 = _losses("fp32")
    bf16, v16 = _losses("bf16")
    assert bf16 != fp32                                # autocast did change the arithmetic
    assert sum(bf16[-5:]) / 5 < 0.9 * sum(bf16[:5]) / 5
    assert abs(bf16[0] - fp32[0]) < 0.01 * fp32[0]     # the same weights: one bf16 forward is close
    assert abs(v16 - v32) < 0.03 * v32


def test_evaluation_is_under_the_same_autocast(monkeypatch):
    "evaluate runs the model under bf16 autocast when asked, and returns the loss as a Python float."
    m = build_model(compose(TINY).model)
    seen, real = [], m.loss
    monkeypatch.setattr(m, "loss", lambda *a, **k: (seen.append(torch.is_autocast_enabled("cpu")), real(*a, **k))[1])
    batch = [tuple(torch.randint(0, 64, (2, 4, 16)))]
    assert isinstance(evaluate(m, batch, CPU, "bf16")["val_loss"], float)
    evaluate(m, batch, CPU, "fp32")
    assert seen == [True, False]


def test_fused_adamw_matches_foreach():
    "The fused AdamW (adamw's choice on the CPU and CUDA) steps as torch's foreach AdamW does, within fp32 rounding."
    a, b = build_model(compose(TINY).model), build_model(compose(TINY).model)
    b.load_state_dict(a.state_dict())
    start = {n: p.detach().clone() for n, p in a.named_parameters()}
    oa, ob = adamw(a), adamw(b, fused=False)
    for g in ob.param_groups: g["foreach"] = True              # on the CPU torch's own default is the per-tensor loop
    assert oa.defaults["fused"] and not ob.defaults["fused"]
    x, y = torch.randint(0, 64, (2, 4, 32))
    for _ in range(5):
        for m, o in ((a, oa), (b, ob)):
            m.loss(x, y).backward(); o.step(); o.zero_grad()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert not torch.equal(p, start[n]), n                 # every tensor moved: the comparison means something
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda msg: f"{n}: {msg}")
