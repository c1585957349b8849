"""The static kernel report's facts at the real shapes (compiled once per session, see conftest).

What is pinned: no variant of a SiT-B/2 or SiT-XL/2 REGLUE run spills; the norm kernels' row
accesses at D = 768 and 1152 (and QK RMSNorm's at head dims 64 and 72) are 128-bit; the bf16 conv
runs its K loop on tensor cores fed by cp.async; the report's occupancy and width arithmetic. Compiler facts only: nothing here measures a speed.
"""

import pytest

from reglue.kernels import report

from tests.kernels._aot import EXACT_FP32_SET, REAL_SETS as REAL


def _rows(results, sets=REAL, kernels=None):
    """The rows of ``kernels`` (default all) in ``sets``; each must carry its instruction mix
    (``_aot.reads_instructions`` decides which are disassembled; a None would pass a check for 0)."""
    rows = [(r["set"], r["arch"], row) for r in results if r["set"] in sets for row in r["rows"]]
    assert rows, "no compiled variants"
    rows = [(s, a, row) for s, a, row in rows if kernels is None or row["kernel"] in kernels]
    missing = [f"sm{a} {s} {row['kernel']}" for s, a, row in rows if row.get("spill_instructions") is None]
    assert not missing, f"not disassembled: {missing}"
    return rows


@pytest.mark.slow
def test_real_shape_variants_do_not_spill(kernel_facts):
    _, results = kernel_facts
    spilling = [f"sm{a} {s} {row['kernel']} {row['constexprs']}: {row['spill_instructions']} STL/LDL, "
                f"{row['local_bytes']} B local" for s, a, row in _rows(results)
                if row["spill_instructions"] or row["local_bytes"]]
    assert not spilling, "\n".join(spilling)


@pytest.mark.slow
def test_norm_row_accesses_are_128_bit(kernel_facts):
    """adaLN kernels at D = 768 / 1152: every global access is 128-bit. QK RMSNorm at head dims
    64 / 72 (rows read in place from the qkv view): every row access is; the one load of the
    (D,) weight and the one store of a program's fp32 dweight partial row (a few hundred bytes
    per program, spread over all its threads) may be narrower."""
    _, results = kernel_facts
    narrow = []
    for s, a, row in _rows(results, kernels={"adaln_fwd", "adaln_bwd", "rms_norm_fwd", "rms_norm_bwd"}):
        rms, bwd = row["kernel"].startswith("rms"), row["kernel"].endswith("bwd")
        if (row["global_loads"] - row["global_loads_128"] > int(rms)
                or row["global_stores"] - row["global_stores_128"] > int(rms and bwd)):
            narrow.append(f"sm{a} {s} {row['kernel']} {row['constexprs']}: {row['global_loads_128']}/"
                          f"{row['global_loads']} loads, {row['global_stores_128']}/{row['global_stores']} stores 128-bit")
    assert not narrow, "\n".join(narrow)


def test_occupancy_arithmetic():
    # 236 registers, 8 warps: 236*32 rounds to 7680 per warp, 8 warps per block -> 1 block of 8 warps.
    assert report.occupancy(236, 96 * 1024, 8, 90) == {"blocks_per_sm": 1, "warps_per_sm": 8, "occupancy": 0.125,
                                                      "occupancy_limit": "registers"}
    # 32 registers, 16 warps: the 64-warp thread limit allows 4 blocks.
    assert report.occupancy(32, 128, 16, 90)["blocks_per_sm"] == 4
    # shared memory: 100 KB blocks, 164 KB on sm_80 -> 1; 228 KB on sm_90 -> 2.
    assert report.occupancy(32, 100 * 1024, 4, 80)["blocks_per_sm"] == 1
    assert report.occupancy(32, 100 * 1024, 4, 90) == {"blocks_per_sm": 2, "warps_per_sm": 8, "occupancy": 0.125,
                                                      "occupancy_limit": "shared memory"}


def test_access_widths():
    assert [report._access_bits(o) for o in ("LDG.E.128", "LDG.E.U16", "LDG.E", "STG.E.64", "LDG.E.EL.128.CONSTANT")] == \
        [128, 16, 32, 64, 128]


