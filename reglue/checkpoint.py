"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, resharding on load, atomic.

Layout: ``<run>/checkpoints/step-00001000/`` holds the DCP shards of the model, the EMA and the
optimizer, plus ``meta.json`` (step, config, world size, data position, counters). A checkpoint
is written into ``step-XXXXXXXX.tmp`` and renamed once every rank has finished, so a crash never
leaves a half-written checkpoint as the latest one; only the last ``keep_last`` are kept.

All randomness of a step is drawn from generators seeded by (seed, step), so the step counter
*is* the RNG state: resuming reproduces the uninterrupted run exactly, at any world size.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from reglue.runtime import DistInfo, barrier, broadcast_object

_STEP_DIR = re.compile(r"^step-(\d{8})$")
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every call without a process group; a single process is a supported mode here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path):
    """Finished checkpoints of a run, oldest first (``.tmp`` leftovers are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "meta.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def read_meta(path: str | Path) -> Dict[str, Any]:
    meta_file = Path(path) / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a reglue checkpoint (no meta.json)")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_file} is corrupt: {exc}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format_version')} is not supported (expected {FORMAT_VERSION})")
    return meta


def save_checkpoint(run_dir, step: int, model, optimizer, ema, meta: Dict[str, Any], dist_info: DistInfo, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    if dist_info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    barrier()
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
        "ema": ema.state_dict(),
    }
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=str(tmp))
    barrier()
    if dist_info.is_main:
        meta = dict(meta, step=step, world_size=dist_info.world_size, format_version=FORMAT_VERSION)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: str | Path, model, optimizer, ema) -> Dict[str, Any]:
    """Collective: restore model, optimizer and EMA in place (resharded to this world size)."""
    meta = read_meta(path)
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
        "ema": ema.state_dict(),
    }
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path))
    except Exception as exc:  # DCP raises several types; name the checkpoint and keep the cause
        raise CheckpointError(f"cannot load checkpoint {path}: {exc}") from exc
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    ema.load_state_dict(state["ema"])
    return meta


def load_weights(path: str | Path, model, which: str = "ema") -> Dict[str, Any]:
    """Single-process: load only the model or EMA weights of a checkpoint into a plain ``model``."""
    meta = read_meta(path)
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    state = {which: dict(model.state_dict())}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state[which], strict=True)
    return meta


def _latest_readable(run_dir) -> Optional[Path]:
    """Newest checkpoint whose meta.json reads; an unreadable one (disk damage: writes are atomic)
    is reported and skipped, so an older good checkpoint is used rather than none."""
    import logging

    for path in reversed(list_checkpoints(run_dir)):
        try:
            read_meta(path)
            return path
        except CheckpointError as exc:
            logging.getLogger("reglue.checkpoint").warning("skipping unreadable checkpoint: %s", exc)
    return None


def resolve_resume(resume: str, run_dir: str | Path, dist_info: DistInfo) -> Optional[Path]:
    """``auto``: the latest finished checkpoint of the run, if any; ``none``; or an explicit path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = _latest_readable(run_dir) if dist_info.is_main else None
        found = broadcast_object(str(found) if found else None)
        return Path(found) if found else None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"--resume {resume}: not a finished reglue checkpoint directory (no meta.json)")
    return path


def _run_checkpoint(run: Optional[str], checkpoint: Optional[str]) -> Path:
    if checkpoint:
        return Path(checkpoint)
    if not run:
        raise CheckpointError("give --run DIR or --checkpoint DIR")
    found = latest_checkpoint(run)
    if found is None:
        raise CheckpointError(f"{run}: no finished checkpoint under {checkpoint_dir(run)}")
    return found


def load_run_weights(run: Optional[str] = None, checkpoint: Optional[str] = None, which: str = "ema"):
    """(config, plain eager model with the chosen weights, checkpoint path) of a run's latest (or
    a given) checkpoint, on the CPU, in one process (no process group needed)."""
    from reglue.config import Config
    from reglue.models import build_model

    path = _run_checkpoint(run, checkpoint)
    config = Config.from_dict(read_meta(path)["config"])
    model = build_model(config, kernels="eager")
    load_weights(path, model, which)
    return config, model, path
