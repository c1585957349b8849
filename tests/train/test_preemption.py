"""Preemption: a signal stops the run after the current step with a checkpoint on every rank;
the resumed run equals an uninterrupted one; a second signal exits at once."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reglue.checkpoint import latest_checkpoint, read_meta
from reglue.train.cli import main
from reglue.train.preemption import EXIT_PREEMPTED, StopSignals, StopVote
from reglue.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--max-steps", "8", "--set", "train.log_every=1", "--set", "train.ckpt_every=100", "--set", "sample.steps=2",
          "--set", "train.num_sample_images=2", "--set", "data.synthetic_size=64", "--set", "train.tensorboard=false",
          "--set", "train.metrics_plot=false"]


def test_sigterm_saves_at_the_stop_step_and_exits_75(tmp_path, monkeypatch, capsys):
    log_step = Trainer.on_log

    def signal_at_step_3(self, record):
        log_step(self, record)
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "on_log", signal_at_step_3)
    stopped = ["--out", str(tmp_path), "--name", "stopped", *COMMON]
    assert main(stopped) == EXIT_PREEMPTED
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "handlers are restored after the run"
    # the flag rides on the step-4 all-reduce (read at once on the CPU): the run stops after step 4
    checkpoint = latest_checkpoint(tmp_path / "stopped")
    assert checkpoint.name == "step-00000004" and read_meta(checkpoint)["step"] == 4
    assert "stopped at step 4 on SIGTERM" in capsys.readouterr().err
    assert main(stopped) == 0  # resumes at step 4 (bit-exactness after SIGTERM: test_distributed.py)
    assert read_meta(latest_checkpoint(tmp_path / "stopped"))["step"] == 8


@pytest.mark.parametrize("lag, agreed_after", [(0, [False, True, False, False]), (1, [False, False, True, False]),
                                                (2, [False, False, False, True])])
def test_ranks_read_the_stop_vote_lag_steps_late(lag, agreed_after):
    signals = StopSignals()
    vote = StopVote(torch.device("cpu"), signals, lag=lag)
    seen = []
    for received in (None, signal.SIGUSR1, None, None):
        signals.received = received
        vote.publish(vote.flag().clone())
        seen.append(vote.agreed())
    assert seen == agreed_after
    assert StopVote(torch.device("cpu"), signals).lag == 0


_SIGNAL_TWICE = """
import os, signal, sys, time
from reglue.train import preemption
preemption.REPEAT_GRACE_S = float(sys.argv[1])
with preemption.StopSignals() as signals:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    print("requested", signals.requested, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    print("still running", flush=True)
"""


def test_a_second_signal_exits_at_once_but_not_its_echo():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = lambda grace: subprocess.run([sys.executable, "-c", _SIGNAL_TWICE, grace], env=env, capture_output=True,  # noqa: E731
                                       text=True, timeout=120)
    twice = run("0")
    assert twice.returncode == -signal.SIGTERM, twice.stderr
    assert "requested True" in twice.stdout and "still running" not in twice.stdout
    assert "exiting now without saving" in twice.stderr
    echo = run("60")  # torchrun forwards the terminal's Ctrl-C: the copy is not a second signal
    assert echo.returncode == 0 and "still running" in echo.stdout, echo.stderr


def test_a_signal_ignored_at_start_stays_ignored():
    """``cmd &`` in a script starts cmd with SIGINT ignored (so that Ctrl-C reaches only the
    foreground job): the run must not take it over, and the other stop signals still work."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopSignals() as signals:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == signals._handle
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, previous)
