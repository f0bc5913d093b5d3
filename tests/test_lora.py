"""LoRA through peft on smollm's modules (smollm.lora) and a LoRA run's checkpoints (smollm.runs), against
references written here: the base model's logits, W + (alpha / r) B A and x W^T + (alpha / r) x A^T B^T by hand,
the base's bytes, and the tensors a checkpoint holds as DCP's metadata lists them."""
import copy

import pytest
import torch
from omegaconf import OmegaConf

from smollm.config import ConfigError, build_model, compose
from smollm.lora import adapter_state, for_training, is_lora, load_adapter_state, merge
from smollm.runs import latest_checkpoint, load_checkpoint, load_model, load_run, save_checkpoint, save_config
from smollm.train import adamw

pytest.importorskip("peft")   # the lora extra; the dev install has it

V = 64
CFG = compose(["model=tiny", "data=mqar", f"data.vocab_size={V}"])
LORA = {"rank": 4, "alpha": 8, "targets": None, "dropout": 0.0}


def tiny(*overrides, seed: int = 0):
    "The tiny model (with `overrides` of its config), its weights drawn from `seed`."
    cfg = compose(["model=tiny", "data=mqar", f"data.vocab_size={V}", *overrides]) if overrides else CFG
    torch.manual_seed(seed)
    return build_model(cfg.model)


def batch(seed: int = 0, B: int = 4, T: int = 17):
    x = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
    return x[:, :-1], x[:, 1:]


def train(model, steps: int, lr: float = 1e-2) -> list[float]:
    "`steps` AdamW steps (smollm.train.adamw) on one batch; the losses before each step."
    opt, (x, y), losses = adamw(model, lr=lr, weight_decay=0.0), batch(), []
    for _ in range(steps):
        loss = model.loss(x, y)
        loss.backward(); opt.step(); opt.zero_grad()
        losses.append(loss.item())
    return losses


def nonzero_adapter(model, seed: int = 1):
    "`model` with its adapter drawn at random (B no longer zero), as after training."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad: p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("overrides", [(), ("model/attention=mla",), ("model/attention=gated",), ("model/mlp=gelu",),
                                       ("model.tie_embeddings=true",)])
def test_at_init_the_adapted_model_is_the_base(overrides):
    base = tiny(*overrides)
    m = for_training(copy.deepcopy(base), LORA)
    x, _ = batch()
    with torch.no_grad():
        assert torch.equal(m(x), base(x))                      # B = 0: W x + 0
    linears = [n for n, mod in base.named_modules() if isinstance(mod, torch.nn.Linear) and n != "lm_head"]
    wrapped = [n for n, mod in m.named_modules() if hasattr(mod, "lora_A")]
    assert wrapped == linears                                  # the default: every linear layer of the blocks
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert m.param_counts()["lora"] == sum(p.numel() for n, p in m.named_parameters() if n in trainable)


def test_training_moves_the_adapter_alone_and_the_loss_falls():
    base = tiny()
    m = for_training(copy.deepcopy(base), {"rank": 4, "alpha": 16, "targets": ["q_proj", "v_proj", "down_proj"]})
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    losses = train(m, 30)
    assert losses[-1] < losses[0] - 0.5, losses
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in m.named_parameters() if p.requires_grad}      # every adapter tensor moved...
    for n, p in base.named_parameters():                                         # ... and no base weight, bit for bit
        name = n if n in before else n.replace(".weight", ".base_layer.weight")
        assert torch.equal(dict(m.named_parameters())[name], p), n


def test_the_smollm_api_works_on_the_adapted_model():
    from smollm.generate import generate
    m = nonzero_adapter(for_training(tiny(), LORA)).eval()
    m.kernels = "torch"
    x, y = batch()
    with torch.no_grad():
        logits = m(x)
        ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        torch.testing.assert_close(m.loss(x, y), ref, atol=1e-5, rtol=1e-5)      # loss: the adapter is in it
        cache = m.new_cache()                                                     # decoding: prefill, then one token
        step = torch.cat([m(x[:, :-1], cache=cache)[:, -1:], m(x[:, -1:], cache=cache)], 1)
        torch.testing.assert_close(step, logits[:, -2:], atol=1e-5, rtol=1e-5)
        ids = x[:1, :5]                                                           # greedy by hand, no cache
        for _ in range(4): ids = torch.cat([ids, m(ids)[:, -1:].argmax(-1)], 1)
    assert torch.equal(generate(m, x[:1, :5], max_new_tokens=4), ids)


