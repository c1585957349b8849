"""Benchmark set-up: which device, which sizes, which providers, and the one timing helper.

``pytest bench/`` collects ``bench_*.py``. On a CUDA machine it times real SiT/compressor sizes
in bf16 with ``triton.testing.do_bench`` (median, after warm-up) and all providers; on CPU it
times tiny fp32 sizes with pytest-benchmark's own timer and skips the Triton provider (the
interpreter's timings are not performance). Every benchmark stores its median, GB/s and TFLOP/s
(from ``bench/_roofline.py``) in ``extra_info``; ``bench/summarize.py`` turns the JSON into a table.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # bench/_common.py, bench/_roofline.py importable by name

from _common import ON_GPU  # noqa: E402


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself; collecting it here too
    # would run every benchmark in it twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    if ON_GPU:
        torch.cuda.empty_cache()
