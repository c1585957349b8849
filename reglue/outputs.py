"""What commands write: one rule for every output, checked before the long work starts, and a
run's metrics log.

The rule (every command, the same words in the README's "Outputs"):

- an existing output is refused unless ``--overwrite``: a file is then replaced once the new one
  is complete (files are written under a temporary name and renamed), a directory is moved
  aside to ``NAME.replaced-TIME`` first (nothing is deleted);
- a resumable output (a training run, ``prepare``'s shards, ``train-compressor``'s checkpoints,
  ``generate``'s blocks) is resumed by the same command, and refused by a command with other
  settings, naming each setting that differs with both values (:func:`check_same_settings`);
- a command that fails before its work starts leaves nothing behind: the directories it created
  are removed again (:func:`removed_on_failure`).

Low in the layers (only the standard library and optional loggers below it) so data commands
(``prepare``, ``stats``, ``train-compressor``), the trainer and the command line share it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence


class OutputError(ValueError):
    """An output path cannot be written; the message names the flag and the path."""


OVERWRITE_HELP = ("replace an existing output: a file once the new one is complete; a directory is moved aside to "
                  "NAME.replaced-TIME first (nothing is deleted)")

_created: List[List[Path]] = []
"""The directories created inside each active :func:`removed_on_failure` block (innermost last)."""


def add_overwrite_flag(parser) -> None:
    """The ``--overwrite`` flag of a command (see the module docstring for the rule)."""
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


@contextlib.contextmanager
def removed_on_failure() -> Iterator[None]:
    """A command's start-up: the directories that :func:`ensure_output_dir` and
    :func:`ensure_output_file` create inside the block (each the topmost one that did not exist)
    are removed again, with what was written into them, when the block raises (a bad input, a
    Ctrl-C): a failed start leaves nothing behind. Only rank 0 removes (the other ranks of a
    torchrun job may already write into what it created)."""
    _created.append([])
    try:
        yield
    except BaseException:
        if int(os.environ.get("RANK", "0")) == 0:
            for folder in reversed(_created[-1]):
                shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        created = _created.pop()
        if _created:  # an enclosing start-up removes these too if it fails
            _created[-1].extend(created)


def _topmost_missing(folder: Path) -> Optional[Path]:
    top = None
    for candidate in (folder, *folder.absolute().parents):
        if candidate.exists():
            break
        top = candidate
    return top


def _check_writable_dir(folder: Path, flag: str) -> None:
    top = _topmost_missing(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError(f"{flag} {folder}: a file is in the way of this directory") from None
    except OSError as exc:
        raise OutputError(f"{flag} {folder}: cannot create the directory ({exc.strerror})") from None
    if top is not None and _created:
        _created[-1].append(top)
    _probe_write(folder, flag)


def _probe_write(folder: Path, flag: str) -> None:
    try:  # a real write: os.access says yes to root on read-only or virtual filesystems (/proc, a full quota)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".reglue-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{flag} {folder}: the directory is not writable ({exc.strerror})") from None


def ensure_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create ``path`` (and parents) or fail now with one line naming ``flag``."""
    path = Path(path)
    _check_writable_dir(path, flag)
    return path


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """What :func:`ensure_output_dir` checks, without creating anything: ``path`` or its nearest
    existing parent is a writable directory (for a command that creates its output later)."""
    path = Path(path)
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise OutputError(f"{flag} {path}: a file is in the way of this directory")
    _probe_write(existing, flag)
    return path


