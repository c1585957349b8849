"""Command-line flags of ``train.py`` (and ``reglue train``) -> a validated Config.

Exit status: 0 done; 2 bad input (config, data, checkpoint, run directory); 3 aborted after too
many non-finite steps; 75 stopped by SIGTERM/SIGINT/SIGUSR1 after saving a checkpoint (run the
same command again to continue); 130 interrupted (Ctrl-C) during start-up, before training.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from reglue.config import ATTENTION, KERNEL_SETTINGS, Config, ConfigError, apply_overrides, parse_set_items
from reglue.presets import METHOD_PRESETS, PRESETS, get_preset


def _reference_precisions() -> str:
    """Which presets' recipes train in which precision, e.g. ``fp32 for sit-*, redi-*; fp16 ... for repa-*``."""
    by_precision = {}
    for method, build in METHOD_PRESETS.items():
        by_precision.setdefault(build("B").parallel.reference_precision, []).append(f"{method}-*")
    names = {"fp16": "fp16 autocast", "fp32": "fp32"}
    return "; ".join(f"{names.get(p, p)} for {', '.join(m)}" for p, m in sorted(by_precision.items(), reverse=True))


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train SiT / REPA / ReDi / REG / REGLUE. With no arguments: the `tiny` preset on the built-in "
        "synthetic dataset (CPU, under a minute on 2 cores). Multi-GPU: torchrun --nproc_per_node=8 train.py --preset ...",
    )
    p.add_argument("--preset", default="tiny", metavar="NAME",
                   help=f"named run (default: tiny): {', '.join(sorted(PRESETS))}")
    p.add_argument("--config", help="a config.json (e.g. a run's) to start from instead of a preset")
    p.add_argument("--data", help="prepared dataset directory (`reglue prepare`) or the published layout")
    p.add_argument("--data-backend", choices=("auto", "dali", "torch"),
                   help="data.backend: dali (GPU decoding), torch (DataLoader + PIL), auto (DALI when installed and --data is set)")
    p.add_argument("--out", help="output root; the run writes into OUT/NAME (default: runs)")
    p.add_argument("--name", help="run name (default: the preset's)")
    p.add_argument("--max-steps", type=int, help="train.max_steps: optimizer steps of the whole run (a resumed run trains on to it)")
    p.add_argument("--global-batch-size", type=int, help="train.global_batch_size: images per step over all ranks")
    p.add_argument("--micro-batch-size", type=int, help="per-rank batch per forward (gradient accumulation fills the rest)")
    p.add_argument("--seed", type=int, help="train.seed: data order, noise and initialisation")
    p.add_argument("--lr", type=float, help="optim.lr: AdamW learning rate")
    p.add_argument("--kernels", choices=KERNEL_SETTINGS, help="fused Triton ops (default auto: on CUDA, self-checked)")
    p.add_argument("--attention", choices=ATTENTION,
                   help="model.attention backend (default auto: FA3 -> FA2 -> xformers -> SDPA, the first that runs)")
    p.add_argument("--compile", nargs="?", const="true", choices=("auto", "true", "false"),
                   help="torch.compile the step region by region (default auto: on CUDA)")
    p.add_argument("--no-compile", dest="compile", action="store_const", const="false", help="run eager (no torch.compile)")
    p.add_argument("--activation-checkpointing", choices=("off", "full", "selective"),
                   help="parallel.activation_checkpointing per SiT block (selective: keep matmul and attention outputs)")
    p.add_argument("--reference", action="store_true", default=None,
                   help="run the published recipe's execution for comparison: eager, DDP, per-step syncs, in the recipe's "
                        f"precision (parallel.reference_precision: {_reference_precisions()})")
    p.add_argument("--wandb-project", help="also log to Weights & Biases")
    p.add_argument("--resume", help="auto (latest checkpoint of the run, default), none, or a checkpoint directory")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh even if OUT/NAME holds another run: the old run is moved aside (OUT/NAME.replaced-TIME)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set model.qk_norm=true (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


_FLAG_FIELDS = {
    "data": "data.path", "data_backend": "data.backend", "out": "train.out_dir", "name": "train.name",
    "max_steps": "train.max_steps", "global_batch_size": "train.global_batch_size",
    "micro_batch_size": "train.micro_batch_size", "seed": "train.seed", "lr": "optim.lr", "kernels": "model.kernels",
    "attention": "model.attention", "compile": "parallel.compile",
    "activation_checkpointing": "parallel.activation_checkpointing", "resume": "train.resume",
    "reference": "parallel.reference", "wandb_project": "train.wandb_project",
}


def config_from_args(argv: Optional[List[str]] = None, prog: str = "train.py") -> tuple[Config, argparse.Namespace]:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        config = Config.from_file(args.config) if args.config else get_preset(args.preset)
        overrides = {field: getattr(args, flag) for flag, field in _FLAG_FIELDS.items() if getattr(args, flag) is not None}
        overrides.update(parse_set_items(args.set))
        if args.data and not args.config and "data.image_size" not in overrides:
            _follow_dataset_image_size(args.data, config, overrides)
        config = apply_overrides(config, overrides)
    except ConfigError as exc:
        # one line naming the field and the fix (argparse's usage block is for malformed flags)
        parser.exit(2, f"{prog}: error: {exc}\n")
    return config, args


def _follow_dataset_image_size(data: str, config: Config, overrides: dict) -> None:
    """``data.image_size`` not set explicitly (by --set or --config): take the prepared dataset's."""
    from reglue.data.shards import peek_image_size

    size = peek_image_size(data)
    if size is not None and size != config.data.image_size:
        overrides["data.image_size"] = size
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"data.image_size = {size}, as {data} holds (set --set data.image_size=N to insist on another)",
                  file=sys.stderr)


def main(argv: Optional[List[str]] = None, prog: str = "train.py") -> int:
    try:
        return _main(argv, prog)
    except KeyboardInterrupt:  # during training, SIGINT saves and exits 75 (reglue.train.preemption); here: start-up
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{prog}: interrupted (Ctrl-C) before training started; nothing was saved", file=sys.stderr)
        return 130


def _main(argv: Optional[List[str]], prog: str) -> int:
    config, args = config_from_args(argv, prog)
    if args.print_config:
        print(config.to_json())
        return 0
    from reglue.data.shards import DatasetError
    from reglue.checkpoint import CheckpointError
    from reglue.outputs import os_error_line
    from reglue.train.preemption import Preempted
    from reglue.train.trainer import NonFiniteError, run

    try:
        run(config, overwrite=args.overwrite)
    except Preempted as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    # OSError: also what no check foresaw (a disk full while writing metrics or plots, a folder gone read-only)
    except (ConfigError, CheckpointError, DatasetError, ValueError, NonFiniteError, OSError) as exc:
        if os.environ.get("REGLUE_DEBUG"):
            raise
        line = os_error_line(exc) if isinstance(exc, OSError) else exc
        print(f"{prog}: error: {line}\n(set REGLUE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 3 if isinstance(exc, NonFiniteError) else 2
    return 0
