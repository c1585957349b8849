"""The mesh shape from the config and the world, the collective counter in one process, and the
per-round store under torchrun (multi-process runs: tests/train/test_multinode.py)."""

import datetime
import logging
import threading
import time

import pytest
import torch
import torch.distributed as dist

from reglue.config import ConfigError, ParallelConfig
from reglue.runtime import _elastic_store, _round_prefix
from reglue.train.mesh import CollectiveCounter, ParallelMesh, mesh_shape


@pytest.mark.parametrize("rep,shard,world,local,want", [
    ("auto", "auto", 16, 8, (2, 8)),   # 2 nodes: HSDP, shard within a node
    ("auto", "auto", 8, 8, (1, 8)),    # 1 node: flat FSDP
    ("auto", "auto", 1, 1, (1, 1)),
    (1, "auto", 16, 8, (1, 16)),       # flat FSDP over both nodes
    ("auto", 1, 16, 8, (16, 1)),       # pure replication
    ("auto", 4, 16, 8, (4, 4)),
    (4, "auto", 16, 8, (4, 4)),
    (2, 8, 16, 8, (2, 8)),
])
def test_mesh_shape(rep, shard, world, local, want):
    assert mesh_shape(ParallelConfig(replicate_degree=rep, shard_degree=shard), world, local) == want


@pytest.mark.parametrize("rep,shard,world,local,error", [
    ("auto", 3, 16, 8, "parallel.shard_degree: 3 does not divide the world size 16"),
    (3, "auto", 16, 8, "parallel.replicate_degree: 3 does not divide the world size 16"),
    (2, 4, 16, 8, "2 x 4 = 8, not the world size 16"),
    ("auto", "auto", 12, 8, "the 8 processes of a node, which do not divide the world size 12"),
])
def test_mesh_shape_errors(rep, shard, world, local, error):
    with pytest.raises(ConfigError, match=error):
        mesh_shape(ParallelConfig(replicate_degree=rep, shard_degree=shard), world, local)


def test_shard_groups_across_nodes_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="reglue.parallelize"):
        assert mesh_shape(ParallelConfig(replicate_degree=1), 16, 8) == (1, 16)
    assert "puts each shard group across nodes" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="reglue.parallelize"):
        mesh_shape(ParallelConfig(), 16, 8)
    assert caplog.text == ""


@pytest.mark.parametrize("value", [0, -2, "two", True])
def test_degree_must_be_auto_or_positive(value):
    with pytest.raises(ConfigError, match="parallel.shard_degree: must be 'auto' or a positive integer"):
        ParallelConfig(shard_degree=value)


def test_mesh_kinds_and_nodes():
    assert [ParallelMesh(r, s, 2).kind for r, s in ((1, 1), (1, 4), (2, 2), (4, 1))] == ["single", "fsdp", "hsdp", "replicate"]
    mesh = ParallelMesh(2, 2, 2)
    assert not mesh.spans_nodes([0, 1]) and mesh.spans_nodes([1, 2]) and mesh.summary()["nodes"] == 2


