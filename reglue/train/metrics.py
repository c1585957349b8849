"""Rank-0 metrics of a run: FLOP and MFU helpers and the class-match line (the metrics log is
``reglue.outputs.MetricsWriter``; pictures are drawn in :mod:`reglue.train.plots`)."""

from __future__ import annotations

from typing import Optional

import torch

from reglue.outputs import MetricsWriter

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


def sit_flops_per_image(config) -> int:
    """Training FLOPs of the SiT for one image (forward and backward), counted on a meta-device
    copy (shapes only), so no weights are allocated and no training model is touched."""
    from reglue.models import build_model

    with torch.device("meta"):
        model = build_model(config, kernels="eager")
        x = torch.zeros(1, config.in_channels, config.data.latent_size, config.data.latent_size)
        cls = torch.zeros(1, model.cls_token_dim) if model.cls_token_dim else None
        t, y = torch.zeros(1), torch.zeros(1, dtype=torch.long)

    def fwd_bwd():
        out, zs, cls_out = model(x, t, y, cls)
        loss = out.sum() + sum(z.sum() for z in zs) + (cls_out.sum() if cls_out is not None else 0)
        loss.backward()

    return count_flops(fwd_bwd)


def report_class_match(dataset, images: torch.Tensor, labels: torch.Tensor, metrics: MetricsWriter, step: int) -> Optional[str]:
    """For a dataset with a fixed classifier of its classes (the synthetic set's
    :class:`~reglue.data.synthetic.HueClassifier`): the share of ``images`` (uint8 (N, 3, H, W))
    it assigns to their conditioning ``labels`` (N,), written as ``eval/class_match`` at ``step``;
    returns the line saying so (None for other datasets)."""
    if not hasattr(dataset, "classifier"):
        return None
    share = dataset.classifier().accuracy(images, labels)
    metrics.write({"step": step, "eval/class_match": share})
    return class_match_line(share, labels)


def class_match_line(share: float, labels: torch.Tensor) -> str:
    """The line of a class-match ``share`` of samples drawn for ``labels`` (N,)."""
    hits = round(share * len(labels))
    return (f"class match: {hits}/{len(labels)} EMA samples ({share:.0%}) are assigned to their conditioning class "
            f"by the fixed hue classifier of the synthetic set (chance: 1 in {len(torch.unique(labels))})")