def test_one_adapted_layer_is_the_lora_formula():
    "peft's layer computes x W^T + (alpha / r) (x A^T) B^T, written out here."
    m = nonzero_adapter(for_training(tiny(), {"rank": 3, "alpha": 12, "targets": ["layers.1.mlp.up_proj"]}))
    layer = m.layers[1].mlp.up_proj
    W, A, B = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    h = torch.randn(2, 5, 64)
    torch.testing.assert_close(layer(h), h @ W.T + (12 / 3) * (h @ A.T) @ B.T, atol=1e-6, rtol=1e-6)


def test_merge_folds_the_adapter_in():
    base = tiny()
    m = nonzero_adapter(for_training(copy.deepcopy(base), {"rank": 4, "alpha": 8}))
    x, _ = batch()
    with torch.no_grad():
        want = m(x)
    A = m.layers[0].attn.k_proj.lora_A["default"].weight.detach().clone()
    B = m.layers[0].attn.k_proj.lora_B["default"].weight.detach().clone()
    merged = merge(m)
    assert not is_lora(merged) and type(merged) is type(base)
    assert list(merged.state_dict()) == list(base.state_dict())                  # the base's keys: to_hf, GGUF read them
    with torch.no_grad():
        err = (merged(x) - want).abs().max().item()
    assert err < 1e-5, err
    by_hand = base.layers[0].attn.k_proj.weight + (8 / 4) * B @ A
    torch.testing.assert_close(merged.layers[0].attn.k_proj.weight, by_hand, atol=1e-6, rtol=1e-6)
    for n, p in base.named_parameters():                                         # what had no adapter is untouched
        if "_proj" not in n: assert torch.equal(p, merged.get_parameter(n)), n


def test_a_merged_model_exports_to_hf(tmp_path):
    from smollm.hf import to_hf
    m = nonzero_adapter(for_training(tiny(), LORA))
    x, _ = batch()
    with torch.no_grad():
        want = m(x)
    merged = merge(m)
    with torch.no_grad():
        torch.testing.assert_close(load_model(to_hf(merged, tmp_path / "hf"))(x), want, atol=1e-5, rtol=1e-5)


def test_the_adapter_state_round_trips():
    base = tiny()
    m = nonzero_adapter(for_training(copy.deepcopy(base), LORA))
    fresh = load_adapter_state(for_training(copy.deepcopy(base), LORA), adapter_state(m))
    x, _ = batch()
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))


def test_a_target_that_matches_nothing_names_what_would_be_accepted():
    with pytest.raises(ConfigError) as e:
        for_training(tiny(), {"rank": 4, "targets": ["q_proj", "wq"]})
    msg = str(e.value)
    assert "sft.lora.targets: 'wq' names no module of this model" in msg
    assert "['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']" in msg


@pytest.mark.parametrize("overrides, target, module, why", [
    ((), "attn_norm", "layers.0.attn_norm (RMSNorm)", "its weights (weight) are bare nn.Parameters"),
    (("model/norm=dyt",), "mlp_norm", "layers.0.mlp_norm (DyT)", "its weights (alpha, weight, bias) are bare"),
    (("model/attention=qk_norm",), "q_norm", "layers.0.attn.q_norm (RMSNorm)", "bare nn.Parameters"),
    ((), "lm_head", "lm_head (Linear)", "a fused linear + cross-entropy op that never calls the module"),
    ((), "mlp", "layers.0.mlp (SwiGLU)", "a container of layers, not a layer"),
    ((), "embed", "embed (Embedding)", "smollm.lora adapts linear layers only"),
])
def test_a_module_peft_cannot_wrap_is_named_with_why(overrides, target, module, why):
    m = tiny(*overrides)
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ConfigError) as e:
        for_training(m, {"rank": 4, "targets": ["q_proj", target]})
    msg = str(e.value)
    assert f"names {module}, which peft's LoRA cannot adapt" in msg and why in msg, msg
    assert "accepted: the linear layers' names" in msg
    assert not is_lora(m) and list(m.state_dict()) == list(before)              # refused before anything changed


