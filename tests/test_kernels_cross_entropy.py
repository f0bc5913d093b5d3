"""Cross-entropy and linear cross-entropy: the Triton kernels (under the interpreter without a GPU) and the
chunked PyTorch version against the unfused plain-PyTorch references, forward and backward."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smollm.kernels.core import load_triton
from smollm.kernels.cross_entropy import (REDUCTIONS, ce_rows_fused, ce_rows_torch, cross_entropy,
                                          cross_entropy_ref, default_chunk_size, linear_cross_entropy,
                                          linear_cross_entropy_chunked, linear_cross_entropy_ref,
                                          linear_cross_entropy_unchunked)

tr = load_triton("cross_entropy")
EXTRAS = {"plain": {}, "extras": dict(z_loss=1e-3, softcap=5.0)}


def close(a, b, dtype):
    "a against the reference b, with tolerances scaled to the dtype and to the size of b."
    assert a.shape == b.shape, (a.shape, b.shape)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    scale = b.detach().float().abs().max().clamp(min=1e-3)  # gradients of a mean are ~1/N: compare relatively
    torch.testing.assert_close(a.detach().float(), b.detach().float(), atol=tol * scale, rtol=tol)


def targets(n, V, ignored=(2, 5)):
    y = torch.randint(0, V, (n,))
    y[[i for i in ignored if i < n]] = -100
    return y


def ce_check(z, y, dtype, impl=None, **kw):
    "Triton `cross_entropy` against `cross_entropy_ref`: loss and grad, on clones; the logits stay intact."
    z0 = z.clone()
    zt, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
    out, ref = (impl or tr.cross_entropy)(zt, y, **kw), cross_entropy_ref(zr, y, **kw)
    close(out, ref, dtype)
    g = torch.randn_like(ref)
    gt, = torch.autograd.grad(out, zt, g)
    gr, = torch.autograd.grad(ref, zr, g)
    assert gt.dtype == dtype
    close(gt, gr, dtype)
    assert torch.equal(zt.detach(), z0)  # the caller's logits are not overwritten


# ------------------------------------------------------------------------------------------- cross_entropy

@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_matches_torch(reduction):
    "Every implementation reduces through `reduce_loss`: the reference's reductions against torch's own op."
    z, y = torch.randn(2, 9, 31), torch.randint(0, 31, (2, 9))
    y[0, 2] = y[1, 5] = -100
    expected = torch.nn.functional.cross_entropy(z.transpose(1, 2), y, reduction=reduction)  # (B, V, T) layout
    torch.testing.assert_close(cross_entropy_ref(z, y, reduction=reduction), expected)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n,V,extras", [(37, 1000, "plain"), (37, 123, "extras"), (1, 1000, "extras")])
def test_cross_entropy_matches_reference(n, V, extras, reduction, dtype):
    z = (torch.randn(n, V) * 4).to(dtype)
    ce_check(z, targets(n, V), dtype, reduction=reduction, **EXTRAS[extras])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_all_ignored(reduction):
    z = torch.randn(4, 30, requires_grad=True)
    y = torch.full((4,), -1, dtype=torch.long)
    out = tr.cross_entropy(z, y, ignore_index=-1, reduction=reduction)
    assert torch.equal(out, torch.zeros_like(out))  # the mean is 0, not NaN
    g, = torch.autograd.grad(out.sum(), z)
    assert torch.equal(g, torch.zeros_like(g))


def test_cross_entropy_leading_dims_and_masked_vocab():
    "Logits (B, T, V) with some -inf entries (a masked vocabulary), including a whole first block."
    z = torch.randn(2, 3, 200)
    z[..., :64] = float("-inf")
    z[0, 1, 150:] = float("-inf")
    y = torch.randint(64, 150, (2, 3))
    ce_check(z, y, torch.float32, reduction="none")
    # with a block of 64 columns the first block is all -inf
    loss, g = tr.ce_rows_triton(z.view(6, 200).clone(), y.view(6), -100, 0.0, None, torch.tensor(1.0), block_v=64)
    loss_r, g_r = ce_rows_torch(z.view(6, 200), y.view(6), -100, 0.0, None, torch.tensor(1.0))
    close(loss, loss_r, torch.float32); close(g, g_r, torch.float32)


@pytest.mark.parametrize("softcap,z_loss", [(None, 0.0), (3.0, 1e-2)])
def test_ce_rows_block_loop_per_row_weights_and_buffers(softcap, z_loss):
    "Both sweeps loop over many blocks; per-row weights; the gradient into a NaN-poisoned buffer or in place."
    n, V = 5, 1000
    z, y = torch.randn(n, V) * 3, targets(n, V, ignored=(1,))
    w = torch.rand(n)
    loss_r, g_r = ce_rows_torch(z, y, -100, z_loss, softcap, w)
    buf = torch.full_like(z, float("nan"))
    loss, g = tr.ce_rows_triton(z, y, -100, z_loss, softcap, w, grad_buf=buf, block_v=128)
    assert g is buf
    close(loss, loss_r, torch.float32); close(g, g_r, torch.float32)
    zc = z.clone()
    loss, g = tr.ce_rows_triton(zc, y, -100, z_loss, softcap, w, block_v=128)
    assert g.data_ptr() == zc.data_ptr()
    close(g, g_r, torch.float32)
    loss, g = tr.ce_rows_triton(z.clone(), y, -100, z_loss, softcap, None, block_v=128)  # loss only
    assert g is None
    close(loss, loss_r, torch.float32)


def test_ce_rows_out_of_range_target_gives_nan():
    "What a GPU caller gets instead of the host-side error: NaN for that row only, and no out-of-bounds read."
    z, y = torch.randn(3, 20), torch.tensor([25, 3, -1])
    loss, g = tr.ce_rows_triton(z.clone(), y, -100, 0.0, None, torch.tensor(1.0))
    assert loss[0].isnan() and loss[2].isnan() and loss[1].isfinite()
    assert g[0].isnan().all() and g[1].isfinite().all()


def test_cross_entropy_without_grad_and_retain_graph():
    z, y = torch.randn(6, 40), targets(6, 40)
    close(tr.cross_entropy(z, y), cross_entropy_ref(z, y), torch.float32)  # no grad asked: loss only
    z.requires_grad_()
    out = tr.cross_entropy(z, y, reduction="sum")
    g1, = torch.autograd.grad(out, z, torch.tensor(2.0), retain_graph=True)
    g2, = torch.autograd.grad(out, z, torch.tensor(2.0))
    torch.testing.assert_close(g1, g2)  # the stored gradient is not scaled in place
    g, = torch.autograd.grad(tr.cross_entropy(z, y), z, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):  # no silent 2nd derivative
        g.sum().backward()


def test_cross_entropy_gradcheck():
    "The kernel computes in fp32, so the finite differences use a wide step and loose tolerances."
    z = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, -100, 6])
    for kw in ({}, dict(z_loss=1e-2, softcap=2.0, reduction="none")):
        assert torch.autograd.gradcheck(lambda x: tr.cross_entropy(x, y, **kw), (z,), eps=1e-3, atol=1e-3, rtol=1e-2)


def test_cross_entropy_public_op_dispatches_to_triton():
    z, y = torch.randn(5, 33), targets(5, 33)
    ce_check(z, y, torch.float32, impl=lambda *a, **kw: cross_entropy(*a, **kw, impl="triton"), z_loss=1e-4)


def test_cross_entropy_bad_input():
    z, y = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 10\).*\[10\]"):
        tr.cross_entropy(z, torch.tensor([0, 1, 10, -100]))
    with pytest.raises(ValueError, match="reduction='avg' is not one of"):
        tr.cross_entropy(z, y, reduction="avg")
    with pytest.raises(ValueError, match="softcap=0.0 must be a positive"):
        tr.cross_entropy(z, y, softcap=0.0)
    with pytest.raises(ValueError, match=r"targets has shape \(3,\), expected \(4,\)"):
        tr.cross_entropy(z, y[:3])
    with pytest.raises(ValueError, match="must be an integer tensor"):
        tr.cross_entropy(z, y.float())


# ------------------------------------------------------------------------------------ linear_cross_entropy

LINEAR = {"triton": lambda *a, **kw: tr.linear_cross_entropy(*a, **kw),
          "torch-chunked": linear_cross_entropy_chunked,
          "torch-unchunked": lambda *a, chunk_size=None, **kw: linear_cross_entropy_unchunked(*a, **kw)}


def linear_check(fn, h, W, y, dtype, **kw):
    "A chunked implementation against `linear_cross_entropy_ref`: loss, grad of hidden and of weight."
    h0, W0 = h.clone(), W.clone()
    ht, Wt = h.clone().requires_grad_(), W.clone().requires_grad_()
    hr, Wr = h.clone().requires_grad_(), W.clone().requires_grad_()
    out = fn(ht, Wt, y, **kw)
    kw.pop("chunk_size", None)
    ref = linear_cross_entropy_ref(hr, Wr, y, **kw)
    close(out, ref, dtype)
    g = torch.rand_like(ref) + 0.5
    for a, b in zip(torch.autograd.grad(out, (ht, Wt), g), torch.autograd.grad(ref, (hr, Wr), g)):
        assert a.dtype == dtype
        close(a, b, dtype)
    assert torch.equal(h, h0) and torch.equal(W, W0)


@pytest.mark.parametrize("impl", LINEAR)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n,dim,V,chunk,extras", [(37, 16, 123, 8, "plain"), (37, 16, 123, 10, "extras"),
                                                  (1, 8, 1000, None, "extras")])
def test_linear_cross_entropy_matches_reference(impl, n, dim, V, chunk, extras, reduction, dtype):
    h, W = torch.randn(n, dim).to(dtype), (torch.randn(V, dim) / dim ** 0.5).to(dtype)
    linear_check(LINEAR[impl], h, W, targets(n, V), dtype, reduction=reduction, chunk_size=chunk, **EXTRAS[extras])


@pytest.mark.parametrize("impl", LINEAR)
def test_linear_cross_entropy_all_ignored_and_partial_grads(impl):
    fn = LINEAR[impl]
    h, W = torch.randn(5, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    out = fn(h, W, torch.full((5,), -100), chunk_size=2)
    assert out.item() == 0.0
    gh, gW = torch.autograd.grad(out, (h, W))
    assert torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gW, torch.zeros_like(gW))
    y = targets(5, 20)
    for frozen in ("hidden", "weight"):  # a frozen lm head, or a frozen trunk
        ht, Wt = h.detach().requires_grad_(frozen != "hidden"), W.detach().requires_grad_(frozen != "weight")
        hr, Wr = h.detach().requires_grad_(frozen != "hidden"), W.detach().requires_grad_(frozen != "weight")
        x, = [t for t in (ht, Wt) if t.requires_grad]
        xr, = [t for t in (hr, Wr) if t.requires_grad]
        g, = torch.autograd.grad(fn(ht, Wt, y, chunk_size=2), x)
        gr, = torch.autograd.grad(linear_cross_entropy_ref(hr, Wr, y), xr)
        close(g, gr, torch.float32)
    with torch.no_grad():  # evaluation: the loss only
        close(fn(h, W, y, chunk_size=3), linear_cross_entropy_ref(h, W, y), torch.float32)


@pytest.mark.parametrize("impl", LINEAR)
def test_non_contiguous_inputs(impl):
    "Transposed views: logits (N, V) whose vocabulary is not the unit-stride dim, hidden likewise."
    ce_check(torch.randn(40, 6).t(), targets(6, 40), torch.float32, reduction="none", softcap=4.0)
    h, W = torch.randn(8, 7).t(), torch.randn(8, 30).t()
    linear_check(LINEAR[impl], h, W, targets(7, 30), torch.float32, reduction="none", chunk_size=3)


@pytest.mark.parametrize("impl", LINEAR)
def test_linear_cross_entropy_under_autocast(impl):
    "bf16 autocast with fp32 master weights: gradients come back in fp32, close to the autocast reference."
    h, W = torch.randn(9, 16, requires_grad=True), (torch.randn(50, 16) / 4).requires_grad_()
    y = targets(9, 50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = LINEAR[impl](h, W, y, chunk_size=4)
        ref = linear_cross_entropy_ref(h, W, y)
    close(out, ref, torch.bfloat16)
    for a, b in zip(torch.autograd.grad(out, (h, W)), torch.autograd.grad(ref, (h, W))):
        assert a.dtype == torch.float32
        close(a, b, torch.bfloat16)


def test_linear_cross_entropy_public_op():
    h, W, y = torch.randn(7, 8), torch.randn(30, 8), targets(7, 30)
    for impl in ("torch", "triton"):
        fn = lambda *a, **kw: linear_cross_entropy(*a, **kw, impl=impl)
        linear_check(fn, h, W, y, torch.float32, z_loss=1e-3, chunk_size=3)


def test_default_chunk_size():
    "Liger's rule: chunk x V about N x dim, a power of two."
    assert default_chunk_size(16384, 2048, 32000) == 1024  # TinyLlama: 16 chunks of 1024 x 32000
    assert default_chunk_size(37, 16, 123) == 8
    assert default_chunk_size(1, 8, 1000) == 1


def test_linear_cross_entropy_bad_input():
    h, W, y = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"weight must be \(V, dim\) with dim = hidden.shape\[-1\] = 8"):
        tr.linear_cross_entropy(h, W[:, :7], y)
    with pytest.raises(ValueError, match="chunk_size=0 must be a positive int"):
        tr.linear_cross_entropy(h, W, y, chunk_size=0)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 10\)"):
        tr.linear_cross_entropy(h, W, torch.tensor([0, 1, 2, 11]))
    with pytest.raises(ValueError, match="hidden is torch.float32 but weight is torch.bfloat16"):
        tr.linear_cross_entropy(h, W.bfloat16(), y)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_scaled_tinyllama(dtype):
    "A scaled-down TinyLlama lm head: 2 x 64 tokens, dim 128, a 2000-word vocabulary, default chunks."
    h, W = torch.randn(128, 128).to(dtype), (torch.randn(2000, 128) / 11).to(dtype)
    linear_check(LINEAR["triton"], h, W, targets(128, 2000), dtype, z_loss=1e-4)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("all_ignored", [False, True])
def test_small_cpu_path_matches_reference(reduction, all_ignored):
    "On a CPU, logits that fit in `CPU_CHUNK_LOGITS` go through the unchunked op: same loss and gradients."
    from smollm.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
    h, w = torch.randn(2, 9, 16, requires_grad=True), torch.randn(37, 16, requires_grad=True)
    y = torch.randint(0, 37, (2, 9))
    y[0, 3] = -100
    if all_ignored:
        y.fill_(-100)
    got = linear_cross_entropy(h, w, y, reduction=reduction, impl="torch")
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = linear_cross_entropy_ref(h2.flatten(0, 1), w2, y.flatten(), reduction=reduction)
    torch.testing.assert_close(got.reshape(ref.shape), ref)
    got.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap,z_loss", [(None, 0.0), (3.0, 1e-2)])
def test_ce_rows_fused_matches_ce_rows_torch(dtype, softcap, z_loss):
    "The in-place fused form against the closed form spelled out: per-row weights, an ignored row, a NaN-free buffer."
    n, V = 7, 1000
    z, y, w = (torch.randn(n, V) * 4).to(dtype), targets(n, V, ignored=(1,)), torch.rand(n)
    y[3] = V - 1
    loss_r, g_r = ce_rows_torch(z, y, -100, z_loss, softcap, w)
    buf = z.clone()
    loss, g = ce_rows_fused(buf, y, -100, z_loss, softcap, w)
    assert g is buf and g.dtype == dtype
    close(loss, loss_r, torch.float32)
    close(g, g_r, dtype)
    assert torch.equal(g[1], torch.zeros(V, dtype=dtype))  # the ignored row


def test_public_op_on_cpu_runs_unchunked_and_refuses_bad_targets():
    "Without chunk_size a CPU input takes the unchunked op; with one, the chunked op; both check the targets."
    h, w, y = torch.randn(5, 8, requires_grad=True), torch.randn(30, 8), targets(5, 30)
    assert type(linear_cross_entropy(h, w, y, impl="torch").grad_fn).__name__.startswith("Unchunked")
    assert not type(linear_cross_entropy(h, w, y, impl="torch", chunk_size=2).grad_fn).__name__.startswith("Unchunked")
    for chunk_size in (None, 2):
        with pytest.raises(ValueError, match=r"targets must lie in \[0, 30\) or equal ignore_index=-100; found \[30, -1\]"):
            linear_cross_entropy(h, w, torch.tensor([0, 30, 1, -1, -100]), impl="torch", chunk_size=chunk_size)


def test_unchunked_retain_graph_and_no_second_derivative():
    h, w, y = torch.randn(6, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True), targets(6, 20)
    out = linear_cross_entropy_unchunked(h, w, y, reduction="sum")
    g1 = torch.autograd.grad(out, (h, w), torch.tensor(2.0), retain_graph=True)
    g2 = torch.autograd.grad(out, (h, w), torch.tensor(2.0))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)  # the saved gradient block is not scaled in place
    gh, = torch.autograd.grad(linear_cross_entropy_unchunked(h, w, y), h, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        gh.sum().backward()


def test_compiled_range_check_is_an_async_assert():
    "Under torch.compile the range check stays in the graph (fullgraph) and still refuses a bad target."
    fn = torch.compile(lambda h, w, y: linear_cross_entropy(h, w, y, impl="torch"), fullgraph=True, backend="eager")
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    torch.testing.assert_close(fn(h, w, torch.tensor([0, 1, 9, -100])),
                               linear_cross_entropy_ref(h, w, torch.tensor([0, 1, 9, -100])))
    with pytest.raises(RuntimeError, match=r"targets must lie in \[0, 10\)"):
        fn(h, w, torch.tensor([0, 1, 10, -100]))


def test_compiled_unchunked_is_the_plain_form():
    """Compiled, the CPU path traces the plain lm head + cross-entropy (inductor fuses its passes; it cannot see
    into UnchunkedLinearCrossEntropyFunction's in-place ones): no custom Function in the graph, and loss and
    gradients agree with the eager Function for every reduction, with the extras, an ignored row and autocast."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    y = torch.tensor([[0, 5, -100, 29, 7], [3, 3, 1, -100, 12]])
    for reduction in REDUCTIONS:
        for kw in (dict(), dict(z_loss=1e-3, softcap=5.0)):
            for bf16 in (False, True):
                torch._dynamo.reset()
                graphs.clear()
                fn = torch.compile(lambda h, w, y: linear_cross_entropy(h, w, y, reduction=reduction, impl="torch",
                                                                        **kw), fullgraph=True, backend=backend)
                results = []
                for f in (fn, lambda h, w, y: linear_cross_entropy(h, w, y, reduction=reduction, impl="torch", **kw)):
                    torch.manual_seed(0)
                    h, w = torch.randn(2, 5, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        out = f(h, w, y)
                    gout = torch.randn(out.shape)
                    results.append((out, *torch.autograd.grad(out, (h, w), gout)))
                assert len(graphs) == 1
                assert not [n for n in graphs[0].graph.nodes if "autograd_function" in str(n.target)]
                tol = dict(atol=2e-2, rtol=2e-2) if bf16 else dict(atol=1e-5, rtol=1e-5)
                for a, b in zip(*results):
                    torch.testing.assert_close(a.float(), b.float(), **tol)
    # every target ignored: the compiled mean is 0, as in eager (F.cross_entropy's own mean would be 0/0)
    fn = torch.compile(lambda h, w, y: linear_cross_entropy(h, w, y, impl="torch"), fullgraph=True, backend="eager")
    h, w = torch.randn(4, 8, requires_grad=True), torch.randn(30, 8)
    out = fn(h, w, torch.full((4,), -100))
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(h.grad, torch.zeros_like(h))


def test_transformer_loss_has_no_graph_break():
    "torch._dynamo.explain of the nano model's loss: the range check used to split the graph in two."
    from smollm.config import build_model, compose
    torch.manual_seed(0)
    model = build_model(compose(["model=tinyllama_nano"]).model)
    x, y = torch.randint(0, 100, (1, 16)), torch.randint(0, 100, (1, 16))
    explanation = torch._dynamo.explain(model.loss)(x, y)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]


def test_cpu_benchmark_quick_mode_runs():
    "benchmarks/kernels_cross_entropy.py --cpu --quick: every CPU implementation checked and timed once, tiny."
    bench_dir = Path(__file__).resolve().parent.parent / "benchmarks"
    out = subprocess.run([sys.executable, "kernels_cross_entropy.py", "--cpu", "--quick"], capture_output=True,
                         text=True, timeout=300, cwd=bench_dir, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| linear_cross_entropy")]
    assert {r.split("|")[3].strip() for r in rows} == {"unfused", "smollm-torch", "smollm-torch-4-chunks"}
    assert len(rows) == 6 and all("x unfused" in r for r in rows)
