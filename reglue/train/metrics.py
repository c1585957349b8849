"""Rank-0 metrics of a run: the metrics JSONL (and TensorBoard / wandb); FLOP and MFU helpers.

Pictures (training curves, sample grids) are drawn in :mod:`reglue.train.plots`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import torch

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, used for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def device_peak_flops(device: torch.device) -> Optional[float]:
    """Peak bf16 FLOP/s of a CUDA device we know; None elsewhere (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def count_flops(fn) -> int:
    """FLOPs of ``fn()`` counted by torch's FlopCounterMode (matmuls, convs, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


class MetricsWriter:
    """Appends one JSON object per line; on resume, lines past the resumed step are dropped so the
    file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int = 0, tensorboard_dir: Optional[Path] = None,
                 wandb_project: Optional[str] = None, run_name: str = "run", config: Optional[Dict] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line.strip() and self._step(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard_dir), purge_step=resume_step + 1)
            except ImportError:
                pass  # optional: TensorBoard is used when installed
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError(f"train.wandb_project={wandb_project!r} needs the wandb package (pip install wandb)") from None
            self.wandb = wandb.init(project=wandb_project, name=run_name, config=config, resume="allow")

    @staticmethod
    def _step(line: str) -> int:
        try:
            return int(json.loads(line).get("step", 0))
        except (json.JSONDecodeError, ValueError, TypeError):
            return 1 << 62

    def write(self, record: Dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])


def read_metrics(path: Path) -> List[Dict]:
    """The records of a metrics.jsonl; a line that does not parse (the last one of a process killed
    mid-write) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def report_class_match(dataset, images: torch.Tensor, labels: torch.Tensor, metrics: MetricsWriter, step: int) -> Optional[str]:
    """For a dataset with a fixed classifier of its classes (the synthetic set's
    :class:`~reglue.data.synthetic.HueClassifier`): the share of ``images`` (uint8 (N, 3, H, W))
    it assigns to their conditioning ``labels`` (N,), written as ``eval/class_match`` at ``step``;
    returns the line saying so (None for other datasets)."""
    if not hasattr(dataset, "classifier"):
        return None
    share = dataset.classifier().accuracy(images, labels)
    metrics.write({"step": step, "eval/class_match": share})
    hits = round(share * len(labels))
    return (f"class match: {hits}/{len(labels)} EMA samples ({share:.0%}) are assigned to their conditioning class "
            f"by the fixed hue classifier of the synthetic set (chance: 1 in {len(torch.unique(labels))})")
