"""A compiled training loss is traced once: the second and third steps reuse the first graph (no recompilation from
state a module fills during the first call, such as RoPE's cache of inverse frequencies)."""
import torch

from smollm.config import build_model, compose


def test_compiled_loss_compiles_once_over_steps():
    cfg = compose(["model=tinyllama_nano", "data.vocab_size=512", "model.kernels=torch", "model.n_layers=2"])
    model = build_model(cfg.model).train()
    graphs = []

    def backend(gm, example_inputs):   # counts the graphs dynamo hands over; runs them as traced
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    loss = torch.compile(model.loss, backend=backend)
    x = torch.randint(0, 512, (2, 16))
    for _ in range(3):
        loss(x, x.roll(-1, 1)).backward()
    assert len(graphs) == 1, f"{len(graphs)} graphs for 3 calls of the same shapes: a guard failed and recompiled"
