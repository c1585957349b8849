"""The mesh shape from the config and the world, the collective counter in one process, and the
per-round store under torchrun (multi-process runs: tests/train/test_multinode.py)."""

import datetime
import logging

import pytest
import torch
import torch.distributed as dist

from reglue.config import ConfigError, ParallelConfig
from reglue.runtime import _elastic_store
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


def test_each_torchrun_round_gets_fresh_store_keys(monkeypatch):
    """The agent's store outlives the workers; the workers of round 1 must not see the keys that
    round 0 left there, whatever their TORCHELASTIC_RESTART_COUNT says."""
    timeout = datetime.timedelta(seconds=30)
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timeout, wait_for_workers=False)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    round0 = [_elastic_store(2, timeout) for _ in range(2)]
    round0[0].set("rank0_address", "old")
    round1 = [_elastic_store(2, timeout) for _ in range(2)]
    assert round1[1].check(["rank0_address"]) is False
    round1[0].set("rank0_address", "new")
    assert round1[1].get("rank0_address") == b"new" and round0[1].get("rank0_address") == b"old"
    shrunk = _elastic_store(1, timeout)  # an elastic round of another size, then a full one again
    assert shrunk.check(["rank0_address"]) is False
    round2 = [_elastic_store(2, timeout) for _ in range(2)]
    round2[0].set("rank0_address", "newer")
    assert round2[1].get("rank0_address") == b"newer" and round1[1].get("rank0_address") == b"new"
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert _elastic_store(2, timeout) is None


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
