"""Kernel tests: every output buffer starts as NaN, so an element a kernel never writes fails; and
the fp32 references run in true fp32 on a GPU (no TF32 in cuDNN convs or matmuls)."""

import pytest
import torch

from reglue.kernels import _utils


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    monkeypatch.setattr(_utils, "poison_outputs", True)
    yield


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
