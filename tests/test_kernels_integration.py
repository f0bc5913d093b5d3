"""tinyllama_nano's architecture, at a tiny size, trains with every Triton kernel (under the interpreter on a CPU)
and gives the same losses as with the plain-PyTorch references."""
import pytest
import torch

from smollm.config import build_model, compose

TINY = ["model=tiny", "data.vocab_size=96", "model.mlp_hidden=96", "model.block_size=16", "model.attention.backend=fused"]


def train_losses(kernels: str, steps: int = 3, extra=()):
    torch.manual_seed(0)
    model = build_model(compose([*TINY, f"model.kernels={kernels}", *extra]).model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(1))   # one batch, learned
    losses = []
    for _ in range(steps):
        loss = model.loss(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model


@pytest.mark.parametrize("extra", [(), ("model/positional=alibi", "+model.attention.window=8")])
def test_triton_training_matches_torch(extra):
    ref, m_ref = train_losses("torch", extra=extra)
    tri, m_tri = train_losses("triton", extra=extra)
    assert ref[-1] < ref[0], "the reference run should learn"
    torch.testing.assert_close(torch.tensor(tri), torch.tensor(ref), rtol=1e-4, atol=1e-4)
    for (n, a), (_, b) in zip(m_ref.named_parameters(), m_tri.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=lambda m: f"{n}: {m}")


def test_triton_kernels_really_ran(monkeypatch):
    "Guard against a silent fallback: with kernels=triton, each op's Triton half is called."
    from smollm.kernels import core
    loaded = []
    real = core.load_triton
    monkeypatch.setattr(core, "load_triton", lambda name: loaded.append(name) or real(name))
    import sys
    for mod in ("rmsnorm", "rope", "swiglu", "cross_entropy", "attention"):
        # sys.modules: `smollm.kernels.rope` the attribute is the re-exported function, not the module
        monkeypatch.setattr(sys.modules[f"smollm.kernels.{mod}"], "load_triton", core.load_triton)
    train_losses("triton", steps=1)
    assert {"rmsnorm", "rope", "swiglu", "cross_entropy", "attention"} <= set(loaded), loaded
