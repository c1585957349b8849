"""Collective bytes per rank per training step, per parameter: flat FSDP vs HSDP vs replication.

4 gloo processes on this machine play 2 nodes of 2 (``LOCAL_WORLD_SIZE=2``); each runs one
training step of the tiny preset per mesh, and the trainer's collective counter
(``reglue.train.mesh.CollectiveCounter``, which wraps the ``torch.distributed`` calls FSDP2
issues) reports what the step moved within a node and across nodes. Divided by the parameter
count, the figures hold for any model size; ``bench/scaling.py`` scales them to a preset.

  pytest bench/bench_comm.py -s                       # the table, and the expected figures checked
  python bench/bench_comm.py --json bench/results/comm_per_param.json   # what scaling.py reads

It also checks that ``bench/results/comm_per_param.json`` (what ``bench/scaling.py`` projects from)
holds the figures just measured, within 1 %, and the projection on the tiny preset against them.

The counts are of a CPU run: parameters and reductions in fp32. On CUDA the all-gathers carry
bf16 parameters (``parallel.param_dtype``), half the bytes; the reductions stay fp32 by default.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import scaling

ROOT = Path(__file__).resolve().parents[1]
MESHES = {  # name -> overrides; on 2 nodes of 2 processes
    "flat-fsdp": {"parallel.replicate_degree": "1"},
    "hsdp": {},  # the default: auto
    "replicate": {"parallel.shard_degree": "1"},
}
NODES, PER_NODE = 2, 2


def _worker(rank: int, port: int, out: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank % PER_NODE), WORLD_SIZE=str(NODES * PER_NODE),
                      LOCAL_WORLD_SIZE=str(PER_NODE), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from reglue.config import apply_overrides
    from reglue.presets import get_preset
    from reglue.runtime import init_distributed, shutdown
    from reglue.train.trainer import Trainer

    dist_info = init_distributed(timeout_minutes=10)
    try:
        for name, overrides in MESHES.items():
            config = apply_overrides(get_preset("tiny"), {
                "train.out_dir": str(out), "train.name": name, "train.max_steps": "1", "train.resume": "none",
                "train.tensorboard": "false", "train.num_sample_images": "4", "sample.steps": "2",
                "data.synthetic_size": "256", **overrides})
            Trainer(config, dist_info).fit()
    finally:
        shutdown()


def measure(out: Path) -> dict:
    """mesh name -> the counter's record (bytes and bytes per parameter, by kind and where)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(rank), "--port", str(port), "--out", str(out)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(NODES * PER_NODE)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("a worker failed:\n" + "\n".join(log[-3000:] for log in logs))
    result = {}
    for name in MESHES:
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        record = next(r for r in rows if "collectives_per_rank_per_step" in r)
        result[name] = {"mesh": record["mesh"], "params": record["params"], **record["collectives_per_rank_per_step"]}
    return result


def table(result: dict) -> str:
    lines = ["| mesh | replicate x shard | all-gather within / across | reduce-scatter within / across | "
             "all-reduce within / across | total within / across (B/param/step/rank) |", "|---" * 6 + "|"]
    for name, r in result.items():
        per = r["bytes_per_param"]
        cells = [f"{per[k]['within_node']:.2f} / {per[k]['across_nodes']:.2f}" for k in ("all_gather", "reduce_scatter", "all_reduce")]
        within, across = (sum(per[k][w] for k in per) for w in ("within_node", "across_nodes"))
        lines.append(f"| {name} | {r['mesh']['replicate']} x {r['mesh']['shard']} | {' | '.join(cells)} | {within:.2f} / {across:.2f} |")
    return "\n".join(lines)