def test_no_lora_asked_for_leaves_the_model_alone():
    m = tiny()
    for cfg in (None, {"rank": 0}, {"rank": None, "alpha": 16}, OmegaConf.create({"rank": None})):
        assert for_training(m, cfg) is m and not is_lora(m)
    assert all(p.requires_grad for p in m.parameters())


# ---- a LoRA run's checkpoints ----

def _bytes(ckpt) -> int:
    return sum(f.stat().st_size for f in ckpt.iterdir() if f.name != "state.pt")


def _tensors(ckpt) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader
    return {k for k in FileSystemReader(ckpt).read_metadata().state_dict_metadata if k.startswith("model.")}


@pytest.fixture
def lora_run(tmp_path):
    "A base run (tiny, after a step) and a LoRA run on it after 5 steps: (base dir, LoRA run dir, its model)."
    base, (x, y) = tiny(), batch()
    opt = adamw(base)
    base.loss(x, y).backward(); opt.step(); opt.zero_grad()                      # a base with AdamW's moments too
    save_config(CFG, tmp_path / "base")
    save_checkpoint(tmp_path / "base" / "checkpoints", 5, base, opt, {})
    cfg = OmegaConf.merge(OmegaConf.to_container(CFG), {"init_from": str(tmp_path / "base"), "sft": {"lora": LORA}})
    m = for_training(load_model(tmp_path / "base").train(), cfg.sft.lora)
    opt = adamw(m, lr=1e-2)
    for _ in range(5):
        m.loss(x, y).backward(); opt.step(); opt.zero_grad()
    save_config(cfg, tmp_path / "lora")
    save_checkpoint(tmp_path / "lora" / "checkpoints", 5, m, opt, {"tokens": 5})
    return tmp_path / "base", tmp_path / "lora", m.eval()


def test_a_lora_checkpoint_holds_the_adapter_alone(lora_run):
    base_dir, lora_dir, m = lora_run
    full, adapter = latest_checkpoint(base_dir / "checkpoints"), latest_checkpoint(lora_dir / "checkpoints")
    want = {f"model.{n}" for n, p in m.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert _tensors(adapter) == want and len(want) == 2 * 7 * 2                  # A, B x 7 layers x 2 blocks
    assert len(_tensors(full)) == len(list(tiny().state_dict()))
    n_adapter = sum(p.numel() for n, p in m.named_parameters() if f"model.{n}" in want)
    n_base = sum(p.numel() for p in tiny().parameters())
    assert 12 * n_adapter <= _bytes(adapter) and 12 * n_base <= _bytes(full)    # weights + AdamW's 2 moments, fp32
    assert _bytes(adapter) < _bytes(full) / 3      # at this size DCP's ~2 kB per tensor is much of the adapter's file


def test_a_lora_run_loads_as_base_plus_adapter(lora_run):
    base_dir, lora_dir, m = lora_run
    back, cfg = load_run(lora_dir)
    x, _ = batch(seed=3)
    with torch.no_grad():
        assert is_lora(back) and torch.equal(back(x), m(x))
        merged = merge(load_model(lora_dir))
        assert (merged(x) - m(x)).abs().max().item() < 1e-5
    assert cfg.sft.lora.rank == 4


def test_a_lora_run_resumes_into_a_lora_model(lora_run):
    base_dir, lora_dir, m = lora_run
    fresh = for_training(load_model(base_dir).train(), LORA)
    opt = adamw(fresh, lr=1e-2)
    state = load_checkpoint(latest_checkpoint(lora_dir / "checkpoints"), fresh, opt)
    assert state["tokens"] == 5 and state["adapter_only"] is True
    x, _ = batch(seed=3)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), m(x))
    assert opt.state and all(p.requires_grad for p in opt.state)               # AdamW's moments are back


def test_a_missing_or_replaced_base_is_named(lora_run):
    base_dir, lora_dir, m = lora_run
    base_dir.rename(base_dir.with_name("elsewhere"))
    with pytest.raises(FileNotFoundError, match=f"on the base {base_dir} \\(its config init_from\\), which is not there"):
        load_run(lora_dir)
    x, _ = batch(seed=3)
    with torch.no_grad():
        assert torch.equal(load_model(lora_dir, base=base_dir.with_name("elsewhere"))(x), m(x))
    other = tiny(seed=7)
    save_config(CFG, base_dir); save_checkpoint(base_dir / "checkpoints", 5, other, adamw(other), {})
    with pytest.raises(ValueError, match="trained on another base than the model now in"):
        load_run(lora_dir)