def test_report_rejects_an_unknown_preset(capsys):
    assert report.main(["--preset", "no-such-preset"]) == 2
    assert "no-such-preset" in capsys.readouterr().err


@pytest.mark.slow
def test_bf16_conv_main_loop_on_tensor_cores_with_pipelined_loads(kernel_facts):
    """Every tap's operands arrive by cp.async (no plain global load before the last cp.async: the
    plain loads left are the epilogue's bias and residual) and feed MMA (sm_80) / wgmma or MMA (sm_90); every
    candidate's grid of every conv (3072->256, 256->256, 256->16) covers every SM."""
    _, results = kernel_facts
    convs = _rows(results, kernels={"conv3x3"})
    assert {a for _, a, _ in convs} == {80, 90}
    for s, a, row in convs:
        where = f"sm{a} {s} {row['ops']}"
        assert row["mma"] + row["wgmma"] > 0, f"{where}: no tensor-core MMA"
        assert row["cp_async"] > 0, f"{where}: no cp.async"
        assert row["plain_loads_before_last_cp_async"] == 0, f"{where}: plain loads in the cp.async pipeline"
        assert row["ctas"] >= report.SM_COUNT[a], f"{where} {report._flags(row)}: {row['ctas']} CTAs"


@pytest.mark.slow
def test_fp32_conv_runs_on_tensor_cores_exactly_where_tf32_is_allowed(kernel_facts):
    """fp32 convs with TF32 allowed (an encoders.dtype=fp32 run: the trainer allows TF32) use MMA on
    sm_80 and sm_90; with TF32 off (the odd fp32 set) the exact fp32 dots are FMAs, no MMA."""
    from tests.kernels._aot import TF32_SET

    _, results = kernel_facts
    tf32 = _rows(results, sets=(TF32_SET,), kernels={"conv3x3"})
    exact = _rows(results, sets=(EXACT_FP32_SET,), kernels={"conv3x3"})
    assert {a for _, a, _ in tf32} == {a for _, a, _ in exact} == {80, 90}
    for s, a, row in tf32:
        assert row["constexprs"]["PRECISION"] == "tf32" and row["signature"]["X"] == "*fp32"
        assert row["mma"] + row["wgmma"] > 0, f"sm{a} {s} {row['ops']}: no tensor-core MMA"
    for s, a, row in exact:
        assert row["constexprs"]["PRECISION"] == "ieee" and row["signature"]["X"] == "*fp32"
        assert row["mma"] + row["wgmma"] == 0 and row["fma_fp32"] > 0, f"sm{a} {s} {row['ops']}"


@pytest.mark.slow
def test_rows_record_the_launch_specialisation(kernel_facts):
    """Each row says how the JIT specialised the launch: argument types, 16-divisible pointers and
    ints, ints specialised to constants (the NHWC output's channel stride: 1)."""
    _, results = kernel_facts
    for s, a, row in _rows(results):
        pointers = [name for name, ty in row["signature"].items() if ty.startswith("*")]
        assert pointers and all(row["specialisation"].get(name) == "16" for name in pointers), (s, a, row["kernel"])
    conv = next(row for _, _, row in _rows(results, kernels={"conv3x3"}))
    assert conv["signature"]["X"] == "*bf16" and conv["specialisation"]["out_sc"] == 1
    assert "out_sc=1" in report.compact_specialisation(conv)


@pytest.mark.slow
def test_norm_backward_kernels_reach_half_occupancy(kernel_facts):
    """The adaLN and RMSNorm backward kernels at the real shapes: >= 50% occupancy (32 of 64 warps per SM)."""
    _, results = kernel_facts
    low = [f"sm{a} {s} {row['kernel']} {row['constexprs']}: {row['registers']} regs, {row['occupancy']:.0%}"
           for s, a, row in _rows(results, kernels={"adaln_bwd", "rms_norm_bwd"}) if row["occupancy"] < 0.5]
    assert not low, "\n".join(low)
