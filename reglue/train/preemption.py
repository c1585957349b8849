"""Stopping a run on a signal without losing work: SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 (the
usual SLURM pre-timeout signal, ``#SBATCH --signal=USR1@120``).

The first signal lets the current step finish; every rank then saves a checkpoint at the same
step and the process exits with :data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL``: "try again"), so a
requeued job (``scontrol requeue``, or the same command with ``--resume auto``) loses nothing. A
second signal exits at once without saving (the default action of that signal); the last
complete checkpoint is untouched. A repeat within :data:`REPEAT_GRACE_S` of the first counts as
the same signal: under torchrun a Ctrl-C reaches each worker twice, from the terminal and
forwarded by torchrun.

Under torchrun, forward SIGUSR1 too and give the save time: ``torchrun --signals-to-handle
SIGTERM,SIGINT,SIGUSR1 --shutdown-timeout 300 ...`` (torchrun's default is to SIGKILL workers
30 s after it forwards a signal).

Ranks agree on the stop step without a host sync of their own: each rank adds its flag to the
all-reduce every step already does (:class:`StopVote`), and on CUDA the host reads the reduced
flag one step late, from a pinned host copy, after the next step has been queued (on the CPU,
where nothing is queued, right after the step).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Dict, Optional

import torch

log = logging.getLogger("reglue.train")

EXIT_PREEMPTED = 75
"""Exit status of a run stopped by a signal after saving its checkpoint (sysexits' EX_TEMPFAIL)."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
REPEAT_GRACE_S = 2.0


class Preempted(RuntimeError):
    """The run stopped on a signal after saving a checkpoint; resume with ``--resume auto``."""

    exit_code = EXIT_PREEMPTED


class StopSignals:
    """Signal handlers installed for the duration of a ``with`` block (main thread only). A signal
    the process was started with ignored stays ignored, as Python leaves SIGINT then: a script's
    ``python train.py &`` runs with SIGINT ignored, so that a Ctrl-C meant for the script's
    foreground command does not stop the background run."""

    def __init__(self):
        self.received: Optional[signal.Signals] = None
        self._first_at = 0.0
        self._previous: Dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame) -> None:
        sig = signal.Signals(signum)
        if self.received is None:
            self.received, self._first_at = sig, time.monotonic()
            log.warning("received %s: finishing the current step, saving a checkpoint, then exiting with status %d "
                        "(send it again to exit at once without saving)", sig.name, EXIT_PREEMPTED)
            return
        if time.monotonic() - self._first_at < REPEAT_GRACE_S:
            return
        log.warning("received %s again: exiting now without saving", sig.name)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def __enter__(self) -> "StopSignals":
        self.received = None
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if signal.getsignal(sig) is signal.SIG_IGN:
                    continue  # ignored by whoever started us (SIGINT for `cmd &` in a script): it stays ignored
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


class StopVote:
    """The stop flag that rides on the step's all-reduce, read by the host ``lag`` steps late.

    ``flag()`` is this rank's vote as a device scalar (a fill, not a host-to-device copy), taken
    right before the step's all-reduce so that a signal during the step still counts for it; ``publish(reduced)`` copies the reduced vote into a pinned
    host slot without blocking; ``agreed()`` reads the vote of the step ``lag`` steps before the
    last published one, waiting for that step's copy only. On CUDA the lag is 1, so the host never
    waits for the step it has just queued; on the CPU nothing is queued and the lag is 0. Every
    rank reads the same sum for the same step, so all ranks stop after the same step.
    """

    def __init__(self, device: torch.device, signals: StopSignals, lag: Optional[int] = None):
        on_cuda = device.type == "cuda"
        self.signals = signals
        self.lag = (1 if on_cuda else 0) if lag is None else lag
        self._local = torch.zeros((), device=device)
        self._host = torch.zeros(self.lag + 1, pin_memory=on_cuda)
        self._host_view = self._host.numpy()  # read as a NumPy view: the value is already on the host
        self._events = [torch.cuda.Event() for _ in range(self.lag + 1)] if on_cuda else None
        self._published = 0

    def flag(self) -> torch.Tensor:
        return self._local.fill_(1.0 if self.signals.requested else 0.0)

    def publish(self, reduced: torch.Tensor) -> None:
        slot = self._published % len(self._host)
        self._host[slot : slot + 1].copy_(reduced.reshape(1), non_blocking=True)
        if self._events is not None:
            self._events[slot].record()
        self._published += 1

    def agreed(self) -> bool:
        """True when some rank had asked to stop by the step ``lag`` before the last published one."""
        if self._published <= self.lag:
            return False
        slot = (self._published - 1 - self.lag) % len(self._host)
        if self._events is not None:
            self._events[slot].synchronize()
        return bool(self._host_view[slot] > 0)

    def reset(self) -> None:
        self._published = 0
