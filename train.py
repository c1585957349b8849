#!/usr/bin/env python
"""Train a model. `python train.py` runs the tiny REGLUE demo on CPU; see README for real runs.

    torchrun --nproc_per_node=8 train.py --preset reglue-sit-xl-2 --data /data/imagenet-256 --out runs
"""

import sys

from reglue.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
