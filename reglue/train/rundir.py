"""Whose run directory is this? Decided before anything is written into it.

``<out>/<name>`` may hold a run already (checkpoints, ``metrics.jsonl``, ``config.json``). A new
run never mixes with it or overwrites it silently:

- ``--resume auto`` continues it when its newest complete checkpoint (or, before the first
  checkpoint, its ``config.json``) has the same model, method, encoders, seed, global batch and
  image size; otherwise the run is refused, naming what is there;
- ``--resume none`` in an occupied directory is refused the same way;
- ``--resume PATH`` (a checkpoint of this or another run) starts in an empty directory, or
  continues this run when PATH is one of its own checkpoints;
- ``--overwrite`` moves whatever run is there aside (``<name>.replaced-<time>``) and starts
  afresh: nothing is deleted.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from reglue import checkpoint as ckpt
from reglue.config import Config
from reglue.outputs import move_aside, setting_differences

log = logging.getLogger("reglue.train")

# Sections that must match when resuming: they change what the weights mean, or (seed, global
# batch) which samples and noise each step draws.
_RESUME_LOCKED = ("model", "method", "encoders")
_RESUME_LOCKED_FIELDS = (("train", "seed"), ("train", "global_batch_size"), ("data", "image_size"))
_FREE_MODEL_FIELDS = ("kernels", "attention", "dtype")


class RunDirError(ckpt.CheckpointError):
    """The run directory holds something this run must not overwrite or mix with."""


def config_differences(saved: Dict, config: Config) -> List[str]:
    """The resume-locked fields on which a saved config (a dict) and ``config`` differ."""
    current = config.to_dict()
    # A field the saved config lacks was added after it was written: it had the field's default.
    defaults = type(config)().to_dict()
    fields = [(section, k) for section in _RESUME_LOCKED for k in current[section] if k not in _FREE_MODEL_FIELDS]
    fields = [(section, k) for section, k in fields + list(_RESUME_LOCKED_FIELDS) if isinstance(saved.get(section), dict)]
    return setting_differences({f"{section}.{k}": saved[section].get(k, defaults[section][k]) for section, k in fields},
                               {f"{section}.{k}": current[section][k] for section, k in fields})


def check_resume_config(saved: Dict, config: Config, path) -> None:
    diffs = config_differences(saved, config)
    if diffs:
        raise RunDirError(f"cannot resume from {path}: the run's settings changed: " + "; ".join(diffs)
                          + " (start a new run with another --name, or --overwrite to move the old run aside)")


@dataclass
class RunPlan:
    """What the trainer does with its run directory."""

    resume_from: Optional[str]
    """``auto``: the newest checkpoint of the run that loads; a checkpoint path; or None (fresh)."""
    run_id: str
    """Identity of the run, kept across resumes; pruning touches only this run's checkpoints."""


def _contents(run_dir: Path) -> List[str]:
    """A short description of the run outputs found in ``run_dir`` (empty: nothing there)."""
    found = []
    checkpoints = ckpt.list_checkpoints(run_dir)
    if checkpoints:
        found.append(f"{len(checkpoints)} checkpoint{'s' * (len(checkpoints) > 1)} (newest {checkpoints[-1].name})")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        rows = sum(1 for line in metrics.read_text().splitlines() if line.strip())
        found.append(f"metrics.jsonl ({rows} rows)")
    if (run_dir / "config.json").is_file():
        found.append("config.json")
    return found


def _saved_config(path: Path) -> Optional[Dict]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _refuse(run_dir: Path, contents: List[str], why: str) -> RunDirError:
    return RunDirError(f"{run_dir} holds another run ({', '.join(contents)}): {why}. Use another --name or --out, "
                       "or --overwrite to move the old run aside (nothing is deleted)")


def plan_run(config: Config, run_dir: Path, overwrite: bool) -> RunPlan:
    """Rank 0: inspect ``run_dir`` and decide (see the module docstring); may move the old run aside."""
    resume = config.train.resume
    contents = _contents(run_dir)
    if contents and not overwrite:
        return _plan_occupied(config, run_dir, resume, contents)
    if contents:
        if resume not in ("auto", "none") and Path(resume).resolve().is_relative_to(run_dir.resolve()):
            raise RunDirError(f"--overwrite would move {run_dir} aside, with the checkpoint --resume {resume} names")
        aside = move_aside(run_dir, "replaced")
        log.warning("--overwrite: moved the previous run in %s to %s", run_dir, aside)
    if resume not in ("auto", "none"):
        damage = ckpt.checkpoint_damage(resume)
        if damage is not None:
            raise ckpt.CheckpointError(f"--resume {resume}: {damage}")
        _check_not_past(resume, ckpt.read_meta(resume), config)
        return RunPlan(resume_from=resume, run_id=uuid.uuid4().hex)
    return RunPlan(resume_from=None, run_id=uuid.uuid4().hex)


def _plan_occupied(config: Config, run_dir: Path, resume: str, contents: List[str]) -> RunPlan:
    checkpoints = ckpt.list_checkpoints(run_dir)
    if resume == "none":
        raise _refuse(run_dir, contents, "--resume none starts a new run")
    if resume != "auto":
        path = Path(resume)
        if path.resolve().parent != ckpt.checkpoint_dir(run_dir).resolve():
            raise _refuse(run_dir, contents, f"--resume {resume} is not one of its checkpoints")
        damage = ckpt.checkpoint_damage(path)
        if damage is not None:
            raise ckpt.CheckpointError(f"--resume {resume}: {damage}")
        meta = ckpt.read_meta(path)
        _check_same_run(run_dir, contents, meta["config"], config)
        _check_not_past(path, meta, config)
        return RunPlan(resume_from=str(path), run_id=meta["run_id"])
    complete = [p for p in checkpoints if ckpt.checkpoint_damage(p) is None]
    if complete:
        meta = ckpt.read_meta(complete[-1])
        _check_same_run(run_dir, contents, meta["config"], config)
        _check_not_past(run_dir, meta, config)
        return RunPlan(resume_from="auto", run_id=meta["run_id"])
    if checkpoints:
        reasons = "; ".join(f"{p.name}: {ckpt.checkpoint_damage(p)}" for p in reversed(checkpoints))
        raise _refuse(run_dir, contents, f"none of its checkpoints is complete ({reasons})")
    saved = _saved_config(run_dir / "config.json")
    if saved is None:
        raise _refuse(run_dir, contents, "its config.json is missing or unreadable")
    _check_same_run(run_dir, contents, saved, config)
    log.info("%s: the run had not saved a checkpoint yet; starting it again from step 0", run_dir)
    return RunPlan(resume_from=None, run_id=uuid.uuid4().hex)


def _check_same_run(run_dir: Path, contents: List[str], saved: Dict, config: Config) -> None:
    diffs = config_differences(saved, config)
    if diffs:
        raise _refuse(run_dir, contents, "its settings differ (" + "; ".join(diffs) + ")")


def _check_not_past(where, meta: Dict, config: Config) -> None:
    """A run already past ``train.max_steps`` cannot be shortened: training on would do nothing, and
    its checkpoints and metrics describe the longer run."""
    step, end = int(meta.get("step", 0)), config.train.max_steps
    if step > end:
        raise RunDirError(f"{where} is at step {step}, past --max-steps {end} (train.max_steps): a shorter run needs "
                          "another --name, or --overwrite to move this run aside and start afresh")
