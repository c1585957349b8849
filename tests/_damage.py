"""Damage a file the way disks and copies do, for the tests of every reader (one helper for all)."""

from pathlib import Path
from typing import Optional


def garble(path, size: int = 100_000, at: Optional[int] = None) -> None:
    """Invert ``size`` bytes (fewer in a small file) around the middle (or from ``at``): same size,
    wrong bytes, as a zeroed or garbled disk block."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    size = max(1, min(size, len(data) // 4))
    start = len(data) // 2 - size // 2 if at is None else at
    data[start : start + size] = bytes(b ^ 0xFF for b in data[start : start + size])
    path.write_bytes(bytes(data))


def truncate(path, keep: float = 0.5) -> None:
    """Cut the file to ``keep`` of its size (a copy that stopped early)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
