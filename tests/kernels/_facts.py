"""The session's kernel facts (``tests/kernels/_aot.py`` in a subprocess), started as soon as the
tests are collected so that the compile (about a minute of ptxas) overlaps the tests that run
before the ones that read it; :func:`wait` collects it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = "kernel_facts"


class KernelFacts:
    """One ``_aot`` run in the background: its output folder and process."""

    def __init__(self, workers: int | None = None):
        self.out = Path(tempfile.mkdtemp(prefix="reglue-aot-"))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(TRITON_CACHE_DIR=str(self.out / "cache"), PYTHONPATH=str(ROOT))
        cmd = [sys.executable, "-m", "tests.kernels._aot", "--arch", "80,90", "--json", str(self.out / "facts.json")]
        if workers:
            cmd += ["--workers", str(workers)]
        # niced: it takes the CPU time the tests beside it leave (they mostly run one thread)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=lambda: os.nice(10))
        self._done = None

    def wait(self, timeout: float = 900):
        """(CompletedProcess, results: the JSON list, [] if none was written)."""
        if self._done is None:
            stdout, stderr = self.proc.communicate(timeout=timeout)
            facts = self.out / "facts.json"
            results = json.loads(facts.read_text()) if facts.exists() else []
            self._done = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, stdout, stderr), results
        return self._done

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        shutil.rmtree(self.out, ignore_errors=True)


def start_if_needed(config, items) -> None:
    """At collection: the compile starts in the background when a selected test reads the facts
    and Triton is installed; in one worker process while other tests run beside it (they keep a
    CPU), in one per CPU when only the readers were selected."""
    readers = sum(FIXTURE in getattr(item, "fixturenames", ()) for item in items)
    if not readers:
        return
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    facts = KernelFacts(workers=1 if readers < len(items) else None)
    config.stash[STASH] = facts
    config.add_cleanup(facts.close)
    _readers_last(items)


def _readers_last(items) -> None:
    """The modules that read the facts run after every other test (their order kept), so that the
    compile has the whole session to finish instead of being waited for mid-way (28 s on 2 cores)."""
    reading = {getattr(item, "module", None) for item in items if FIXTURE in getattr(item, "fixturenames", ())}
    items.sort(key=lambda item: getattr(item, "module", None) in reading)  # stable: False (the others) first


STASH = pytest.StashKey[KernelFacts]()