def test_collective_bytes_per_param(tmp_path):
    result = measure(tmp_path)
    print(f"\n2 simulated nodes x {PER_NODE} gloo processes, tiny preset, one step, fp32 (CPU):\n{table(result)}")
    per = {name: r["bytes_per_param"] for name, r in result.items()}
    flat, hsdp, rep = per["flat-fsdp"], per["hsdp"], per["replicate"]
    # flat FSDP: two all-gathers and a reduce-scatter of fp32 parameters, every one across nodes
    assert sum(v["within_node"] for v in flat.values()) == 0
    assert 11.8 < sum(v["across_nodes"] for v in flat.values()) < 12.2
    # HSDP 2 x 2: the same within a node; across only the all-reduce of a shard, 4 B / shard degree
    assert hsdp["all_gather"]["across_nodes"] == hsdp["reduce_scatter"]["across_nodes"] == 0
    assert 11.8 < sum(v["within_node"] for v in hsdp.values()) < 12.2
    assert 1.9 < hsdp["all_reduce"]["across_nodes"] < 2.05
    # replication: the whole fp32 gradient all-reduced over every rank; no gathers
    assert rep["all_gather"] == rep["reduce_scatter"] == {"within_node": 0, "across_nodes": 0}
    assert 3.9 < rep["all_reduce"]["across_nodes"] < 4.05
    # what scaling.py projects from (bench/results/comm_per_param.json) is what was just measured
    committed = json.loads(scaling.COUNTS.read_text())["meshes"]
    assert committed.keys() == per.keys()
    for name in per:
        assert committed[name]["mesh"] == result[name]["mesh"], name
        for kind, figures in per[name].items():
            assert figures == pytest.approx(committed[name]["bytes_per_param"][kind], rel=0.01, abs=1e-6), (name, kind)


def test_projection_runs_and_hsdp_keeps_flat_fsdp_off_the_network():
    """The tiny preset's table: HSDP moves across nodes only its all-reduce of a shard (4 B per
    parameter / 8), flat FSDP all of its 2 + 2 + 4 B per parameter; one node has nothing across."""
    facts = scaling.preset_counts("tiny")
    rows = scaling.project(json.loads(scaling.COUNTS.read_text()), facts, "H100", 8, 450.0, 50.0, 0.4)
    at = {(r["batch"], r["gpus"], r["strategy"]): r for r in rows}
    p = facts["params"] / 1e9
    assert at[(256, 8, "hsdp")]["across_gb"] == at[(256, 8, "flat-fsdp")]["across_gb"] == 0
    assert at[(256, 32, "hsdp")]["across_gb"] == pytest.approx(4 * p / 8, rel=0.03)
    assert at[(256, 32, "flat-fsdp")]["across_gb"] == pytest.approx(8 * p, rel=0.03)
    assert at[(256, 32, "hsdp")]["step_ms"][0] < at[(256, 32, "flat-fsdp")]["step_ms"][0]
    # per rank, fp32 and sharded over the shard group: parameters, gradients, two AdamW moments, EMA
    state = {"parameters": 4 * p, "gradients": 4 * p, "AdamW moments": 8 * p, "EMA": 4 * p}
    assert at[(256, 1, "flat-fsdp")]["state_gb"] == pytest.approx(state)
    assert at[(256, 32, "hsdp")]["state_gb"] == pytest.approx({k: v / 8 for k, v in state.items()})
    assert at[(256, 32, "replicate")]["state_gb"] == pytest.approx(state)
    flops = facts["sit_flops"] + facts["dinov2_flops"]
    assert at[(1024, 32, "hsdp")]["tflop_per_gpu"] == pytest.approx(flops * 1024 / 32 / 1e12)
    text = scaling.markdown(rows, "tiny", facts, "H100", 8, 450.0, 50.0, 0.4)
    assert "| params GB/rank | grads GB/rank | AdamW GB/rank | EMA GB/rank | TFLOP/GPU/step |" in text
    assert all(line.count("|") == 17 for line in text.splitlines()[2:])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the per-parameter figures here")
    args = parser.parse_args()
    if args.worker is not None:
        _worker(args.worker, args.port, args.out)
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            measured = measure(args.out or Path(tmp))
        print(table(measured))
        if args.json:
            args.json.write_text(json.dumps({"what": "collective bytes per rank per training step (reglue.train.mesh."
                                             "CollectiveCounter), tiny preset, CPU gloo, fp32 parameters and reductions, "
                                             f"{NODES} simulated nodes x {PER_NODE} processes", "meshes": measured},
                                            indent=1, sort_keys=True) + "\n")
