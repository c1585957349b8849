"""Rank-0 outputs of a run: loss-curve PNG, image grids; FLOP and MFU helpers (the metrics log is
``reglue.outputs.MetricsWriter``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional

import torch
from PIL import Image, ImageDraw

from reglue.outputs import MetricsWriter, read_metrics  # noqa: F401  (moved to reglue.outputs; kept importable here)

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
    with torch.compiler.set_stance("force_eager"), counter:  # compiled regions run (and count) as eager
        fn()
    return counter.get_total_flops()


def plot_losses(records: List[Dict], path: Path, keys=("total", "latent", "semantic", "cls", "align"), size=(720, 420)) -> None:
    """A small line chart of the loss components against the step (PIL only, no matplotlib)."""
    width, height = size
    margin_l, margin_r, margin_t, margin_b = 60, 130, 20, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    series = {k: [(r["step"], r[f"loss/{k}"]) for r in records if math.isfinite(r.get(f"loss/{k}", math.nan))] for k in keys}
    series = {k: v for k, v in series.items() if v and any(abs(y) > 0 for _, y in v)}
    points = [p for v in series.values() for p in v]
    x0, y0, x1, y1 = margin_l, margin_t, width - margin_r, height - margin_b
    draw.rectangle([x0, y0, x1, y1], outline="black")
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        xmin, xmax = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        ymin, ymax = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
        to_px = lambda x, y: (x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (y - ymin) / (ymax - ymin) * (y1 - y0))  # noqa: E731
        for i, (key, pts) in enumerate(series.items()):
            colour = colours[i % len(colours)]
            if len(pts) > 1:
                draw.line([to_px(x, y) for x, y in pts], fill=colour, width=2)
            draw.text((x1 + 10, y0 + 16 * i), key, fill=colour)
        for frac in (0.0, 0.5, 1.0):
            y = ymin + frac * (ymax - ymin)
            draw.text((4, to_px(xmin, y)[1] - 6), f"{y:.3g}", fill="black")
        draw.text((x0, y1 + 8), f"step {xmin}", fill="black")
        draw.text((x1 - 70, y1 + 8), f"step {xmax}", fill="black")
    draw.text((x0 + 4, 2), "training loss", fill="black")
    img.save(path)


def save_grid(images: torch.Tensor, path: Path, nrow: int = 4) -> None:
    """images: uint8 (N, 3, H, W) -> one PNG grid."""
    n, _, h, w = images.shape
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    grid = Image.new("RGB", (ncol * w, rows * h))
    for i in range(n):
        tile = Image.fromarray(images[i].permute(1, 2, 0).cpu().numpy())
        grid.paste(tile, ((i % ncol) * w, (i // ncol) * h))
    grid.save(path)
