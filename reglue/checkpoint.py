"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, resharding on load, complete or
clearly not.

Layout of ``<run>/checkpoints/step-00001000/``::

    __<rank>_0.distcp   DCP shards of whatever state the caller saves (model, EMA, optimizer)
    .metadata           DCP's index of the shards
    meta.json           step, config, world size, run id, counters
    complete.json       written last: the size and the CRC-32 of every other file

A checkpoint is written into ``step-XXXXXXXX.tmp``; after every rank's shards and the metadata,
each rank computes the CRC-32 of its own shards (``__<rank>_*``, read back from the page cache:
~2.5 GB/s of one core, about 0.5 s per rank for SiT-XL/2's ~11 GB of model, EMA and Adam state
over 8 ranks), rank 0 those of the rest, writes ``complete.json`` and renames the folder. It
counts as complete only when the marker reads and every file it lists is there at its listed
size, so a truncated or missing shard, a missing ``.metadata`` or ``meta.json`` or an unreadable
marker is seen in milliseconds, without reading the shards. Before a checkpoint is loaded (resume,
export, generate, sample) the checksums are verified, each rank a share of the files, so a shard
garbled at its own size is refused instead of loaded as wrong weights; checkpoints written before
checksums were recorded are checked by size only. Resume and export take the newest checkpoint
that *loads*: damaged ones are named in one warning line each and skipped, never deleted. Pruning (``keep_last``) removes only
complete checkpoints of the current run (its ``run_id``), so the newest loadable one always stays.

All randomness of a step is drawn from generators seeded by (seed, step), so the step counter
*is* the RNG state: resuming reproduces the uninterrupted run exactly, at any world size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from reglue.integrity import DamagedFileError, crc32_file, verify_crc32
from reglue.outputs import human_bytes, move_aside
from reglue.runtime import DistInfo, all_gather_object, barrier, broadcast_object

log = logging.getLogger("reglue.checkpoint")

_STEP_DIR = re.compile(r"^step-(\d{8})$")
FORMAT_VERSION = 2
MARKER = "complete.json"
META = "meta.json"
DCP_INDEX = ".metadata"


class CheckpointError(RuntimeError):
    pass


