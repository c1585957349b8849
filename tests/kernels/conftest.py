"""Kernel tests: every output buffer starts as NaN, so an element a kernel never writes fails; and
the fp32 references run in true fp32 on a GPU (no TF32 in cuDNN convs or matmuls)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reglue.kernels import _utils

ROOT = Path(__file__).resolve().parents[2]


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


@pytest.fixture(scope="session")
def kernel_facts(tmp_path_factory):
    """Every kernel variant compiled for sm_80 and sm_90 with the launch specialisation, once per
    session (``tests/kernels/_aot.py``, in a process without TRITON_INTERPRET): (process, results)."""
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(out / "cache"), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "tests.kernels._aot", "--arch", "80,90", "--json", str(out / "facts.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    results = json.loads((out / "facts.json").read_text()) if (out / "facts.json").exists() else []
    return proc, results
