"""What every layer above the models shares: the process group, collectives, seeding, batch
splitting and parameter names without execution wrappers.

It sits low (only torch below it) so that data, evaluation and train code, and the command
line, import it without pointing up the layers.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from tqdm import tqdm

@contextlib.contextmanager
def progress_bar(enabled: bool = True, **tqdm_kwargs) -> Iterator["tqdm"]:
    """A tqdm bar (a silent one unless ``enabled``: rank 0, progress asked for). While it is open,
    console log lines are written above it (``tqdm.contrib.logging``) instead of through it: a
    log line in mid-bar used to break the bar in two."""
    import logging
    import sys

    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    console = any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)
                  for h in logging.root.handlers)  # a library caller without a console handler gets none added
    redirect = logging_redirect_tqdm() if enabled and console else contextlib.nullcontext()
    with tqdm(disable=not enabled, dynamic_ncols=True, **tqdm_kwargs) as bar, redirect:
        yield bar


MAX_DEFAULT_WORKERS = 8


def default_workers() -> int:
    """DataLoader workers by default: the CPUs this process may use (its affinity, which a
    container or ``taskset`` narrows), less one for the main process, at most 8; 0 on one CPU."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform (macOS)
        cpus = os.cpu_count() or 1
    return max(0, min(MAX_DEFAULT_WORKERS, cpus - 1))


WORKERS_HELP = "(default: the CPUs this process may use less one, at most 8: {} here)"


