"""The ``reglue`` console script: train, export, sample (data subcommands: prepare, stats,
train-compressor, come from ``reglue.data``; generate and evaluate from ``reglue.evaluation``; plot from
``reglue.train.plots``). Only the standard library is imported at module level, so a Ctrl-C while
torch loads is caught by :func:`main` (exit 130, one line)."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
"""Grid files PIL writes (checked before sampling)."""


def cmd_export(args) -> int:
    from reglue.checkpoint import load_run_weights
    from reglue.integrity import save_safetensors
    from reglue.outputs import atomic_path, ensure_output_file, removed_on_failure

    with removed_on_failure():
        out = ensure_output_file(args.out, "--out", suffixes=(".safetensors",), overwrite=args.overwrite)
        whiches = ("ema", "model") if args.weights == "both" else (args.weights,)
        config, model, path = load_run_weights(args.run, args.checkpoint, whiches[0])
        models = {whiches[0]: model}
        for which in whiches[1:]:  # from the checkpoint the first one came from
            models[which] = load_run_weights(checkpoint=str(path), which=which)[1]
        tensors = {}
        for which, loaded in models.items():
            prefix = f"{which}." if args.weights == "both" else ""
            tensors.update({prefix + k: v.contiguous() for k, v in loaded.state_dict().items()})
        metadata = {"config": config.to_json(), "checkpoint": str(path), "weights": args.weights}
        with atomic_path(out) as tmp:
            save_safetensors(tensors, tmp, metadata=metadata)
    print(f"wrote {len(tensors)} tensors ({args.weights}) from {path} to {out}")
    return 0


def cmd_sample(args) -> int:
    import torch

    from reglue.checkpoint import load_run_weights
    from reglue.config import apply_overrides
    from reglue.evaluation.generate import sample_grid, sample_overrides
    from reglue.models.encoders import build_vae
    from reglue.outputs import ensure_output_file, removed_on_failure
    from reglue.train.plots import save_sample_grid
    from reglue.train.sampling import sample_labels

    with removed_on_failure():
        out = ensure_output_file(args.out, "--out", suffixes=IMAGE_SUFFIXES, overwrite=args.overwrite)
        config, model, path = load_run_weights(args.run, args.checkpoint, "ema")
        config = apply_overrides(config, sample_overrides(args))
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        vae = build_vae(args.vae or config.encoders.vae, seed=config.train.seed, run_dir=path.parent.parent).to(device)
        images = sample_grid(config, model.state_dict(), vae, device, args.num, args.seed)
        save_sample_grid(images, out, sample_labels(config, args.num))
    print(f"wrote {args.num} samples from {path} to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from reglue.outputs import add_overwrite_flag

    parser = argparse.ArgumentParser(prog="reglue", description="REGLUE / REG / ReDi / REPA / SiT training toolkit")
    sub = parser.add_subparsers(dest="command", required=True, help="the command (reglue COMMAND --help for its flags)")
    sub.add_parser("train", help="train (same flags as train.py)", add_help=False,
                   description="Train a model: the flags of train.py (see reglue train --help)")

    p = sub.add_parser("export", help="write a run's EMA (and/or model) weights as safetensors",
                       description="Writes the EMA (or the trained, or both) weights of a run's latest checkpoint, or of "
                                   "--checkpoint, to one .safetensors file with the run's config in its metadata (what "
                                   "reglue generate --weights and reglue sample read).")
    p.add_argument("--run", help="run directory (uses its latest checkpoint)")
    p.add_argument("--checkpoint", help="a checkpoint directory instead of --run")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--weights", choices=("ema", "model", "both"), default="ema",
                   help="ema/model: plain SiT keys (load with strict=True); both: keys prefixed 'ema.' and 'model.'")
    add_overwrite_flag(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sample", help="sample an image grid from a run's EMA weights",
                       description="Draws --num samples from a run's EMA weights with the run's sampler settings (each "
                                   "flag below overrides one) and writes them as one image grid, grouped by class.")
    p.add_argument("--run", help="run directory (uses its latest checkpoint)")
    p.add_argument("--checkpoint", help="a checkpoint directory (step-XXXXXXXX) instead of --run's latest")
    p.add_argument("--out", required=True, help="output image (.png, .jpg or .webp)")
    p.add_argument("--num", type=int, default=16, help="number of samples (default 16); labels cycle over the classes")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples' noise (default 0)")
    p.add_argument("--vae", help="override the run's VAE (hub name or folder)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    add_overwrite_flag(p)
    from reglue.evaluation.generate import add_sample_arguments

    add_sample_arguments(p)
    p.set_defaults(func=cmd_sample)

    from reglue.data import prepare, stats, train_compressor
    from reglue.evaluation import evaluate, generate

    for command_module in (prepare, stats, train_compressor, generate, evaluate):
        command_module.add_parser(sub)
    from reglue.train.plots import add_parser as add_plot_parser

    add_plot_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """The console script. Exit status: 0 done; 2 bad input (one line); 130 interrupted (Ctrl-C)
    before the command's own handling (start-up: imports, loading)."""
    from reglue.interrupts import import_native_modules

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        import_native_modules()  # a Ctrl-C in there would abort the process (reglue.interrupts)
        return _main(argv)
    except KeyboardInterrupt:
        command = f"reglue {argv[0]}" if argv and not argv[0].startswith("-") else "reglue"
        print(f"{command}: interrupted (Ctrl-C)", file=sys.stderr)
        return INTERRUPTED


INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT, as shells report it)."""


def _main(argv: List[str]) -> int:
    if argv and argv[0] == "train":
        from reglue.train.cli import main as train_main

        return train_main(argv[1:], prog="reglue train")
    parser = build_parser()
    args = parser.parse_args(argv)
    from reglue.checkpoint import CheckpointError
    from reglue.data.shards import DatasetError
    from reglue.outputs import os_error_line

    try:
        return args.func(args)
    # OSError: also the last resort for what no check foresaw (a disk full, a folder gone read-only)
    except (CheckpointError, DatasetError, ValueError, OSError) as exc:
        print(f"reglue {args.command}: error: {os_error_line(exc) if isinstance(exc, OSError) else exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
