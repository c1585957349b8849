"""The ``reglue`` console script: train, export, sample (data subcommands: prepare, stats,
train-compressor, come from ``reglue.data``; plot from ``reglue.train.plots``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import List, Optional

import torch


def cmd_export(args) -> int:
    from safetensors.torch import save_file

    from reglue.checkpoint import load_run_weights

    tensors, metadata = {}, {}
    for which in (("ema", "model") if args.weights == "both" else (args.weights,)):
        config, model, path = load_run_weights(args.run, args.checkpoint, which)
        prefix = f"{which}." if args.weights == "both" else ""
        tensors.update({prefix + k: v.contiguous() for k, v in model.state_dict().items()})
    metadata = {"config": config.to_json(), "checkpoint": str(path), "weights": args.weights}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, args.out, metadata=metadata)
    print(f"wrote {len(tensors)} tensors ({args.weights}) from {path} to {args.out}")
    return 0


def cmd_sample(args) -> int:
    from reglue.checkpoint import load_run_weights
    from reglue.models.encoders import build_vae
    from reglue.train.plots import save_sample_grid
    from reglue.train.sampling import sample_from_state, sample_labels

    config, model, path = load_run_weights(args.run, args.checkpoint, "ema")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae = build_vae(args.vae or config.encoders.vae, seed=config.train.seed, run_dir=path.parent.parent).to(device)
    overrides = {k: v for k, v in (("sampler", args.sampler), ("steps", args.steps), ("cfg_scale", args.cfg_scale)) if v is not None}
    images = sample_from_state(config, model.state_dict(), vae, device, args.num, args.seed,
                               dataclasses.replace(config.sample, **overrides))
    save_sample_grid(images, Path(args.out), sample_labels(config, args.num))
    print(f"wrote {args.num} samples from {path} to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reglue", description="REGLUE / REG / ReDi / REPA / SiT training toolkit")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train (same flags as train.py)", add_help=False)

    p = sub.add_parser("export", help="write a run's EMA (and/or model) weights as safetensors")
    p.add_argument("--run", help="run directory (uses its latest checkpoint)")
    p.add_argument("--checkpoint", help="a checkpoint directory instead of --run")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--weights", choices=("ema", "model", "both"), default="ema",
                   help="ema/model: plain SiT keys (load with strict=True); both: keys prefixed 'ema.' and 'model.'")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sample", help="sample an image grid from a run's EMA weights")
    p.add_argument("--run")
    p.add_argument("--checkpoint")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=("sde", "euler", "heun"), help="default: the run's sample.sampler")
    p.add_argument("--steps", type=int, help="default: the run's sample.steps")
    p.add_argument("--cfg-scale", type=float, help="default: the run's sample.cfg_scale")
    p.add_argument("--vae", help="override the run's VAE (hub name or folder)")
    p.add_argument("--device")
    p.set_defaults(func=cmd_sample)

    from reglue.data import prepare, stats, train_compressor

    for data_command in (prepare, stats, train_compressor):
        data_command.add_parser(sub)
    from reglue.train.plots import add_parser as add_plot_parser

    add_plot_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from reglue.train.cli import main as train_main

        return train_main(argv[1:], prog="reglue train")
    parser = build_parser()
    args = parser.parse_args(argv)
    from reglue.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"reglue {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
