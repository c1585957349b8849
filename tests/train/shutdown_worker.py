"""Run under torchrun by tests/train/test_distributed.py::test_no_communication_thread_outlives_run:
trains the tiny preset for two steps with each execution named on the command line (``fsdp``,
``reference``), one after the other in the same processes, through ``reglue.train.trainer.run``,
and prints, per execution, the names of this process's threads still alive after it returned."""

import json
import os
import sys

from reglue.config import apply_overrides
from reglue.presets import get_preset
from reglue.train.trainer import run


def thread_names():
    return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))


out_dir = sys.argv[1]
for execution in sys.argv[2:]:
    config = apply_overrides(get_preset("tiny"), {
        "train.out_dir": out_dir, "train.name": execution, "train.max_steps": "2", "sample.steps": "2",
        "train.num_sample_images": "2", "data.synthetic_size": "64", "train.tensorboard": "false", "train.metrics_plot": "false",
        "parallel.reference": str(execution == "reference").lower()})
    run(config)
    print("THREADS", json.dumps({"rank": int(os.environ["RANK"]), "execution": execution, "threads": thread_names()}), flush=True)