def test_lora_without_a_base_is_refused():
    from smollm.lora import check_base
    cfg = OmegaConf.merge(OmegaConf.to_container(CFG), {"init_from": None, "sft": {"lora": LORA}})
    with pytest.raises(ConfigError, match="sft.lora.rank=4 needs init_from"):
        check_base(cfg)


def test_an_fsdp2_sharded_lora_model_saves_its_adapter_alone(tmp_path):
    "FSDP2 (fully_shard, one gloo rank) on a LoRA model: its checkpoint holds the adapter, which loads into a plain one."
    import torch.distributed as dist
    from torch.distributed.checkpoint import FileSystemReader
    from smollm.distributed import shard
    base = tiny()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        m = shard(for_training(copy.deepcopy(base), LORA))
        train(m, 2)
        ck = save_checkpoint(tmp_path, 2, m, adamw(m), {})
        x, _ = batch(seed=3)
        with torch.no_grad():
            want = m(x)
    finally:
        dist.destroy_process_group()
    assert len(_tensors(ck)) == 2 * 7 * 2
    plain = for_training(copy.deepcopy(base), LORA)
    load_checkpoint(ck, plain)
    with torch.no_grad():
        assert torch.equal(plain(x), want)


def test_a_lora_run_on_a_hugging_face_base(tmp_path):
    """init_from may be a Hugging Face folder, here in bf16: load_run rebuilds that base (smollm.hf.from_hf) in float32,
    as the trainer trains on it, with the adapter."""
    from smollm.hf import to_hf
    hf = to_hf(tiny().to(torch.bfloat16), tmp_path / "hf")
    assert next(load_model(hf).parameters()).dtype == torch.bfloat16
    cfg = OmegaConf.merge(OmegaConf.to_container(CFG), {"init_from": str(hf), "sft": {"lora": LORA}})
    m = nonzero_adapter(for_training(load_model(hf).float(), cfg.sft.lora))      # smollm.train.initial_model's way
    save_config(cfg, tmp_path / "lora"); save_checkpoint(tmp_path / "lora" / "checkpoints", 1, m, adamw(m), {})
    x, _ = batch(seed=3)
    with torch.no_grad():
        back = load_run(tmp_path / "lora")[0]
        assert torch.equal(back(x), m(x)) and {p.dtype for p in back.parameters()} == {torch.float32}


def test_a_lora_run_on_a_lora_run(lora_run, tmp_path):
    "A LoRA run whose init_from is a LoRA run: its base is that run's model with the adapter folded in (merge)."
    _, lora_dir, first = lora_run
    cfg = OmegaConf.merge(OmegaConf.to_container(CFG), {"init_from": str(lora_dir),
                                                        "sft": {"lora": {"rank": 2, "targets": ["o_proj"]}}})
    m = nonzero_adapter(for_training(merge(load_model(lora_dir)).float(), cfg.sft.lora), seed=5)
    save_config(cfg, tmp_path / "second"); save_checkpoint(tmp_path / "second" / "checkpoints", 1, m, adamw(m), {})
    back = load_model(tmp_path / "second")
    adapted = [n for n, mod in back.named_modules() if hasattr(mod, "lora_A")]
    assert adapted == ["layers.0.attn.o_proj", "layers.1.attn.o_proj"]                # the second adapter only
    x, _ = batch(seed=3)
    with torch.no_grad():
        assert torch.equal(back(x), m(x)) and (back(x) - first(x)).abs().max() > 1e-3


# ---- end to end: smollm-train with init_from and sft.lora (smollm.train's set_up calls for_training) ----

