"""Multi-process training on gloo (torchrun --nproc_per_node=2), kill/resume, resharding, compile."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from reglue.config import apply_overrides
from reglue.models import build_model
from reglue.presets import get_preset
from reglue.train.checkpoint import latest_checkpoint, load_weights, read_meta
from reglue.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--set", "train.sample_steps=3", "--set", "train.num_sample_images=4", "--set", "train.log_every=1",
          "--set", "data.synthetic_size=512", "--set", "train.tensorboard=false"]


def launch(tmp_path, name, steps, nproc=1, extra=(), wait=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    args = ["train.py", "--out", str(tmp_path), "--name", name, "--max-steps", str(steps), *COMMON, *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return tmp_path / name


def losses(run_dir):
    return [json.loads(line)["loss/total"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir, which="ema"):
    model = build_model(get_preset("tiny"))
    load_weights(latest_checkpoint(run_dir), model, which)
    return model.state_dict()


@pytest.mark.slow
def test_two_processes_match_one_and_resume_on_one(tmp_path):
    two = launch(tmp_path, "two", 6, nproc=2, extra=["--set", "train.ckpt_every=6"])
    meta = read_meta(latest_checkpoint(two))
    assert meta["world_size"] == 2 and meta["step"] == 6
    one = launch(tmp_path, "one", 10)
    # same global batch and seed: the same losses up to fp32 reduction order
    assert losses(two) == pytest.approx(losses(one)[:6], rel=1e-5, abs=1e-6)
    # the 2-rank checkpoint resumes on 1 rank and continues like the 1-rank run
    resumed = launch(tmp_path, "two", 10)
    assert losses(resumed) == pytest.approx(losses(one), rel=1e-4, abs=1e-5)
    a, b = weights(one), weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    steps, every = 40, 10
    straight = launch(tmp_path, "straight", steps, extra=["--set", f"train.ckpt_every={every}"])
    proc = launch(tmp_path, "killed", steps, extra=["--set", f"train.ckpt_every={every}"], wait=False)
    first = tmp_path / "killed" / "checkpoints" / f"step-{every:08d}"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "checkpoints" / f"step-{steps:08d}").exists()
    resumed = launch(tmp_path, "killed", steps, extra=["--set", f"train.ckpt_every={every}"])
    out_a, out_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for run, out in ((straight, out_a), (resumed, out_b)):
        subprocess.run([sys.executable, "-m", "reglue.cli", "export", "--run", str(run), "--out", str(out), "--weights", "both"],
                       check=True, cwd=ROOT, capture_output=True)
    from safetensors.torch import load_file

    a, b = load_file(out_a), load_file(out_b)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


@pytest.mark.slow
def test_compile_matches_eager(tmp_path):
    def run(name, compile_):
        cfg = apply_overrides(get_preset("tiny"), {
            "train.out_dir": str(tmp_path), "train.name": name, "train.max_steps": "3", "train.log_every": "1",
            "train.sample_steps": "2", "train.num_sample_images": "2", "parallel.compile": str(compile_),
            "data.synthetic_size": "256", "train.tensorboard": "false"})
        return losses(Trainer(cfg).fit())

    eager, compiled = run("eager", False), run("compiled", True)
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
