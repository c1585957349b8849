"""Two simulated nodes on this machine: two torchrun agents (c10d rendezvous), 2 gloo workers each.

HSDP is chosen by itself (2 x 2: shard within a node, replicate across), only the gradient
all-reduce of the shards crosses nodes, the weights equal a 1-process run's, a node that loses a
worker restarts (``--max-restarts``) and ends bit-identical to an uninterrupted run, and the 2 x 2
checkpoint resumes on other meshes."""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from reglue.checkpoint import latest_checkpoint, list_checkpoints, read_meta
from tests.train.test_distributed import export, launch, launch_nodes, losses, wait_nodes

STEPS, EVERY = 6, 2
CKPT = ["--set", f"train.ckpt_every={EVERY}", "--set", "train.keep_last=10"]

pytestmark = pytest.mark.slow


def collective_records(run_dir):
    """The counter's records in a run's metrics.jsonl: one per multi-process start (a resumed
    run keeps those of the steps before it)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "collectives_per_rank_per_step" in r]


def collectives(run_dir):
    """The counter's record of a run's first start."""
    return collective_records(run_dir)[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-node run and a 1-process run of the same config."""
    tmp = tmp_path_factory.mktemp("multinode")
    procs = launch_nodes(tmp, "hsdp", STEPS, extra=CKPT)
    one = launch(tmp, "one", STEPS, extra=CKPT)
    two, logs = wait_nodes(tmp, "hsdp", procs)
    return tmp, two, one, logs


def test_two_nodes_choose_hsdp_and_only_the_shard_all_reduce_crosses(runs):
    _, two, _, logs = runs
    record = collectives(two)
    assert record["mesh"] == {"kind": "hsdp", "replicate": 2, "shard": 2, "nodes": 2, "processes_per_node": 2}, record
    assert "mesh 2 x 2 (replicate x shard, hsdp) on 2 node(s)" in logs
    count = record["collectives_per_rank_per_step"]["bytes"]
    assert count["all_gather"]["across_nodes"] == 0 and count["reduce_scatter"]["across_nodes"] == 0, count
    # what is reduce-scattered within a node (fp32, the trainable parameters, padded to the shard
    # degree) is all-reduced across nodes as shards: 1 / shard of it, plus the step's one small
    # all-reduce of the loss, gradient norm and stop vote over all ranks.
    reduced = count["reduce_scatter"]["within_node"]
    assert 0.98 * 4 * record["params"] <= reduced <= 4 * record["params"] * 1.01
    assert reduced / 2 < count["all_reduce"]["across_nodes"] <= reduced / 2 + 64, count
    assert count["all_reduce"]["within_node"] == 0, count


ADAM_ROUNDING = 2e-5
"""Absolute weight difference that reduction-order rounding reaches after STEPS Adam steps at
the tiny preset's lr 5e-3 (4e-3 x lr). Adam divides each gradient element by its own running
scale, so where an element's gradient is a near-cancelling sum its fp32 rounding (another
summation order on 4 ranks than on 1) becomes a relative error of the update, up to ~1e-3 x lr
per step: measured 7.0e-6 on 10 of the 16,384 weights of one fc1 matrix (all others < 2e-6).
A sharding or reduction error moves weights by ~lr per step: 250 times this."""


def assert_weights_close(a, b):
    """fp32 rounding apart (the reductions sum in another order; see ADAM_ROUNDING), except the
    attention's key bias: its gradient is exactly zero (softmax ignores a shift shared by all
    keys), so what reaches it is rounding noise, which Adam scales to steps of the learning rate's size."""
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("attn.qkv.bias"):
            q, _, v = x.chunk(3)
            x, y = torch.cat([q, v]), torch.cat([y.chunk(3)[0], y.chunk(3)[2]])
        torch.testing.assert_close(x, y, rtol=1e-5, atol=ADAM_ROUNDING, msg=k)


def grad_norms(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["grad_norm"] for r in rows if "grad_norm" in r]


