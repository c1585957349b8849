"""Multi-process training on gloo (torchrun --nproc_per_node=2), kill/resume, resharding, activation checkpointing
(compiled training against eager: tests/train/test_compile.py)."""

import json
import os
import shutil
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
from reglue.checkpoint import latest_checkpoint, load_weights, read_meta
from reglue.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--set", "sample.steps=3", "--set", "train.num_sample_images=4", "--set", "train.log_every=1",
          "--set", "data.synthetic_size=64", "--set", "train.tensorboard=false",
          "--set", "train.metrics_plot=false"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    return env


def _train_args(tmp_path, name, steps, extra):
    return ["train.py", "--out", str(tmp_path), "--name", name, "--max-steps", str(steps), *COMMON, *extra]


def _torchrun():
    return [sys.executable, "-m", "torch.distributed.run"]


def launch(tmp_path, name, steps, nproc=1, extra=(), wait=True):
    args = _train_args(tmp_path, name, steps, extra)
    if nproc > 1:
        cmd = [*_torchrun(), "--standalone", "--nproc_per_node", str(nproc), *args]
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return tmp_path / name


def finish(proc, tmp_path, name):
    """Wait for a ``launch(..., wait=False)``; it must succeed. Returns the run dir."""
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return tmp_path / name


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_nodes(tmp_path, name, steps, extra=(), nnodes=2, nproc=2, max_restarts=0):
    """``nnodes`` torchrun agents on this machine (one per simulated node, c10d rendezvous on a
    free local port), ``nproc`` gloo workers each; returns the agents' processes (logs in
    ``tmp_path/agent-<name>-<n>.log``)."""
    endpoint = f"127.0.0.1:{free_port()}"
    procs = []
    for node in range(nnodes):
        log = open(tmp_path / f"agent-{name}-{node}.log", "w")
        cmd = [*_torchrun(), f"--nnodes={nnodes}", f"--node-rank={node}", f"--nproc-per-node={nproc}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--max-restarts={max_restarts}",
               *_train_args(tmp_path, name, steps, extra)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True))
    return procs


def wait_nodes(tmp_path, name, procs, timeout=600):
    """Wait for the agents of :func:`launch_nodes`; all must succeed. Returns the run dir and the logs."""
    deadline = time.time() + timeout
    for proc in procs:
        proc.wait(timeout=max(1, deadline - time.time()))
    logs = "\n".join((tmp_path / f"agent-{name}-{n}.log").read_text() for n in range(len(procs)))
    assert all(p.returncode == 0 for p in procs), logs[-6000:]
    return tmp_path / name, logs


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss/total"] for r in rows if "loss/total" in r]  # not the demo's eval/class_match row


def weights(run_dir, which="ema"):
    model = build_model(get_preset("tiny"))
    load_weights(latest_checkpoint(run_dir), model, which)
    return model.state_dict()


def stop_with_sigterm(tmp_path, name, steps, nproc, after_step):
    """Launch a run, SIGTERM the launcher once step ``after_step`` is logged; returns (output, seconds to exit)."""
    proc = launch(tmp_path, name, steps, nproc=nproc, wait=False)
    metrics, deadline = tmp_path / name / "metrics.jsonl", time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if metrics.is_file() and metrics.read_text().count("\"loss/total\"") >= after_step:  # step log lines only
            break
        time.sleep(0.05)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    return out, time.perf_counter() - sent


def export(run_dir, out):
    """``reglue export --weights both`` of a run's newest checkpoint (in this process: the command
    is one process without a process group either way), read back."""
    from reglue.cli import main as reglue_main
    from safetensors.torch import load_file

    assert reglue_main(["export", "--run", str(run_dir), "--out", str(out), "--weights", "both"]) == 0

    return load_file(out)


