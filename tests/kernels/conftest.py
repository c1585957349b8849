"""Kernel tests: every output buffer starts as NaN, so an element a kernel never writes fails."""

import pytest

from reglue.kernels import _utils


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    monkeypatch.setattr(_utils, "poison_outputs", True)
    yield