def test_two_nodes_match_one_process(runs):
    """Same losses, gradient norms (each shard counted once, not once per copy) and weights."""
    tmp, two, one, _ = runs
    assert losses(two) == pytest.approx(losses(one), rel=1e-5, abs=1e-6)
    assert len(grad_norms(two)) == STEPS and grad_norms(two) == pytest.approx(grad_norms(one), rel=1e-5)
    assert_weights_close(export(two, tmp / "two.safetensors"), export(one, tmp / "one.safetensors"))


def _workers(agent_pid: int):
    """RANK -> pid of an agent's worker processes (its children that have RANK in their environment)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
        except (OSError, ValueError, IndexError):
            continue
        if ppid == agent_pid and "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


def test_node_failure_restarts_and_ends_as_uninterrupted(runs):
    """SIGKILL a worker of node 1 after a checkpoint: both agents restart their workers
    (--max-restarts=1), the run resumes from the newest complete checkpoint and ends with the
    weights of the uninterrupted 2 x 2 run, bit for bit."""
    tmp, two, _, _ = runs
    procs = launch_nodes(tmp, "killed", STEPS, extra=CKPT, max_restarts=1)
    run, deadline = tmp / "killed", time.time() + 400
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if latest_checkpoint(run) is not None:
            break
        time.sleep(0.02)
    victims = {rank: pid for p in procs for rank, pid in _workers(p.pid).items() if rank >= 2}
    assert victims and latest_checkpoint(run) is not None, "no checkpoint, or no worker of node 1, to kill"
    killed_at = read_meta(latest_checkpoint(run))["step"]
    os.kill(victims[max(victims)], signal.SIGKILL)
    _, logs = wait_nodes(tmp, "killed", procs, timeout=500)
    assert killed_at < STEPS and "resumed from" in logs, logs[-4000:]
    resumed = int(logs.split("resumed from", 1)[1].split("at step ")[1].split()[0])
    assert killed_at <= resumed < STEPS, logs[-4000:]
    a, b = export(two, tmp / "straight.safetensors"), export(run, tmp / "restarted.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


@pytest.mark.parametrize("nproc,mesh,used", [
    (1, (), None),  # a world of one: no collectives, no record
    (2, (), {"kind": "fsdp", "replicate": 1, "shard": 2, "nodes": 1, "processes_per_node": 2}),
    (4, ("--set", "parallel.shard_degree=1"), {"kind": "replicate", "replicate": 4, "shard": 1, "nodes": 1, "processes_per_node": 4}),
], ids=["one-process", "1x2", "4x1"])
def test_2x2_checkpoint_resumes_on_other_meshes(runs, nproc, mesh, used):
    """The 2 x 2 checkpoint of step STEPS - EVERY, resumed on another mesh, ends where the
    1-process run does (fp32 rounding); the resumed run's counter record names the mesh it ran."""
    tmp, two, one, _ = runs
    name = f"resumed-{nproc}-{len(mesh)}"
    shutil.copytree(two, tmp / name)
    for path in list_checkpoints(tmp / name):
        if read_meta(path)["step"] > STEPS - EVERY:
            shutil.rmtree(path)
    assert read_meta(latest_checkpoint(tmp / name))["world_size"] == 4
    run = launch(tmp, name, STEPS, nproc=nproc, extra=[*CKPT, *mesh])
    assert read_meta(latest_checkpoint(run))["world_size"] == nproc
    records = collective_records(run)
    assert records[0]["mesh"]["kind"] == "hsdp" and records[0]["step"] == 1  # the 2 x 2 run's, before the resume
    assert [(r["step"], r["mesh"]) for r in records[1:]] == ([] if used is None else [(STEPS - EVERY + 1, used)])
    assert losses(run) == pytest.approx(losses(one), rel=1e-5, abs=1e-6)
    assert grad_norms(run) == pytest.approx(grad_norms(one), rel=1e-5)  # each shard counted once, also on 4 x 1
    assert_weights_close(export(run, tmp / f"{name}.safetensors"), export(one, tmp / f"one-{name}.safetensors"))