# --------------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    local_world_size: int = 1
    """Processes per node (torchrun's ``LOCAL_WORLD_SIZE``): ranks ``n * local_world_size ...
    (n + 1) * local_world_size - 1`` run on node ``n``."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_ROUND_KEYS = "reglue/round"
"""Keys of the round handshake in torchrun's store: the ``events`` queue, ``welcome/<nonce>``
and, per round, ``<round id>/`` (the prefix the process group's keys get)."""


def _round_prefix(store, rank: int, world_size: int) -> str:
    """The key prefix of this torchrun round, the same for every worker of the round and new in
    every round, whatever earlier rounds left in ``store``.

    Rank 0 (one per round) names the round with a fresh random id; every other rank announces
    itself with a fresh random nonce on a queue (``hello <nonce>``), waits for the id under a
    key that only its nonce names (``welcome/<nonce>``, so no earlier round's answer can be
    read), and confirms with ``ready <round id>``. Rank 0 answers every hello it pops, an earlier
    round's left-over ones too (their askers are gone; the answer is never read), and returns
    once ``world_size - 1`` confirmations of its own id came back. Nothing counts joins across
    rounds, so a worker that died anywhere before or during the handshake changes nothing for
    the rounds after it. Workers of one round must not meet those of another in the handshake:
    torchrun's agents stop all their workers before the next rendezvous completes.
    """
    events = f"{_ROUND_KEYS}/events"
    if rank == 0:
        round_id, ready = uuid.uuid4().hex, 0
        while ready < world_size - 1:  # each pop waits up to the store's timeout
            kind, value = store.queue_pop(events).decode().split(" ", 1)
            if kind == "hello":
                store.set(f"{_ROUND_KEYS}/welcome/{value}", round_id)
            elif value == round_id:
                ready += 1
    else:
        nonce = uuid.uuid4().hex
        store.queue_push(events, f"hello {nonce}")
        welcome = f"{_ROUND_KEYS}/welcome/{nonce}"
        round_id = store.get(welcome).decode()
        store.delete_key(welcome)
        store.queue_push(events, f"ready {round_id}")
    return f"{_ROUND_KEYS}/{round_id}"


def _elastic_store(rank: int, world_size: int, timeout: datetime.timedelta):
    """The store of this torchrun round: the agent's store, keys prefixed by the round
    (:func:`_round_prefix`). None when not under torchrun's agent store.

    torchrun keeps one store server for the whole job, and torch's ``env://`` handler connects
    every round of workers to it without a prefix (torch 2.14, ``rendezvous._create_c10d_store``:
    "We create a new TCPStore for every retry"), so the workers restarted after a failure find
    the keys of the round before (its ranks' addresses, its barrier counts) and hang in
    ``init_process_group``. Nothing torchrun hands its workers names the round:
    ``TORCHELASTIC_RESTART_COUNT`` differs between nodes (an agent whose workers were still
    healthy when another node re-joined restarts them without counting a restart), the master
    port stays the job's, and the rendezvous round number lives in the rendezvous backend's
    store, whose address the workers are not told. Hence the handshake of :func:`_round_prefix`.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(_round_prefix(store, rank, world_size), store)


def init_distributed(timeout_minutes: int = 30) -> DistInfo:
    """Read RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE (torchrun) and start the process group when
    world size > 1 (nccl on CUDA, gloo on the CPU); under torchrun on a store of this round
    (:func:`_elastic_store`), so a run restarted by ``--max-restarts`` starts again."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=timeout_minutes)
        store = _elastic_store(rank, world_size, timeout)
        dist.init_process_group(
            backend=backend, timeout=timeout, device_id=device if device.type == "cuda" else None,
            **({} if store is None else {"store": store, "rank": rank, "world_size": world_size}),
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, local_world_size=local_world_size)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; returns ``t`` (a no-op in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, into a copy (a no-op in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = all_reduce_sum(t.clone())
        t /= dist.get_world_size()
    return t


def broadcast_object(obj, src: int = 0):
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [None] * dist.get_world_size()
        dist.all_gather_object(box, obj)
        return box
    return [obj]


def shutdown() -> None:
    """Take the process groups down so that their communication threads end here, not at exit.

    ``destroy_process_group`` only drops torch's own references to a group; a gloo group's worker
    threads stop when the last reference goes. Two outlive it otherwise, measured on torch 2.14
    (thread names in ``/proc/self/task``, ``tests/train/test_distributed.py``): a finished
    trainer still in a reference cycle holds its DDP model, whose reducer holds the group (freed
    by the collection below), and DTensor's caches (sharding propagation, redistribution plans,
    mesh topology) hold the FSDP2 ``DeviceMesh``, which holds its groups by name. A group first
    freed while the interpreter shuts down can abort the process after a complete run
    (``terminate called without an active exception``: a gloo thread releasing a tensor after
    Python has gone, pytorch PR 179291), which torchrun reports as a failed worker."""
    if not dist.is_initialized():
        return
    from torch.distributed.device_mesh import DeviceMesh

    gc.collect()
    dist.destroy_process_group()
    for obj in gc.get_objects():
        if isinstance(obj, DeviceMesh) and isinstance(getattr(obj, "_pg_registry", None), dict):
            obj._pg_registry.clear()  # the groups of a mesh whose groups are destroyed: kept only by caches
    gc.collect()


# --------------------------------------------------------------------------------------------
# Seeding and batch splitting
# --------------------------------------------------------------------------------------------

_SEED_MOD = 2**63


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (seed, step, index, ...): distinct tuples give
    distinct, well-spread seeds, and the result depends on nothing but the tuple."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = (h * 1_000_003 + int(p) + 0x9E3779B97F4A7C15) % _SEED_MOD
    return h


def seeded_generator(*parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded by :func:`mix_seed` of ``parts``."""
    return torch.Generator(device=device).manual_seed(mix_seed(*parts))


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """The global CPU RNG seeded with ``seed`` inside the block and restored after it: a random
    network built in the block (a tiny test encoder, a compressor's initial weights) is a function
    of ``seed`` alone, the same on every rank and in every process, and the caller's RNG stream
    is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def per_rank_batch(global_batch_size: int, world_size: int, what: str = "global batch size") -> int:
    """The share of one rank; ``what`` names the setting in the error when it does not divide."""
    if global_batch_size % world_size:
        raise ValueError(f"{what} {global_batch_size} is not divisible by the world size {world_size}")
    return global_batch_size // world_size


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------

_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def clean_name(name: str) -> str:
    """Parameter name without activation-checkpoint, compile, FSDP or DDP (``module.``) wrapper
    segments: the checkpoint FQN, the same at every world size and execution mode."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    while name.startswith("module."):
        name = name[len("module."):]
    return name
