#!/usr/bin/env python
"""Train a model. `python train.py` runs the tiny REGLUE demo on CPU; see README for real runs.

    torchrun --nproc_per_node=8 train.py --preset reglue-sit-xl-2 --data /data/imagenet-256 --out runs
"""

import sys

if __name__ == "__main__":
    try:  # a Ctrl-C while torch is imported: one line, exit 130 (from then on reglue.train.cli.main says it)
        from reglue.interrupts import deferred_interrupt

        with deferred_interrupt():  # raised after the imports: inside them it could abort the process
            from reglue.train.cli import main
    except KeyboardInterrupt:
        print("train.py: interrupted (Ctrl-C) before training started; nothing was saved", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
