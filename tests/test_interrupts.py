"""Ctrl-C while torch loads: held until the imports end, then one line and exit 130.

Field case (CI, stop 21): SIGINT half a second into ``reglue stats --help`` landed in Python code that
torch's C++ extension was calling back; the KeyboardInterrupt crossed pybind11 and the process
aborted (``terminate called after throwing an instance of 'pybind11::error_already_set'``, -6)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from reglue.interrupts import deferred_interrupt

ROOT = Path(__file__).resolve().parents[1]


def test_a_ctrl_c_inside_the_block_is_raised_when_it_ends():
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # bytecodes at which Python's own handler would have raised
                pass
            reached.append("end of block")
    assert reached == ["end of block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_no_ctrl_c_no_interrupt_and_the_block_s_own_error_wins():
    with deferred_interrupt():
        pass
    with pytest.raises(ValueError):
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            raise ValueError("from the block")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_or_foreign_handler_is_left_alone():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with deferred_interrupt():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)  # ignored, as the user's launcher asked
        seen = []
        mine = lambda signum, frame: seen.append(signum)  # noqa: E731
        signal.signal(signal.SIGINT, mine)
        with deferred_interrupt():
            assert signal.getsignal(signal.SIGINT) is mine
        assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, previous)


_CHILD = """
import os, runpy, signal, sys

class SigintDuringTorchImport:
    def find_spec(self, name, path=None, target=None):
        if name == "torch.torch_version":  # one of the first modules torch/__init__.py imports
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, SigintDuringTorchImport())
try:
    {entry}
finally:
    torch = sys.modules.get("torch")
    print("torch loaded completely:", torch is not None and hasattr(torch, "nn"), flush=True)
"""


@pytest.mark.parametrize("entry", ["reglue", "train.py"])
def test_a_ctrl_c_during_import_torch_waits_for_the_import(tmp_path, entry):
    """The SIGINT is sent from inside ``import torch`` (an import hook): the import finishes, then the
    interrupt is one line and exit 130. Without the deferral the interrupt is raised inside the
    import (here harmlessly, in the field inside a pybind11 call-back: abort)."""
    if entry == "reglue":
        code = "from reglue.cli import main; sys.exit(main(['stats', '--help']))"
        expected = "reglue stats: interrupted (Ctrl-C)"
    else:
        code = f"sys.argv = [{str(ROOT / 'train.py')!r}, '--out', 'runs']; runpy.run_path(sys.argv[0], run_name='__main__')"
        expected = "train.py: interrupted (Ctrl-C) before training started; nothing was saved"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(entry=code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [expected], proc.stderr[-3000:]
    assert proc.stdout.strip() == "torch loaded completely: True"
    assert not (tmp_path / "runs").exists()
