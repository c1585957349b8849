#!/usr/bin/env python
"""Reliability figures (issue 9) at SiT-B/2 size: time from SIGTERM to exit, and time to detect and
skip a damaged checkpoint. Not a pytest benchmark (it takes minutes on a CPU); run it by hand:

    python bench/reliability_figures.py --out /tmp/reliability [--device-note "..."]

1. ``train.py --preset reglue-sit-b-2`` (random DINOv2, tiny VAE, global batch 2, no downloads) is
   sent SIGTERM once step 3 is logged; prints the seconds to exit, the exit status (75) and the
   checkpoint it saved.
2. That checkpoint (model + EMA + AdamW state) is copied as the newest of two and damaged in
   several ways; prints the file-check time, which checkpoint ``load_newest`` resumed from and how
   long detect + skip + load took, and the save/load times of an intact one.
"""

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sigterm_to_exit(out: Path, after_step: int = 3) -> dict:
    args = [sys.executable, "train.py", "--preset", "reglue-sit-b-2", "--out", str(out), "--name", "b2",
            "--max-steps", "1000", "--global-batch-size", "2", "--set", "encoders.dinov2_weights=null",
            "--set", "encoders.vae=tiny-random", "--set", "data.synthetic_size=64", "--set", "train.log_every=1",
            "--set", "train.ckpt_every=100000", "--set", "train.tensorboard=false", "--set", "data.num_workers=0"]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.log", "w") as log:
        proc = subprocess.Popen(args, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=log, stderr=subprocess.STDOUT)
        metrics = out / "b2" / "metrics.jsonl"
        while proc.poll() is None and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= after_step):
            time.sleep(0.05)
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        sent = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        status = proc.wait()
        seconds = time.perf_counter() - sent
    checkpoint = sorted((out / "b2" / "checkpoints").iterdir())[-1]
    return {"exit_status": status, "sigterm_to_exit_s": round(seconds, 2), "signal_after_step": rows[-1]["step"],
            "checkpoint": checkpoint.name, "checkpoint_gb": round(sum(f.stat().st_size for f in checkpoint.iterdir()) / 1e9, 2),
            "step_s": round(2 / rows[-1]["img_per_s"], 2), "_path": str(checkpoint)}


def damaged_checkpoints(src: Path, run: Path) -> dict:
    import torch

    from reglue import checkpoint as ckpt
    from reglue.config import Config
    from reglue.models import build_model
    from reglue.runtime import DistInfo
    from reglue.train.ema import EMA

    shutil.rmtree(run, ignore_errors=True)
    meta = ckpt.read_meta(src)
    model = build_model(Config.from_dict(meta["config"]), kernels="eager")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ema = EMA(model)
    attempts = []

    def load(path):
        start = time.perf_counter()
        try:
            state = ckpt.training_state(model, optimizer, ema)
            loaded = ckpt.load_checkpoint(path, state)
            ckpt.apply_training_state(model, optimizer, ema, state)
            return loaded
        finally:
            attempts.append((path.name, round(time.perf_counter() - start, 2)))

    load(src)
    start = time.perf_counter()
    ckpt.save_checkpoint(run, meta["step"] - 1, ckpt.training_state(model, optimizer, ema),
                         {k: meta[k] for k in ("config", "run_id")}, DistInfo(), keep_last=10)
    results = {"params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1), "save_s": round(time.perf_counter() - start, 2),
               "load_s": attempts[-1][1]}
    newest = run / "checkpoints" / src.name
    damage = {
        "intact": lambda p: None,
        "truncated shard": lambda p: os.truncate(p / "__0_0.distcp", (p / "__0_0.distcp").stat().st_size // 2),
        "missing .metadata": lambda p: (p / ".metadata").unlink(),
        "unreadable marker": lambda p: (p / "complete.json").write_text("{"),
        "garbled shard header (same size)": lambda p: open(p / "__0_0.distcp", "r+b").write(b"\xff" * 64),
    }
    for kind, apply in damage.items():
        shutil.rmtree(newest, ignore_errors=True)
        shutil.copytree(src, newest)
        apply(newest)
        start = time.perf_counter()
        reason = ckpt.checkpoint_damage(newest)
        check_ms = 1e3 * (time.perf_counter() - start)
        attempts.clear()
        start = time.perf_counter()
        path, _ = ckpt.load_newest(run, load)
        results[kind] = {"file_check_ms": round(check_ms, 2), "found": reason, "resumed_from": path.name,
                         "load_attempts_s": list(attempts), "detect_skip_and_load_s": round(time.perf_counter() - start, 2)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--device-note", default="CPU", help="what the numbers were measured on, for the record")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    stop = sigterm_to_exit(args.out / "sigterm")
    src = Path(stop.pop("_path"))
    print(json.dumps({"device": args.device_note, "sigterm": stop, "damage": damaged_checkpoints(src, args.out / "damage")}, indent=1))


if __name__ == "__main__":
    main()
