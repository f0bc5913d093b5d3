"""Helpers shared by the kernel tests (tests/ is on sys.path under pytest's default import mode)."""
import contextlib

import torch


@contextlib.contextmanager
def poisoned_outputs():
    "Every buffer torch.empty/empty_like hands out meanwhile starts as NaN: an element a kernel forgets to write shows."
    empty, empty_like = torch.empty, torch.empty_like

    def nan(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t
    torch.empty = lambda *a, **k: nan(empty(*a, **k))
    torch.empty_like = lambda *a, **k: nan(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def check_output(got, ref, gold, dtype, what, fp32_tol):
    """One output of a kernel, `got`, against the reference run in the same dtype, `ref`, and in fp64, `gold`.

    fp32: `got` matches `ref` within `fp32_tol` (absolute and relative). bf16 and fp16: `got`'s largest error
    against `gold` is at most a small multiple of `ref`'s own, plus two ulps of the largest value. `what` names
    the output in the failure message."""
    assert got.dtype == ref.dtype and got.shape == ref.shape, \
        f"{what}: {got.dtype} {tuple(got.shape)}, expected {ref.dtype} {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=fp32_tol, rtol=fp32_tol, msg=lambda m: f"{what}: {m}")
        return
    err, ref_err = (got.double() - gold).abs().max().item(), (ref.double() - gold).abs().max().item()
    # the interpreter truncates fp32 -> bf16 (up to one ulp) where torch rounds (half an ulp), and each
    # rounded intermediate (a sum, a normalised x, the output) can add one: a few ulps of the largest value
    bound = 3 * ref_err + 2 * torch.finfo(dtype).eps * gold.abs().max().item()
    assert err <= bound, f"{what}: max error {err:.3g} vs fp64, the reference's is {ref_err:.3g}"
