"""Shared pytest set-up.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before anything imports triton:
here, at the very top, through the same function the library and nbdev-test use (it switches the interpreter
on only where there is no GPU).
"""
import pytest
import torch

from smollm.kernels.core import interpreter_without_gpu

interpreter_without_gpu()


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