def ensure_output_file(path: str | os.PathLike, flag: str = "--out", suffixes: Optional[Sequence[str]] = None,
                       overwrite: bool = False) -> Path:
    """Check that ``path`` can be written (its folder is created) before any work is done.

    suffixes: the file endings the writer understands (e.g. ``(".png", ".jpg")``), checked here
    rather than after minutes of work. An existing file is refused unless ``overwrite`` (a
    resumable output whose caller checks what the file holds passes True)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path}: is a directory; give a file name")
    if suffixes and path.suffix.lower() not in suffixes:
        raise OutputError(f"{flag} {path}: the file name must end in {' or '.join(suffixes)}")
    if path.exists() and not overwrite:
        raise OutputError(f"{flag} {path}: already exists; pass --overwrite to replace it, or choose another name")
    _check_writable_dir(path.parent if str(path.parent) else Path("."), flag)
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{flag} {path}: exists and is not writable")
    return path


def ensure_resumable_dir(path: str | os.PathLike, flag: str, overwrite: bool, holds_output: bool, what: str) -> Path:
    """The directory of a resumable output (``what``: e.g. "a prepared dataset"): created when
    missing; ``holds_output`` (the caller found its own records there): resumed, the caller then
    checks the settings with :func:`check_same_settings`; other files there: refused. With
    ``overwrite``, anything there is moved aside first."""
    path = Path(path)
    # dot-files do not count: temporaries (another rank's write probe or half-written record) start with "."
    occupied = path.is_dir() and any(not p.name.startswith(".") for p in path.iterdir())
    if occupied and overwrite:
        move_aside(path, "replaced")
    elif occupied and not holds_output:
        raise OutputError(f"{flag} {path}: holds other files, not {what}; choose another {flag}, or pass --overwrite "
                          "to move them aside")
    return ensure_output_dir(path, flag)


def _flat(settings: Mapping, prefix: str = "") -> Dict[str, object]:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def setting_differences(recorded: Mapping, current: Mapping) -> List[str]:
    """``"key: RECORDED there, CURRENT now"`` for each (nested, dotted) key on which two settings
    dicts differ, compared as JSON reads them back (tuples equal lists)."""
    old, new = (_flat(json.loads(json.dumps(d, default=str))) for d in (recorded, current))
    missing = "(not recorded)"
    return [f"{key}: {old.get(key, missing)!r} there, {new.get(key, missing)!r} now"
            for key in sorted(set(old) | set(new)) if old.get(key, missing) != new.get(key, missing)]


MAX_SHOWN_DIFFERENCES = 6
"""Differing settings named in one error line (a class list can differ in a thousand places)."""


def check_same_settings(what: str, recorded: Mapping, current: Mapping) -> None:
    """Refuse to resume ``what`` (e.g. "--out runs/x.npz.parts") with settings other than those it
    was started with: one line naming each setting that differs, with both values."""
    diffs = setting_differences(recorded, current)
    if diffs:
        shown = "; ".join(diffs[:MAX_SHOWN_DIFFERENCES]) + (f"; and {len(diffs) - MAX_SHOWN_DIFFERENCES} more"
                                                           if len(diffs) > MAX_SHOWN_DIFFERENCES else "")
        raise OutputError(f"{what} was started with other settings ({shown}): run with those settings to resume it, "
                          "or pass --overwrite to start afresh")


def move_aside(path: Path, why: str) -> Path:
    """Rename ``path`` to a free ``<name>.<why>-<time>`` beside it (nothing is ever deleted)."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.{why}-{stamp}")
    n = 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.{why}-{stamp}-{n}"), n + 1
    os.replace(path, target)
    return target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; renamed to ``path`` when the block ends without
    an error (removed otherwise), so ``path`` is only ever absent, the previous file, or complete.
    The temporary name ends in ``path``'s suffix, for writers that choose the format by it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, data, indent: int = 2) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent, sort_keys=True) + "\n")


class MetricsWriter:
    """Appends one JSON object per line; on resume, lines past the resumed step are dropped so the
    file reads as one uninterrupted run. Also logs to TensorBoard / Weights & Biases if asked."""

    def __init__(self, path: Path, resume_step: int = 0, tensorboard_dir: Optional[Path] = None,
                 wandb_project: Optional[str] = None, run_name: str = "run", config: Optional[Dict] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line.strip() and self._step(line) <= resume_step]
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept))
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard_dir), purge_step=resume_step + 1)
            except ImportError:
                pass  # optional: TensorBoard is used when installed
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError(f"train.wandb_project={wandb_project!r} needs the wandb package (pip install wandb)") from None
            self.wandb = wandb.init(project=wandb_project, name=run_name, config=config, resume="allow")

    @staticmethod
    def _step(line: str) -> int:
        try:
            return int(json.loads(line).get("step", 0))
        except (json.JSONDecodeError, ValueError, TypeError, AttributeError):
            return 1 << 62

    def write(self, record: Dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])


def read_metrics(path: Path) -> List[Dict]:
    """The records of a metrics.jsonl; a line that does not parse (the last one of a process killed
    mid-write) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def os_error_line(exc: OSError) -> str:
    """``PATH: reason`` of an OSError, one line (for what no check foresaw: a disk full, a folder gone read-only)."""
    if exc.filename is None:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{exc.filename}: {exc.strerror or exc}"


def human_bytes(n: int) -> str:
    """1.2 GiB, 3.4 MiB or 56 KiB: readable at every size that a run writes."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.0f} KiB"
