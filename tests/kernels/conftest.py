"""Kernel tests: every output buffer starts as NaN, so an element a kernel never writes fails; and
the fp32 references run in true fp32 on a GPU (no TF32 in cuDNN convs or matmuls)."""

import pytest
import torch

from reglue.kernels import _utils
from tests.kernels import _facts


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    monkeypatch.setattr(_utils, "poison_outputs", True)
    yield


@pytest.fixture(autouse=True)
def _no_tf32():
    with _utils.tf32_allowed(False):
        yield


@pytest.fixture(scope="session")
def kernel_facts(request):
    """Every kernel variant compiled for sm_80 and sm_90 with the launch specialisation, once per
    session (``tests/kernels/_aot.py``, in a process without TRITON_INTERPRET, started in the
    background at collection: ``tests/kernels/_facts.py``): (process, results)."""
    pytest.importorskip("triton")
    return request.config.stash[_facts.STASH].wait()