@pytest.mark.slow
def test_two_processes_stop_on_sigterm_resume_exactly_and_match_one(tmp_path):
    """Two gloo ranks, SIGTERM to torchrun: both ranks stop after the same step with one checkpoint,
    and the run resumed with --resume auto exports bit-identical weights to an uninterrupted one.
    The 2-rank checkpoint also resumes on one rank, where it continues like a 1-rank run."""
    steps = 10
    one_proc = launch(tmp_path, "one", steps, wait=False)  # beside the 2-rank run (one thread per process)
    two = launch(tmp_path, "two", steps, nproc=2)
    one = finish(one_proc, tmp_path, "one")
    out, _ = stop_with_sigterm(tmp_path, "stopped", steps, nproc=2, after_step=2)
    stop = read_meta(latest_checkpoint(tmp_path / "stopped"))
    assert stop["world_size"] == 2 and 2 < stop["step"] < steps, out[-3000:]
    assert out.count(f"stopped at step {stop['step']} on SIGTERM") == 1, out[-3000:]
    shutil.copytree(tmp_path / "stopped", tmp_path / "on_one")
    on_one_proc = launch(tmp_path, "on_one", steps, wait=False)
    resumed = launch(tmp_path, "stopped", steps, nproc=2)
    on_one = finish(on_one_proc, tmp_path, "on_one")
    a, b = export(two, tmp_path / "a.safetensors"), export(resumed, tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]

    # same global batch and seed: the same losses up to fp32 reduction order
    assert losses(two) == pytest.approx(losses(one), rel=1e-5, abs=1e-6)
    assert losses(on_one) == pytest.approx(losses(one), rel=1e-4, abs=1e-5)
    a, b = weights(one), weights(on_one)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    steps, every = 20, 5
    # the uninterrupted run beside the one to kill: one thread each (OMP_NUM_THREADS=1), two CPUs
    straight_proc = launch(tmp_path, "straight", steps, extra=["--set", f"train.ckpt_every={every}"], wait=False)
    proc = launch(tmp_path, "killed", steps, extra=["--set", f"train.ckpt_every={every}"], wait=False)
    first = tmp_path / "killed" / "checkpoints" / f"step-{every:08d}"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "checkpoints" / f"step-{steps:08d}").exists()
    straight = finish(straight_proc, tmp_path, "straight")
    resumed = launch(tmp_path, "killed", steps, extra=["--set", f"train.ckpt_every={every}"])
    a, b = export(straight, tmp_path / "a.safetensors"), export(resumed, tmp_path / "b.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


@pytest.mark.slow
def test_reference_mode_ddp_two_processes_matches_one(tmp_path):
    """Two DDP ranks match one; the log names what runs (DDP, 2 x 1), not an FSDP mesh."""
    one_proc = launch(tmp_path, "ref1", 3, extra=["--reference"], wait=False)  # beside the 2-rank run
    proc = launch(tmp_path, "ref2", 3, nproc=2, extra=["--reference"], wait=False)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    one = finish(one_proc, tmp_path, "ref1")
    assert "mesh 2 x 1 (replicate x shard, DDP, the published reference execution)" in out and "fsdp)" not in out, out[-4000:]
    two = tmp_path / "ref2"
    assert losses(two) == pytest.approx(losses(one), rel=1e-5, abs=1e-6)
    assert read_meta(latest_checkpoint(two))["config"]["parallel"]["reference"] is True


def _tiny_losses(tmp_path, name, **overrides):
    cfg = apply_overrides(get_preset("tiny"), {
        "train.out_dir": str(tmp_path), "train.name": name, "train.max_steps": "3", "train.log_every": "1",
        "sample.steps": "2", "train.num_sample_images": "2", "data.synthetic_size": "64",
        "train.tensorboard": "false", "train.metrics_plot": "false", **overrides})
    return losses(Trainer(cfg).fit())


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_matches_off(tmp_path, mode):
    assert _tiny_losses(tmp_path, mode, **{"parallel.activation_checkpointing": mode}) == \
        pytest.approx(_tiny_losses(tmp_path, "off"), rel=1e-6, abs=1e-7)


def test_fsdp_bf16_params_keep_fp32_timesteps(monkeypatch):
    """The FSDP2 root must not cast t to bf16 (the mixed-precision policy casts block inputs only)."""
    import torch.distributed as dist

    from reglue.train import parallelize as par
    from reglue.runtime import DistInfo

    monkeypatch.setattr(par, "use_fsdp", lambda d: True)
    monkeypatch.setattr(par, "compute_param_dtype", lambda cfg, device: torch.bfloat16)
    config = get_preset("tiny")
    try:
        model = par.build_parallel_model(config, DistInfo())
        seen = {}
        model.t_embedder.register_forward_pre_hook(lambda m, args: seen.update(t=args[0].dtype))
        model.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0].dtype))
        x = torch.randn(2, config.in_channels, 8, 8)
        out, zs, cls_out = model(x, torch.tensor([0.3, 0.7]), torch.tensor([1, 2]), torch.randn(2, 32))
        assert seen["t"] == torch.float32 and seen["x"] == torch.bfloat16
        assert torch.isfinite(out.float()).all() and out.shape == x.shape
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names are read from /proc")
def test_no_communication_thread_outlives_run(tmp_path):
    """After ``run()`` returns, on both executions (FSDP2, then the DDP reference in the same two
    processes), no gloo thread is left: a group first freed at interpreter exit can abort a
    worker after a complete run (``reglue.runtime.shutdown``). Before the fix, the FSDP2 mesh
    (held by DTensor's caches) and the finished trainer's DDP model (in a reference cycle) kept
    ``pt_gloo_runloop`` / ``gloo_tcp_loop`` threads alive."""
    cmd = [*_torchrun(), "--standalone", "--nproc_per_node", "2", "tests/train/shutdown_worker.py", str(tmp_path),
           "fsdp", "reference"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    rows = [json.loads(line.split("THREADS ", 1)[1]) for line in proc.stdout.splitlines() if "THREADS {" in line]
    assert sorted((r["rank"], r["execution"]) for r in rows) == [(0, "fsdp"), (0, "reference"), (1, "fsdp"), (1, "reference")]
    for row in rows:
        assert not [t for t in row["threads"] if "gloo" in t], row
