"""A scaling projection, on paper, from measured parts: step time and img/s of a preset on 1-128
GPUs for flat FSDP, HSDP and replication, with, per GPU and per step, the bytes a rank keeps of
parameters, gradients, AdamW moments and EMA, the training FLOPs, and the collective bytes within
and across nodes. A PROJECTION, not a measurement.

What is measured or counted, and what is assumed:
- parameters and training FLOPs per image: counted on a meta-device model with the trainer's own
  counter (``reglue.train.metrics``: torch's FlopCounterMode over the SiT's forward and backward,
  plus the frozen DINOv2's forward; the VAE is not run, the latents are precomputed as in real
  training; the compressor's few convolutions are left out);
- collective bytes per parameter per step and rank: the counter's figures from
  ``bench/bench_comm.py`` (``bench/results/comm_per_param.json``, 2 simulated nodes on CPU,
  fp32), with the all-gathers halved for the bf16 parameters of a CUDA run (``param_dtype``),
  the reductions kept fp32 (``reduce_dtype``) and HSDP's all-reduce rescaled to the shard degree;
- assumed: compute at ``--mfu`` of the GPU's dense bf16 peak; ring collectives, so a group of n
  ranks moves (n - 1) / n of an all-gather's or reduce-scatter's buffer per rank and 2 (n - 1) / n
  of an all-reduce's, at NVLink speed within a node and at the per-GPU network speed when the
  group spans nodes; no latency terms; "overlapped" = max(compute, communication) (FSDP2's
  prefetch hides the collectives entirely), "serial" = their sum (nothing hidden). The truth lies
  between the two columns; a measured GPU run replaces the row it measures.

  python bench/scaling.py --preset reglue-sit-xl-2 --gpu H100            # markdown table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COUNTS = ROOT / "bench" / "results" / "comm_per_param.json"
GPUS = (1, 8, 16, 32, 64, 128)
BATCHES = (256, 1024)
STRATEGIES = ("flat-fsdp", "hsdp", "replicate")
# Per GPU, one direction, GB/s: NVLink (A100: NVLink3 600 GB/s both ways; H100: NVLink4 900) and
# the usual one NIC per GPU (A100 HDR 200 Gb/s, H100 NDR 400 Gb/s).
LINKS = {"A100": (300.0, 25.0), "H100": (450.0, 50.0)}
STATE_BYTES_PER_PARAM = {"parameters": 4, "gradients": 4, "AdamW moments": 8, "EMA": 4}
"""What a rank keeps per parameter of its shard, all fp32 (FSDP2 shards each over the shard group;
the AdamW moments are two)."""


def preset_counts(preset: str) -> dict:
    """Parameters (trainable) and training FLOPs per image of ``preset``, counted on meta tensors."""
    import torch

    from reglue.models import build_model
    from reglue.models.encoders import build_dinov2
    from reglue.presets import get_preset
    from reglue.train.metrics import count_flops, sit_flops_per_image

    config = get_preset(preset)
    enc, size = config.encoders, config.data.image_size
    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(config, kernels="eager").parameters() if p.requires_grad)
        dinov2_flops = 0
        if config.method.needs_dinov2:
            dinov2 = build_dinov2(enc.dinov2, None, image_size=size, layers=enc.feature_layers, attention="sdpa",
                                  **enc.dinov2_overrides)
            images = torch.zeros(1, 3, size, size, dtype=torch.uint8)
            dinov2_flops = count_flops(lambda: dinov2(images))
    return {"params": params, "sit_flops": sit_flops_per_image(config), "dinov2_flops": dinov2_flops}


def shape(strategy: str, gpus: int, per_node: int) -> tuple:
    """(replicate, shard) of ``strategy`` on ``gpus`` GPUs, ``per_node`` to a node."""
    if strategy == "replicate":
        return gpus, 1
    if strategy == "flat-fsdp":
        return 1, gpus
    shard = min(gpus, per_node)
    return gpus // shard, shard


def comm_per_rank(strategy: str, gpus: int, per_node: int, params: int, counts: dict) -> dict:
    """Buffer bytes of one step's collectives per rank, within and across nodes, and their time
    model's inputs: [(bytes, group size, spans nodes, ring factor)]."""
    measured = counts["meshes"][strategy]
    per = measured["bytes_per_param"]
    rep, shard = shape(strategy, gpus, per_node)
    nodes = -(-gpus // per_node)
    items = []
    all_gather = sum(per["all_gather"].values()) / 2  # bf16 parameters on CUDA, fp32 in the count
    reduce_scatter = sum(per["reduce_scatter"].values())
    all_reduce = sum(per["all_reduce"].values())
    if strategy == "hsdp":  # the count is of a 2-way shard: rescale the all-reduced shard
        all_reduce *= measured["mesh"]["shard"] / shard
    shard_spans = shard > per_node
    if shard > 1:
        items += [(all_gather * params, shard, shard_spans, 1.0), (reduce_scatter * params, shard, shard_spans, 1.0)]
    if rep > 1:
        items.append((all_reduce * params, rep, nodes > 1, 2.0))
    within = sum(b for b, _, spans, _ in items if not spans)
    across = sum(b for b, _, spans, _ in items if spans)
    return {"items": items, "within": within, "across": across, "replicate": rep, "shard": shard}


def project(counts: dict, preset_facts: dict, gpu: str, per_node: int, nvlink: float, network: float, mfu: float) -> list:
    from reglue.train.metrics import PEAK_TFLOPS

    flops = preset_facts["sit_flops"] + preset_facts["dinov2_flops"]
    rows = []
    for batch in BATCHES:
        for gpus in GPUS:
            for strategy in STRATEGIES:
                if gpus == 1 and strategy != "flat-fsdp":
                    continue  # one GPU: nothing to shard or replicate
                comm = comm_per_rank(strategy, gpus, min(per_node, gpus), preset_facts["params"], counts)
                compute = flops * batch / gpus / (PEAK_TFLOPS[gpu] * 1e12 * mfu)
                seconds = sum(b * factor * (n - 1) / n / ((network if spans else nvlink) * 1e9)
                              for b, n, spans, factor in comm["items"])
                serial, overlapped = compute + seconds, max(compute, seconds)
                rows.append({"batch": batch, "gpus": gpus, "nodes": -(-gpus // per_node), "strategy": strategy,
                             "mesh": f"{comm['replicate']} x {comm['shard']}",
                             "state_gb": {k: b * preset_facts["params"] / comm["shard"] / 1e9 for k, b in STATE_BYTES_PER_PARAM.items()},
                             "tflop_per_gpu": flops * batch / gpus / 1e12, "within_gb": comm["within"] / 1e9,
                             "across_gb": comm["across"] / 1e9, "compute_ms": compute * 1e3, "comm_ms": seconds * 1e3,
                             "step_ms": (serial * 1e3, overlapped * 1e3), "img_s": (batch / serial, batch / overlapped)})
    return rows


def markdown(rows: list, preset: str, facts: dict, gpu: str, per_node: int, nvlink: float, network: float, mfu: float) -> str:
    flops = facts["sit_flops"] + facts["dinov2_flops"]
    head = [f"**Projection, not a measurement** — `{preset}` on {gpu}, {per_node} GPUs per node; "
            f"{facts['params'] / 1e6:.1f} M trainable parameters; {flops / 1e12:.3f} TFLOP per training image "
            f"(SiT forward + backward {facts['sit_flops'] / 1e12:.3f}, DINOv2 forward {facts['dinov2_flops'] / 1e12:.3f}); "
            f"compute at {mfu:.0%} MFU of {gpu} bf16 peak; NVLink {nvlink:g} GB/s and network {network:g} GB/s per GPU; "
            "ring collectives, no latency; bf16 parameter all-gathers, fp32 reductions. Per rank, fp32, sharded over the "
            f"shard group: {', '.join(f'{k} {v} B' for k, v in STATE_BYTES_PER_PARAM.items())} x parameters / shard. "
            "TFLOP/GPU/step: the global batch's training FLOPs / GPUs. Step time and img/s: serial / overlapped.", "",
            "| global batch | GPUs | nodes | strategy | mesh | params GB/rank | grads GB/rank | AdamW GB/rank | EMA GB/rank "
            "| TFLOP/GPU/step | GB/step/rank within node | across nodes | compute ms | comm ms | step ms | img/s |", "|---" * 16 + "|"]
    for r in rows:
        state = " | ".join(f"{r['state_gb'][k]:.2f}" for k in STATE_BYTES_PER_PARAM)
        head.append(f"| {r['batch']} | {r['gpus']} | {r['nodes']} | {r['strategy']} | {r['mesh']} | {state} | {r['tflop_per_gpu']:.1f} | "
                    f"{r['within_gb']:.2f} | {r['across_gb']:.2f} | {r['compute_ms']:.1f} | {r['comm_ms']:.1f} | "
                    f"{r['step_ms'][0]:.1f} / {r['step_ms'][1]:.1f} | {r['img_s'][0]:.0f} / {r['img_s'][1]:.0f} |")
    return "\n".join(head)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="reglue-sit-xl-2")
    parser.add_argument("--gpu", choices=sorted(LINKS), default="H100")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--nvlink-gbs", type=float, help="NVLink GB/s per GPU, one direction (default: A100 300, H100 450)")
    parser.add_argument("--network-gbs", type=float, help="inter-node GB/s per GPU (default: A100 25, H100 50 = 400 Gb/s)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation of the compute (default 0.4)")
    parser.add_argument("--counts", type=Path, default=COUNTS, help="bench_comm.py --json output")
    args = parser.parse_args(argv)
    nvlink = args.nvlink_gbs or LINKS[args.gpu][0]
    network = args.network_gbs or LINKS[args.gpu][1]
    counts = json.loads(args.counts.read_text())
    facts = preset_counts(args.preset)
    rows = project(counts, facts, args.gpu, args.gpus_per_node, nvlink, network, args.mfu)
    text = markdown(rows, args.preset, facts, args.gpu, args.gpus_per_node, nvlink, network, args.mfu)
    print(text)
    return text


if __name__ == "__main__":
    main()
