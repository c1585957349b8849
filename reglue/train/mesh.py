"""The run's device mesh, built once, and the bytes its collectives move.

After torchtitan's ``ParallelDims``: one mesh of two named dimensions, ``replicate`` x ``shard``,
from what torchrun sets (``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``). FSDP2 shards the parameters,
gradients and optimizer state over a ``shard`` group and keeps one copy per ``replicate`` group
(HSDP); every parallel decision takes the :class:`ParallelMesh` (``fully_shard(mesh=...)``, the
gradient norm's sum over copies, the collective counter's node membership), never a rank formula
of its own. Ranks are laid out row-major, ``rank = r * shard + s``, so a shard group is
``shard`` consecutive ranks: within one node whenever ``shard`` divides the processes per node.

Per step, per rank, FSDP2 all-gathers each block's parameters in the forward and again in the
backward (``reshard_after_forward``) and reduce-scatters its gradients, all over the shard group;
HSDP adds an all-reduce of the gradient shard over the replicate group (across nodes). On one
node the default is flat FSDP over its GPUs; on N nodes, HSDP N x GPUs-per-node.

:class:`CollectiveCounter` counts those bytes from the ``torch.distributed`` calls actually
issued (FSDP2 in torch 2.14 calls ``all_gather_single``, ``reduce_scatter_single`` and
``all_reduce``; the deprecated ``*_into_tensor`` / ``*_tensor`` names are counted too), per kind
and split into within one node and across nodes by the ranks of the call's process group. The
bytes of a call are the size of the whole buffer it operates on: the all-gather's output, the
reduce-scatter's input, the all-reduce's tensor (what one rank ends up with or contributes in
full; a ring moves (n - 1) / n of it per rank, 2 (n - 1) / n for an all-reduce). Calls on a
group of one rank move nothing and are not counted.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional

import torch
import torch.distributed as dist

from reglue.config import ConfigError, ParallelConfig
from reglue.runtime import DistInfo

log = logging.getLogger("reglue.parallelize")

MESH_DIMS = ("replicate", "shard")


def mesh_shape(cfg: ParallelConfig, world_size: int, local_world_size: int) -> tuple:
    """(replicate, shard) for ``parallel.replicate_degree`` / ``shard_degree`` on this world.

    A shape that does not multiply to the world size raises :class:`ConfigError`; an explicit
    shape whose shard groups span nodes is logged as a warning (it is what the user asked for)."""
    rep, shard = cfg.replicate_degree, cfg.shard_degree
    if rep == "auto" and shard == "auto":
        if world_size % local_world_size:
            raise ConfigError(f"parallel.shard_degree: auto shards over the {local_world_size} processes of a node, "
                              f"which do not divide the world size {world_size}; set parallel.shard_degree")
        shard = local_world_size
    for name, given in (("shard_degree", shard), ("replicate_degree", rep)):
        if given != "auto" and world_size % given:
            raise ConfigError(f"parallel.{name}: {given} does not divide the world size {world_size}")
    if rep == "auto":
        rep = world_size // shard
    elif shard == "auto":
        shard = world_size // rep
    if rep * shard != world_size:
        raise ConfigError(f"parallel.replicate_degree x parallel.shard_degree: {rep} x {shard} = {rep * shard}, "
                          f"not the world size {world_size}")
    if local_world_size % shard:
        log.warning("parallel.shard_degree=%d puts each shard group across nodes (%d processes per node): every "
                    "all-gather and reduce-scatter crosses the network", shard, local_world_size)
    return rep, shard


@dataclass
class ParallelMesh:
    """The run's mesh: ``replicate`` x ``shard`` ranks, ``local_world_size`` ranks per node, and
    the ``DeviceMesh`` (None when the run does not shard: one process on the CPU, or DDP)."""

    replicate: int = 1
    shard: int = 1
    local_world_size: int = 1
    device_mesh: Optional[object] = field(default=None, repr=False)
    ddp: bool = False
    """The published reference execution (``parallel.reference``): DDP, every rank a whole copy."""

    @property
    def world_size(self) -> int:
        return self.replicate * self.shard

    @property
    def kind(self) -> str:
        if self.world_size == 1:
            return "single"
        return "replicate" if self.shard == 1 else ("fsdp" if self.replicate == 1 else "hsdp")

    @property
    def fsdp_mesh(self):
        """What ``fully_shard`` takes: the 2-D mesh (HSDP) when there are copies to all-reduce,
        else the 1-D shard mesh (flat FSDP, one process group)."""
        return self.device_mesh if self.replicate > 1 else self.device_mesh["shard"]

    def node_of(self, rank: int) -> int:
        return rank // self.local_world_size

    def spans_nodes(self, ranks: Iterable[int]) -> bool:
        return len({self.node_of(r) for r in ranks}) > 1

    def summary(self) -> Dict:
        return {"kind": self.kind, "replicate": self.replicate, "shard": self.shard,
                "nodes": -(-self.world_size // self.local_world_size), "processes_per_node": self.local_world_size}

    def describe(self) -> str:
        s = self.summary()
        what = "DDP, the published reference execution" if self.ddp else self.kind
        return (f"mesh {self.replicate} x {self.shard} (replicate x shard, {what}) on {s['nodes']} node(s) "
                f"of {self.local_world_size} process(es)")


def init_single_process_group(dist_info: DistInfo) -> None:
    """FSDP2 needs a process group even for one GPU: a world of one on a local store."""
    import tempfile

    store = dist.FileStore(tempfile.mktemp(prefix="reglue-pg-"), 1)
    backend = "nccl" if dist_info.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=0, world_size=1)


def ddp_mesh(cfg: ParallelConfig, dist_info: DistInfo) -> ParallelMesh:
    """The mesh of a ``parallel.reference`` run: DDP replicates the whole model on every rank
    (world x 1); the degree settings do not apply, and a set one is logged as a warning."""
    set_degrees = [f"parallel.{name}={value}" for name, value in
                   (("replicate_degree", cfg.replicate_degree), ("shard_degree", cfg.shard_degree)) if value != "auto"]
    if set_degrees:
        log.warning("%s: not applied, parallel.reference runs DDP (%d x 1: every rank holds the whole model)",
                    ", ".join(set_degrees), dist_info.world_size)
    return ParallelMesh(dist_info.world_size, 1, dist_info.local_world_size, ddp=True)


def build_mesh(cfg: ParallelConfig, dist_info: DistInfo, shards: bool) -> ParallelMesh:
    """The run's :class:`ParallelMesh`; with ``shards`` (FSDP2 runs) its ``DeviceMesh`` too."""
    from torch.distributed.device_mesh import init_device_mesh

    rep, shard = mesh_shape(cfg, dist_info.world_size, dist_info.local_world_size)
    mesh = ParallelMesh(rep, shard, dist_info.local_world_size)
    if shards:
        if not dist.is_initialized():
            init_single_process_group(dist_info)
        shape, names = ((rep, shard), MESH_DIMS) if rep > 1 else ((shard,), ("shard",))
        mesh.device_mesh = init_device_mesh(dist_info.device.type, shape, mesh_dim_names=names)
    return mesh