TRAIN = ["model=tiny", "model.block_size=32", "data=mqar", f"data.vocab_size={V}", "data.num_kv_pairs=4",
         "trainer.batch_size=8", "trainer.progress=false", "schedule.warmup_steps=2", "trainer.log_every=1",
         "trainer.eval_every=4", "trainer.eval_batches=2", "trainer.max_steps=8", "trainer.ckpt_every=4"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    from smollm.train import train as smollm_train
    run = tmp_path_factory.mktemp("e2e") / "base"
    smollm_train(compose(TRAIN), run)
    return run


def test_smollm_train_with_lora_then_load_model_then_merge(base_run):
    "The command line: a LoRA run on a tiny run, read back through load_model, folded in by merge."
    import subprocess, sys
    from pathlib import Path
    from smollm.runs import read_checkpoint_state, read_metrics
    run = base_run.parent / "lora_cli"
    args = [*TRAIN, f"init_from={base_run}", "sft.lora.rank=4", "sft.lora.targets=[q_proj,v_proj]", "optim.lr=1e-2",
            f"hydra.run.dir={run}"]
    p = subprocess.run([str(Path(sys.executable).parent / "smollm-train"), *args], cwd=base_run.parent,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_metrics(run / "metrics.csv")   # (that the loss falls is checked on one batch, above: MQAR's vary)
    assert [r["step"] for r in rows] == list(range(1, 9)) and all(r["train_loss"] > 0 for r in rows)
    ckpt = latest_checkpoint(run / "checkpoints")
    assert read_checkpoint_state(ckpt)["adapter_only"] and len(_tensors(ckpt)) == 2 * 2 * 2   # A, B x q, v x 2 blocks
    m, base = load_model(run), load_model(base_run)
    assert is_lora(m)
    x, _ = batch(seed=3)
    with torch.no_grad():
        want = m(x)
        assert (want - base(x)).abs().max() > 1e-3                               # the adapter learned something
        merged = merge(m)
        assert (merged(x) - want).abs().max().item() < 1e-5
    changed = [n for n, p in base.named_parameters() if not torch.equal(p, merged.get_parameter(n))]
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed)


def test_a_lora_run_resumes_exactly(base_run):
    from smollm.runs import read_metrics
    from smollm.train import train as smollm_train
    lora = [*TRAIN, f"init_from={base_run}", "sft.lora.rank=4", "optim.lr=1e-2"]
    smollm_train(compose(lora), base_run.parent / "straight")
    assert smollm_train(compose(lora), base_run.parent / "resumed", stop_at=4)["status"] == "stopped"
    smollm_train(compose([*lora, "trainer.resume=true"]), base_run.parent / "resumed")
    a, b = (read_metrics(base_run.parent / r / "metrics.csv") for r in ("straight", "resumed"))
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b] and len(a) == 8
    x, _ = batch(seed=3)
    with torch.no_grad():
        assert torch.equal(load_model(base_run.parent / "straight")(x), load_model(base_run.parent / "resumed")(x))


def test_smollm_train_refuses_lora_without_init_from(tmp_path):
    from smollm.train import train as smollm_train
    with pytest.raises(ConfigError, match="sft.lora.rank=4 needs init_from"):
        smollm_train(compose([*TRAIN, "sft.lora.rank=4"]), tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_lora_run_on_two_ranks_matches_one_process(parallel, base_run, tmp_path):
    "torchrun, 2 gloo ranks: the LoRA run's losses and final logits within 1e-5 of one process's; the adapter alone saved."
    import os, subprocess, sys
    from pathlib import Path
    from smollm.runs import read_metrics
    from smollm.train import train as smollm_train
    lora = [*TRAIN, "trainer.global_batch_size=8", f"init_from={base_run}", "sft.lora.rank=4", "optim.lr=1e-2"]
    smollm_train(compose(lora), tmp_path / "one")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", "-m",
                        "smollm.train", *lora, f"trainer.parallel={parallel}", f"hydra.run.dir={tmp_path / 'two'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = (read_metrics(tmp_path / r / "metrics.csv") for r in ("one", "two"))
    assert max(abs(x["train_loss"] - y["train_loss"]) for x, y in zip(a, b, strict=True)) < 1e-5
    assert len(_tensors(latest_checkpoint(tmp_path / "two" / "checkpoints"))) == 2 * 7 * 2
    x, _ = batch(seed=3)
    with torch.no_grad():
        err = (load_model(tmp_path / "one")(x) - load_model(tmp_path / "two")(x)).abs().max().item()
    assert err < 1e-5, err
