"""Rank-0 metrics of a run: FLOP and MFU helpers and the class-match lines (the metrics log is
``reglue.outputs.MetricsWriter``; pictures are drawn in :mod:`reglue.train.plots`)."""

from __future__ import annotations

from typing import Dict, List, Optional

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


def report_class_match(dataset, images: torch.Tensor, labels: torch.Tensor, metrics: MetricsWriter, step: int) -> List[str]:
    """For a dataset with fixed classifiers of its classes (the synthetic set's hue and shape
    classifiers, :meth:`~reglue.data.synthetic.SyntheticShapes.classifiers`): the share of
    ``images`` (uint8 (N, 3, H, W)) each assigns to their conditioning ``labels`` (N,), written as
    ``eval/class_match`` (hue) and ``eval/shape_match`` at ``step``; returns a line per classifier
    saying so (none for other datasets)."""
    if not hasattr(dataset, "classifiers"):
        return []
    shares = {kind: classifier.accuracy(images, labels) for kind, classifier in dataset.classifiers().items()}
    metrics.write({"step": step, "eval/class_match": shares["hue"], "eval/shape_match": shares["shape"]})
    return class_match_lines(shares, labels)


def class_match_lines(shares: Dict[str, float], labels: torch.Tensor) -> List[str]:
    """The lines of the class-match ``shares`` ({"hue": share, "shape": share}) of samples drawn
    for ``labels`` (N,): "class match: ..." (hue) and "shape match: ..."."""
    chance = len(torch.unique(labels))
    return [f"{'class' if kind == 'hue' else kind} match: {round(share * len(labels))}/{len(labels)} EMA samples ({share:.0%}) "
            f"are assigned to their conditioning class by the fixed {kind} classifier of the synthetic set (chance: 1 in {chance})"
            for kind, share in shares.items()]