# --------------------------------------------------------------------------------------------
# What the collectives move
# --------------------------------------------------------------------------------------------

_COUNTED = {  # torch.distributed function -> (kind, the argument that holds the whole buffer)
    "all_gather_single": ("all_gather", "output_tensor"),
    "all_gather_into_tensor": ("all_gather", "output_tensor"),
    "reduce_scatter_single": ("reduce_scatter", "input"),
    "reduce_scatter_tensor": ("reduce_scatter", "input"),
    "all_reduce": ("all_reduce", "tensor"),
}
KINDS = ("all_gather", "reduce_scatter", "all_reduce")
WHERE = ("within_node", "across_nodes")


class CollectiveCounter:
    """Bytes of the collectives this rank issues inside the ``with`` block, by kind and by where
    they go (:data:`WHERE`); see the module docstring for what a call's bytes are."""

    def __init__(self, mesh: ParallelMesh):
        self.mesh = mesh
        self.bytes: Dict[str, Dict[str, int]] = {kind: dict.fromkeys(WHERE, 0) for kind in KINDS}
        self.calls: Dict[str, int] = defaultdict(int)
        self._depth = 0  # a deprecated name calling its successor is one collective
        self._stack = contextlib.ExitStack()

    def _wrap(self, name: str, original):
        kind, buffer_arg = _COUNTED[name]
        signature = inspect.signature(original)

        def counted(*args, **kwargs):
            if self._depth == 0:
                bound = signature.bind(*args, **kwargs).arguments
                group = bound.get("group") or dist.group.WORLD
                ranks = dist.get_process_group_ranks(group)
                if len(ranks) > 1:
                    tensor = bound[buffer_arg]
                    where = WHERE[self.mesh.spans_nodes(ranks)]
                    self.bytes[kind][where] += tensor.numel() * tensor.element_size()
                    self.calls[kind] += 1
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def __enter__(self) -> "CollectiveCounter":
        for name in _COUNTED:
            original = getattr(dist, name)
            self._stack.callback(setattr, dist, name, original)
            setattr(dist, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def total(self, where: str) -> int:
        return sum(self.bytes[kind][where] for kind in KINDS)

    def record(self, num_params: int) -> Dict:
        """Bytes and bytes per parameter of what was counted, for a metrics record."""
        return {"bytes": {k: dict(v) for k, v in self.bytes.items()},
                "bytes_per_param": {k: {w: b / num_params for w, b in v.items()} for k, v in self.bytes.items()},
                "calls": dict(self.calls), "within_node_bytes": self.total("within_node"),
                "across_nodes_bytes": self.total("across_nodes")}

    def describe(self, num_params: int) -> str:
        parts = [f"{kind} {w.replace('_', ' ')} {self.bytes[kind][w] / num_params:.2f}" for kind in KINDS for w in WHERE if self.bytes[kind][w]]
        per = lambda w: self.total(w) / num_params  # noqa: E731
        return (f"collective bytes per rank per step: {self.total('within_node') / 2**20:.1f} MiB within a node "
                f"({per('within_node'):.2f} B/param), {self.total('across_nodes') / 2**20:.1f} MiB across nodes "
                f"({per('across_nodes'):.2f} B/param); by kind, B/param: {', '.join(parts) or 'none'}")


def model_parameters(model: torch.nn.Module) -> int:
    """Parameters of the (possibly sharded) model: global element counts, not local shards."""
    return sum(p.numel() for p in model.parameters())