def test_counter_counts_the_buffer_and_where(tmp_path):
    """In a world of one a call moves nothing (not counted); a call on a group of ranks on two
    nodes counts its whole buffer as across nodes (the group's ranks are faked)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        t, original = torch.zeros(10), dist.all_reduce
        with CollectiveCounter(ParallelMesh(1, 1, 1)) as counter:
            dist.all_reduce(t)
        assert counter.total("within_node") == counter.total("across_nodes") == 0
        real = dist.get_process_group_ranks
        dist.get_process_group_ranks = lambda group: [0, 1]
        try:
            with CollectiveCounter(ParallelMesh(2, 1, 1)) as counter:
                dist.all_reduce(t)
                out = torch.zeros(10)
                dist.all_gather_single(out, t[:10])
                dist.reduce_scatter_single(output=out, input=t)
        finally:
            dist.get_process_group_ranks = real
        assert counter.bytes["all_reduce"]["across_nodes"] == counter.bytes["all_gather"]["across_nodes"] == 40
        assert counter.bytes["reduce_scatter"]["across_nodes"] == 40 and counter.calls["all_reduce"] == 1
        assert dist.all_reduce is original  # unpatched after the block
    finally:
        dist.destroy_process_group()


def _join_round(port, world_size, ranks, timeout=30.0, stagger=()):
    """The ranks ``ranks`` of a torchrun round of ``world_size`` take their store prefix, each
    in its own thread on its own client of the agent's store (its timeout ``timeout`` seconds);
    the ranks in ``stagger`` start 0.2 s after the others. rank -> prefix, or the exception of
    a rank whose wait timed out (as a worker killed while it waits)."""
    out = {}

    def worker(rank):
        if rank in stagger:
            time.sleep(0.2)
        client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=timeout))
        try:
            out[rank] = _round_prefix(client, rank, world_size)
        except Exception as exc:  # noqa: BLE001 - the test reads it
            out[rank] = exc

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    return out


@pytest.fixture
def agent_store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=30), wait_for_workers=False)


def test_each_torchrun_round_gets_fresh_store_keys(agent_store, monkeypatch):
    """The agent's store outlives the workers; the workers of round 1 must not see the keys that
    round 0 left there, whatever their TORCHELASTIC_RESTART_COUNT says, also after a round of
    another world size (an elastic resize)."""
    port = agent_store.port
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    rounds = [_join_round(port, 2, (0, 1)), _join_round(port, 3, (0, 1, 2)), _join_round(port, 2, (0, 1))]
    prefixes = [set(r.values()) for r in rounds]
    assert all(len(p) == 1 and isinstance(next(iter(p)), str) for p in prefixes), rounds
    assert len(set.union(*prefixes)) == 3, rounds
    old = dist.PrefixStore(next(iter(prefixes[0])), agent_store)
    old.set("rank0_address", "old")
    new = dist.PrefixStore(next(iter(prefixes[2])), agent_store)
    assert new.check(["rank0_address"]) is False
    timeout = datetime.timedelta(seconds=30)
    stores = {}
    threads = [threading.Thread(target=lambda r=r: stores.update({r: _elastic_store(r, 2, timeout)})) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    stores[0].set("rank0_address", "new")
    assert stores[1].get("rank0_address") == b"new" and old.get("rank0_address") == b"old"
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert _elastic_store(0, 2, timeout) is None


def test_workers_that_die_before_or_while_joining_do_not_split_later_rounds(agent_store):
    """Round 0: rank 1 dies before it joins (killed while importing), rank 0 waits and is killed
    (its wait times out here). Round 1 agrees. Round 2: rank 0 dies before it joins, rank 1
    announces itself and is killed while waiting. Round 3, its rank 1 first, agrees on a new
    prefix. (A count of joins per round, as before, split rounds 1 and 3 over two prefixes.)"""
    port = agent_store.port
    assert isinstance(_join_round(port, 2, (0,), timeout=0.5)[0], dist.DistStoreError)
    round1 = _join_round(port, 2, (0, 1))
    assert isinstance(_join_round(port, 2, (1,), timeout=0.5)[1], dist.DistStoreError)
    round3 = _join_round(port, 2, (0, 1), stagger=(0,))
    assert round1[0] == round1[1] and round3[0] == round3[1] and round1[0] != round3[0], (round1, round3)


def test_a_mesh_that_does_not_fit_stops_the_run_before_it_writes(tmp_path):
    from reglue.config import apply_overrides
    from reglue.presets import get_preset
    from reglue.train.trainer import Trainer

    config = apply_overrides(get_preset("tiny"), {"train.out_dir": str(tmp_path), "train.name": "run",
                                                  "parallel.shard_degree": "3"})
    with pytest.raises(ConfigError, match="parallel.shard_degree: 3 does not divide the world size 1"):
        Trainer(config)
    assert not (tmp_path / "run").exists()


def test_reduce_dtype_bf16_on_cuda_only():
    from reglue.train.parallelize import reduce_dtype

    bf16, fp32 = ParallelConfig(reduce_dtype="bf16"), ParallelConfig()
    assert reduce_dtype(bf16, torch.device("cuda", 0)) == torch.bfloat16
    assert reduce_dtype(fp32, torch.device("cuda", 0)) == reduce_dtype(bf16, torch.device("cpu")) == torch.float32
    with pytest.raises(ConfigError, match="parallel.reduce_dtype"):
        ParallelConfig(reduce_dtype="fp16")


@pytest.mark.parametrize("device,asked,want", [
    ("cuda", "bf16", torch.bfloat16), ("cuda", "fp32", torch.float32), ("cpu", "bf16", torch.float32),
])
def test_reduce_dtype_reaches_fully_shard(monkeypatch, caplog, device, asked, want):
    """``parallel.reduce_dtype`` is the reduce dtype of every ``fully_shard`` call (blocks and
    root); on the CPU bf16 runs fp32, with one warning saying so. (CUDA is only the device's
    type here: ``fully_shard`` is recorded, not run.)"""
    import torch.distributed.fsdp as fsdp

    from reglue.config import apply_overrides
    from reglue.models import build_model
    from reglue.presets import get_preset
    from reglue.runtime import DistInfo
    from reglue.train.parallelize import parallelize

    policies = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, mp_policy, **kw: policies.append(mp_policy) or module)
    config = apply_overrides(get_preset("tiny"), {"parallel.reduce_dtype": asked})
    with torch.device("meta"):
        model = build_model(config, kernels=frozenset())
    mesh = ParallelMesh(2, 2, 2, device_mesh=object())
    with caplog.at_level(logging.WARNING, logger="reglue.parallelize"):
        parallelize(model, config.parallel, DistInfo(world_size=4, local_world_size=2, device=torch.device(device)), mesh, False)
    assert len(policies) == len(model.blocks) + 1
    assert {p.reduce_dtype for p in policies} == {want}
    warned = [r for r in caplog.records if "reduce_dtype" in r.getMessage()]
    assert len(warned) == (device == "cpu" and asked == "bf16"), caplog.text
    if warned:
        assert "on cpu the gradient reductions run in fp32" in warned[0].getMessage()


class _NoNoise:
    def slice(self, lo, hi):
        return None


def test_counter_sees_every_collective_of_a_training_step():
    """One training step (``FastStep``: forward and backward of the FSDP2 model, the step's
    all-reduce, fused AdamW, the EMA) on a 2 x 2 HSDP mesh of a fake 4-rank process group:
    every collective torch dispatches (``CommDebugMode``, which sees the c10d ops of
    ``torch.distributed``, functional collectives and DTensor alike) is one the counter counted,
    kind for kind, so a collective issued another way cannot pass its counts unseen."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from reglue.models import build_model
    from reglue.presets import get_preset
    from reglue.runtime import DistInfo
    from reglue.train.ema import EMA
    from reglue.train.parallelize import materialize, parallelize
    from reglue.train.step import FastStep

    c10d = torch.ops.c10d
    kind_of = {c10d._allgather_base_: "all_gather", c10d._reduce_scatter_base_: "reduce_scatter", c10d.allreduce_: "all_reduce"}
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        mesh = ParallelMesh(2, 2, 2, device_mesh=init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")))
        config = get_preset("tiny")
        with torch.device("meta"):
            model = build_model(config, kernels=frozenset())
        model = materialize(parallelize(model, config.parallel, DistInfo(world_size=4, local_world_size=2), mesh, False),
                            torch.device("cpu"), 0)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)

        def micro_losses(batch, noise, eps, step):
            out, zs, cls_out = model(batch["x"], torch.tensor([0.3, 0.7]), batch["y"], torch.randn(2, 32))
            return {"total": out.float().square().mean() + sum(z.float().square().mean() for z in zs) + cls_out.float().square().mean()}

        step = FastStep(model, params, optimizer, EMA(model), config, mesh, micro_losses, vote=lambda: torch.zeros(()))
        batch = {"x": torch.randn(2, config.in_channels, 8, 8), "y": torch.tensor([1, 2])}
        with CommDebugMode() as comm, CollectiveCounter(mesh) as counter:
            step(0, batch, _NoNoise(), torch.zeros(2), 0, 2, 1)
        dispatched = comm.get_comm_counts()
        assert set(dispatched) <= set(kind_of), dispatched
        assert {kind_of[op]: n for op, n in dispatched.items()} == dict(counter.calls), (dispatched, counter.calls)
        assert counter.calls["all_gather"] > 0 and counter.calls["reduce_scatter"] > 0 and counter.calls["all_reduce"] > 0
    finally:
        dist.destroy_process_group()


def test_reference_runs_describe_ddp(caplog):
    """--reference runs DDP whatever the degrees say: the mesh is world x 1 and its log line says
    DDP, not FSDP or HSDP; a degree that was set is reported as not applied."""
    from reglue.config import apply_overrides
    from reglue.presets import get_preset
    from reglue.runtime import DistInfo
    from reglue.train.parallelize import run_mesh

    world = DistInfo(world_size=4, local_world_size=2)
    config = apply_overrides(get_preset("tiny"), {"parallel.reference": "true"})
    mesh = run_mesh(config, world)
    assert (mesh.replicate, mesh.shard, mesh.kind, mesh.device_mesh) == (4, 1, "replicate", None)
    assert mesh.describe() == "mesh 4 x 1 (replicate x shard, DDP, the published reference execution) on 2 node(s) of 2 process(es)"
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="reglue.parallelize"):
        mesh = run_mesh(apply_overrides(config, {"parallel.shard_degree": "3"}), world)
    assert (mesh.replicate, mesh.shard) == (4, 1)
    assert "parallel.shard_degree=3: not applied, parallel.reference runs DDP (4 x 1" in caplog.text
