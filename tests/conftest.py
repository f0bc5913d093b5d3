"""Shared pytest set-up.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before any kernel module
is imported: here, at the very top, for machines without a GPU. (`smollm.kernels.core.load_triton`
does the same for library users.)
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    "The tensors in the tests are tiny: a second thread costs more to wake than it saves, most of all on a shared CPU."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    "Every test starts from the same RNG state, so a failure reproduces."
    torch.manual_seed(0)
    yield
