"""Every Triton kernel variant we launch compiles to GPU code for A100 (sm_80) and H100 (sm_90).

No GPU needed: Triton compiles ahead of time for a target down to cubin with its bundled ptxas, so
this catches what the CPU interpreter accepts but the real compiler rejects. (Whether the compiled
kernels are *correct* on a GPU is the `gpu`-marked tests' job.)
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_kernels_compile_for_sm80_and_sm90(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "tests.kernels._aot", "80,90"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert proc.returncode == 0 and not failed, "\n".join(failed) or proc.stderr[-3000:]
    assert proc.stdout.count("\nok ") + proc.stdout.startswith("ok ") >= 60
