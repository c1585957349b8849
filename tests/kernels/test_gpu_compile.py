"""Every Triton kernel variant we launch compiles to GPU code for A100 (sm_80) and H100 (sm_90).

No GPU needed: Triton compiles ahead of time for a target down to cubin with its bundled ptxas,
with the specialisation its JIT applies at launch, so this catches what the CPU interpreter
accepts but the real compiler rejects. (Whether the compiled kernels are *correct* on a GPU is
the `gpu`-marked tests' job.) The compilations are shared with test_kernel_report.py.
"""

import pytest


@pytest.mark.slow
def test_kernels_compile_for_sm80_and_sm90(kernel_facts):
    proc, results = kernel_facts
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert proc.returncode == 0 and not failed, "\n".join(failed) or proc.stderr[-3000:]
    assert {r["arch"] for r in results} == {80, 90}
    assert sum(len(r["rows"]) for r in results) >= 60
    kernels = {row["kernel"] for r in results for row in r["rows"]}
    assert kernels == {"adaln_fwd", "adaln_bwd", "rms_norm_fwd", "rms_norm_bwd", "conv3x3", "column_sum"}
