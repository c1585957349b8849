"""What commands write: output paths checked before the long work starts, and a run's metrics log.

Low in the layers (only the standard library and optional loggers below it) so data commands
(``prepare``, ``stats``, ``train-compressor``), the trainer and the command line share it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence


class OutputError(ValueError):
    """An output path cannot be written; the message names the flag and the path."""


def _check_writable_dir(folder: Path, flag: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError(f"{flag} {folder}: a file is in the way of this directory") from None
    except OSError as exc:
        raise OutputError(f"{flag} {folder}: cannot create the directory ({exc.strerror})") from None
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


def ensure_output_file(path: str | os.PathLike, flag: str = "--out", suffixes: Optional[Sequence[str]] = None,
                       must_not_exist: bool = False) -> Path:
    """Check that ``path`` can be written (its folder is created) before any work is done.

    suffixes: the file endings the writer understands (e.g. ``(".png", ".jpg")``), checked here
    rather than after minutes of work. must_not_exist: refuse an existing file (outputs that are
    never overwritten, such as reference batches)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path}: is a directory; give a file name")
    if suffixes and path.suffix.lower() not in suffixes:
        raise OutputError(f"{flag} {path}: the file name must end in {' or '.join(suffixes)}")
    if must_not_exist and path.exists():
        raise OutputError(f"{flag} {path}: already exists and is not overwritten; remove it or choose another name")
    _check_writable_dir(path.parent if str(path.parent) else Path("."), flag)
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{flag} {path}: exists and is not writable")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; renamed to ``path`` when the block ends without
    an error (removed otherwise), so ``path`` is only ever absent, the previous file, or complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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