class CheckpointSaveError(CheckpointError):
    """A save that failed (a full disk, a folder gone read-only): its partial files are removed."""


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every call without a process group; a single process is a supported mode here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> List[Path]:
    """Every ``step-XXXXXXXX`` folder of a run, complete or damaged, oldest first (``.tmp``
    leftovers of an interrupted save are not checkpoints)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _read_json_object(path: Path, what: str) -> Dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable {what} ({exc})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object, got {type(value).__name__}")
    return value


def read_meta(path: str | Path) -> Dict[str, Any]:
    """The checkpoint's ``meta.json``, with the types every reader relies on checked."""
    meta = _read_json_object(Path(path) / META, "checkpoint metadata")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format_version')!r} is not supported "
                              f"(expected {FORMAT_VERSION})")
    for key, kind in (("step", int), ("config", dict), ("run_id", str)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{Path(path) / META}: field {key!r} must be a {kind.__name__}, got {meta.get(key)!r:.60}")
    return meta


def checkpoint_damage(path: str | Path) -> Optional[str]:
    """Why the checkpoint at ``path`` cannot be used, or None when it is complete (file checks only)."""
    path = Path(path)
    if not path.is_dir():
        return "no such checkpoint directory"
    if not (path / MARKER).is_file():
        return f"no {MARKER} (the save did not finish)"
    try:
        files = _read_json_object(path / MARKER, "completion marker").get("files")
    except CheckpointError as exc:
        return str(exc).removeprefix(f"{path / MARKER}: ")
    if not isinstance(files, dict) or not all(isinstance(n, str) and isinstance(s, int) for n, s in files.items()):
        return f"unreadable {MARKER} (no file list)"
    for required in (DCP_INDEX, META):
        if required not in files:
            return f"{MARKER} does not list {required}"
    checksums = _marker_checksums(path)
    if checksums is not None and set(checksums) != set(files):
        return f"unreadable {MARKER} (its checksums do not list the same files as its sizes)"
    for name, size in sorted(files.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        actual = file.stat().st_size
        if actual != size:
            return f"{name} is {'truncated' if actual < size else 'larger than written'} ({actual} of {size} bytes)"
    try:
        read_meta(path)
    except CheckpointError as exc:
        return str(exc)
    return None


def _marker_checksums(path: Path) -> Optional[Dict[str, int]]:
    """``{file: CRC-32}`` from the marker; None for a checkpoint saved before checksums (sizes only)."""
    recorded = _read_json_object(path / MARKER, "completion marker").get("crc32")
    if recorded is None:
        return None
    try:
        return {name: int(value, 16) for name, value in recorded.items()}
    except (AttributeError, TypeError, ValueError):
        return {}  # a damaged list: fails the comparison with the file sizes


def content_damage(path: str | Path) -> Optional[str]:
    """Collective: the first file of the checkpoint whose CRC-32 differs from the marker's, or None.
    Each rank reads every world_size-th file (all ranks return the same answer)."""
    path = Path(path)
    checksums = _marker_checksums(path) or {}
    names = sorted(checksums)
    rank, world = (torch_dist.get_rank(), torch_dist.get_world_size()) if torch_dist.is_initialized() else (0, 1)
    problem = None
    for name in names[rank::world]:
        try:
            verify_crc32(path / name, checksums[name], name)
        except DamagedFileError as exc:
            problem = str(exc).removeprefix(f"{path / name}: ")
            break
        except OSError as exc:
            problem = f"{name} is unreadable ({exc.strerror})"
            break
    return next((p for p in all_gather_object(problem) if p is not None), None)


def _own_checksums(tmp: Path, rank: int) -> Dict[str, str]:
    """CRC-32 of the DCP shards this rank wrote (``__<rank>_*.distcp``), as 8 hex digits."""
    return {p.name: f"{crc32_file(p):08x}" for p in sorted(tmp.glob(f"__{rank}_*.distcp"))}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_durable(path: Path, value: Dict[str, Any]) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(value, indent=2, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run_dir, step: int, state: Dict[str, Any], meta: Dict[str, Any], dist_info: DistInfo,
                    keep_last: int) -> Path:
    """Collective: every rank calls it with its ``state`` (DCP state dicts). ``meta`` must hold the
    run's ``run_id`` (pruning keeps to it). Returns the final checkpoint directory."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    if dist_info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # a save interrupted before its rename: never a checkpoint
            shutil.rmtree(tmp)
    barrier()
    error = None
    try:
        with _quiet_single_process():
            dcp.save(state, checkpoint_id=str(tmp))
    except (CheckpointException, OSError, RuntimeError) as exc:  # DCP raises it on every rank
        error = _save_failure(root, tmp, exc)
        barrier()  # every rank has measured the partial files before rank 0 removes them
    else:
        try:  # every rank's shards and DCP's index are written (and fsynced by DCP) once all have returned
            own = _own_checksums(tmp, dist_info.rank)
        except OSError as exc:
            own = _save_failure(root, tmp, exc)
        gathered = all_gather_object(own)  # also the barrier after the shards
        if dist_info.is_main:
            error = next((g for g in gathered if isinstance(g, str)), None)
            try:
                if error is None:
                    meta = dict(meta, step=step, world_size=dist_info.world_size, format_version=FORMAT_VERSION)
                    _write_json_durable(tmp / META, meta)
                    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
                    checksums = {name: crc for g in gathered for name, crc in g.items()}
                    checksums.update({name: f"{crc32_file(tmp / name):08x}" for name in files if name not in checksums})
                    _write_json_durable(tmp / MARKER, {"step": step, "run_id": meta["run_id"], "files": files,
                                                       "crc32": {name: checksums[name] for name in files}})
            except OSError as exc:
                error = _save_failure(root, tmp, exc)
        if dist_info.world_size > 1:
            error = broadcast_object(error)  # the ranks leave together, saved or not
    if error is not None:
        if dist_info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # partial files only: no earlier checkpoint is touched
        raise CheckpointSaveError(f"saving checkpoint {final} failed: {error}; the partial {tmp.name} was removed "
                                  f"and the earlier checkpoints are intact (free space, then resume: --resume auto)")
    if dist_info.is_main:
        if final.exists():  # a damaged checkpoint, or one of a rewound run: kept, renamed
            log.warning("%s already exists; moved to %s", final, move_aside(final, "replaced"))
        os.replace(tmp, final)
        _fsync(root)
        prune(run_dir, meta["run_id"], keep_last)
    barrier()
    return final


def _save_failure(root: Path, tmp: Path, exc: BaseException) -> str:
    """What went wrong in one line, with the free space (a full disk is the usual cause and the
    writers' own messages rarely say so)."""
    cause = _failures(exc)[0]
    while not isinstance(cause, OSError) and (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__  # the OSError under a wrapper, if any
    if isinstance(cause, OSError) and cause.strerror:
        reason = f"{cause.filename}: {cause.strerror}" if cause.filename else cause.strerror
    else:
        text = str(cause).strip().splitlines()
        reason = f"{type(cause).__name__}: {text[0] if text else ''}"
    partial = 0
    for folder, _, names in os.walk(tmp):  # files may vanish meanwhile (another rank's cleanup): count what is there
        for name in names:
            with contextlib.suppress(OSError):
                partial += os.stat(os.path.join(folder, name)).st_size
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return reason
    return f"{reason} ({human_bytes(free)} free there, {human_bytes(partial)} of the checkpoint written)"


def prune(run_dir, run_id: str, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` *complete* checkpoints of run ``run_id``; damaged
    checkpoints and other runs' checkpoints are never touched."""
    own = [p for p in list_checkpoints(run_dir) if checkpoint_damage(p) is None and read_meta(p)["run_id"] == run_id]
    for old in own[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _failures(exc: BaseException) -> List[BaseException]:
    """The underlying errors of a DCP ``CheckpointException`` (one per failed rank), or ``[exc]``."""
    failures = getattr(exc, "failures", None) or {}
    return [f[0] if isinstance(f, tuple) else f for f in failures.values()] or [exc]


def load_checkpoint(path: str | Path, state: Dict[str, Any]) -> Dict[str, Any]:
    """Collective: fill ``state`` (DCP state dicts, resharded to this world size) in place from the
    checkpoint; returns its meta. Damage raises :class:`CheckpointError` naming the checkpoint.

    DCP reports failures as ``CheckpointException``, a ``BaseException`` (not an ``Exception``)
    raised on every rank, so all ranks see the same failure and can fall back together."""
    damage = checkpoint_damage(path) or content_damage(path)
    if damage is not None:
        raise CheckpointError(f"{path}: {damage}")
    meta = read_meta(path)
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path))
    except (CheckpointException, Exception) as exc:
        causes = _failures(exc)
        interrupt = next((c for c in causes if isinstance(c, (KeyboardInterrupt, SystemExit))), None)
        if interrupt is not None:  # DCP wraps every BaseException, a Ctrl-C during the load too
            raise interrupt from None
        first = str(causes[0]).strip().splitlines()
        raise CheckpointError(f"{path}: does not load ({type(causes[0]).__name__}: {first[0][:200] if first else ''})") from exc
    return meta


def training_state(model, optimizer, ema=None) -> Dict[str, Any]:
    """The DCP state of a training run: model, optimizer and (if any) EMA, under wrapper-free names."""
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


def apply_training_state(model, optimizer, ema, state: Dict[str, Any]) -> None:
    """Load a :func:`training_state` (filled by :func:`load_checkpoint`) into the live objects."""
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    if ema is not None:
        ema.load_state_dict(state["ema"])


def load_newest(run_dir, load: Callable[[Path], Dict[str, Any]], dist_info: Optional[DistInfo] = None
                ) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """Collective: ``load(path)`` the newest checkpoint of the run that loads; (path, meta), or None
    when the run has no checkpoint. Each damaged or failing one is named in one warning line (with
    the reason) and skipped, never deleted; the caller says which one it used. When none loads,
    :class:`CheckpointError` lists them all.

    ``load`` must raise :class:`CheckpointError` on every rank alike (:func:`load_checkpoint` does)."""
    is_main = dist_info is None or dist_info.is_main
    found = [(str(p), checkpoint_damage(p)) for p in reversed(list_checkpoints(run_dir))] if is_main else None
    found = broadcast_object(found)
    problems = []
    for path, damage in found:
        if damage is None:
            try:
                meta = load(Path(path))
            except CheckpointError as exc:
                damage = str(exc).removeprefix(f"{path}: ")
            else:
                return Path(path), meta
        problems.append(f"{Path(path).name} ({damage})")
        if is_main:
            log.warning("skipping damaged checkpoint %s: %s", path, damage)
    if problems:
        raise CheckpointError(f"none of the {len(problems)} checkpoints in {checkpoint_dir(run_dir)} loads: "
                              + "; ".join(problems) + " (nothing was deleted)")
    return None


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint of a run (file checks only), or None."""
    for path in reversed(list_checkpoints(run_dir)):
        if checkpoint_damage(path) is None:
            return path
    return None


def load_weights(path: str | Path, model, which: str = "ema") -> Dict[str, Any]:
    """Single-process: load only the model or EMA weights of a checkpoint into a plain ``model``."""
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    state = {which: dict(model.state_dict())}
    meta = load_checkpoint(path, state)
    model.load_state_dict(state[which], strict=True)
    return meta


def load_run_weights(run: Optional[str] = None, checkpoint: Optional[str] = None, which: str = "ema"):
    """(config, plain eager model with the chosen weights, checkpoint path) of a given checkpoint,
    or of a run's newest checkpoint that loads (damaged newer ones are named and skipped), on the
    CPU, in one process (no process group needed)."""
    from reglue.config import Config
    from reglue.models import build_model

    def load(path: Path):
        meta = read_meta(path)
        model = build_model(Config.from_dict(meta["config"]), kernels="eager")
        load_weights(path, model, which)
        return meta, model

    if checkpoint:
        meta, model = load(Path(checkpoint))
        return Config.from_dict(meta["config"]), model, Path(checkpoint)
    if not run:
        raise CheckpointError("give --run DIR or --checkpoint DIR")
    loaded = {}

    def attempt(path: Path) -> Dict[str, Any]:
        meta, loaded["model"] = load(path)
        return meta

    found = load_newest(run, attempt)
    if found is None:
        raise CheckpointError(f"{run}: no checkpoint under {checkpoint_dir(run)}")
    path, meta = found
    return Config.from_dict(meta["config"]), loaded["model"], path
