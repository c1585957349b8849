#!/usr/bin/env python
"""Turn ``pytest bench/ --benchmark-json`` files into the markdown summary of ../shared/GPU.md.

    python bench/summarize.py bench.json [more.json ...] [--ceilings ceilings.json]
                              [--versions versions.txt] [--log pytest-output.txt ...] [--out summary.md]

Per benchmark group (op, shape, mode): every provider's median, GB/s and TFLOP/s, their % of the
measured ceilings (copy bandwidth, bf16 matmul), and speed-ups against ``eager`` and ``compile``
(baseline time / this time; > 1 is faster). Then the issue's performance targets, checked where
the numbers exist, and the skip reasons found in the pytest logs (missing flash-attn, ...).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
from collections import OrderedDict

# (op, mode, what, threshold): checked against the triton provider of every matching group.
TARGETS = [
    ("adaln_modulate", "fwd", "pct_copy", 90.0, "LN+modulate forward >= 90% of copy bandwidth"),
    ("adaln_modulate", "fwd", "vs_compile", 1.1, "LN+modulate forward >= 1.1x Inductor"),
    ("adaln_modulate", "fwd+bwd", "vs_compile", 1.2, "LN+modulate fwd+bwd >= 1.2x Inductor"),
    ("compressor_encode", "fwd", "vs_eager", 1.5, "fused compressor >= 1.5x cuDNN conv + eager BN/ReLU"),
]
# (group prefix, provider, what, threshold, text) for throughput rows (train steps, data loading).
THROUGHPUT_TARGETS = [
    ("train-step reglue-sit-xl-2", "defaults", "mfu", 0.5, "SiT-XL/2 REGLUE train step, defaults, >= 50% MFU (issue 10)"),
    ("train-step reglue-sit-xl-2", "defaults", "vs_reference", 3.5, "SiT-XL/2 REGLUE, defaults, >= 3.5x --reference (issue 10)"),
    ("sample reglue-sit-xl-2", "ours", "vs_reference", 3.0, "SiT-XL/2 REGLUE 250-step SDE sampling >= 3x the published generate.py execution (issue 8)"),
    ("data", "dali-mixed", "img_per_s", 8000.0, "DALI mixed decode >= 8,000 img/s at 256px (issue 5)"),
    ("data", "dali-cpu", "vs_torch", 1.5, "DALI >= 1.5x the torch loader on CPU (issue 5)"),
]


def _fmt(value, digits=2, suffix=""):
    if value is None:
        return "–"
    return f"{value:.{digits}f}{suffix}"


def load_rows(bench_json: dict, ceilings: dict) -> "OrderedDict[str, list]":
    """group name -> rows (dicts) with derived % of ceiling and ratios, groups in file order."""
    copy_gbps = ceilings.get("copy_gbps")
    mma_tflops = ceilings.get("matmul_bf16_tflops")
    groups: "OrderedDict[str, list]" = OrderedDict()
    for bench in bench_json.get("benchmarks", []):
        info = dict(bench.get("extra_info") or {})
        median_ms = info.get("median_ms")
        if median_ms is None:  # a benchmark without our extra_info: fall back to pytest-benchmark's stats
            median_ms = bench["stats"]["median"] * 1e3
        row = {
            "group": bench.get("group") or bench["name"],
            "provider": info.get("provider") or info.get("variant") or bench.get("params", {}).get("provider", bench["name"]),
            "op": info.get("op"),
            "mode": info.get("mode"),
            "median_ms": median_ms,
            "gbps": info.get("gbps"),
            "tflops": info.get("tflops"),
            "img_per_s": info.get("img_per_s"),
            "mfu": info.get("mfu"),
            "peak_mem_gib": info.get("peak_mem_gib"),
            "eager_ops": info.get("eager_ops"),
            "compiled_graphs": info.get("compiled_graphs"),
        }
        row["pct_copy"] = 100 * row["gbps"] / copy_gbps if row["gbps"] and copy_gbps else None
        row["pct_mma"] = 100 * row["tflops"] / mma_tflops if row["tflops"] and mma_tflops else None
        groups.setdefault(row["group"], []).append(row)
    for rows in groups.values():
        by_provider = {r["provider"]: r for r in rows}
        for r in rows:
            for base in ("eager", "compile"):
                t = by_provider.get(base, {}).get("median_ms")
                r[f"vs_{base}"] = t / r["median_ms"] if t and r["median_ms"] else None
            for base in ("reference", "torch"):  # throughput ratios: train step vs reference, DALI vs torch
                b = by_provider.get(base, {}).get("img_per_s")
                r[f"vs_{base}"] = r["img_per_s"] / b if b and r["img_per_s"] else None
    return groups


def throughput_table(groups) -> list:
    """img/s (per GPU for train steps), MFU, ratios; for train steps also the peak memory, the ops
    that ran eager (a kernel that failed its self-check shows up here) and the compiled graphs."""
    lines = [
        "| benchmark | provider | img/s | MFU | vs reference | vs torch loader | peak GiB | eager ops | graphs |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, rows in groups.items():
        for r in rows:
            if r["img_per_s"] is not None:
                mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "–"
                eager = ", ".join(r["eager_ops"]) if r["eager_ops"] else "–"
                lines.append(f"| {name} | {r['provider']} | {_fmt(r['img_per_s'], 1)} | {mfu} | "
                             f"{_fmt(r['vs_reference'], 2, 'x')} | {_fmt(r['vs_torch'], 2, 'x')} | "
                             f"{_fmt(r['peak_mem_gib'], 1)} | {eager} | {r['compiled_graphs'] if r['compiled_graphs'] is not None else '–'} |")
    return lines


def throughput_targets(groups) -> list:
    lines = []
    for prefix, provider, key, threshold, text in THROUGHPUT_TARGETS:
        hits = [(name, r) for name, rows in groups.items() if name.startswith(prefix) for r in rows if r["provider"] == provider]
        if not hits:
            lines.append(f"- {text} — not measured in this run")
        for name, r in hits:
            value = r.get(key)
            verdict = "not measured (baseline missing)" if value is None else f"{'met' if value >= threshold else 'MISSED'}: {value:.3g}"
            lines.append(f"- {text} — {name}: {verdict}")
    return lines


def table(groups) -> list:
    lines = [
        "| benchmark | provider | median ms | GB/s | % copy BW | TFLOP/s | % bf16 MMA | vs eager | vs compile |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rows in groups.items():
        for r in rows:
            lines.append(
                f"| {name} | {r['provider']} | {_fmt(r['median_ms'], 4)} | {_fmt(r['gbps'], 1)} | "
                f"{_fmt(r['pct_copy'], 1, '%')} | {_fmt(r['tflops'], 2)} | {_fmt(r['pct_mma'], 1, '%')} | "
                f"{_fmt(r['vs_eager'], 2, 'x')} | {_fmt(r['vs_compile'], 2, 'x')} |"
            )
    return lines


def targets(groups) -> list:
    lines = []
    for op, mode, key, threshold, text in TARGETS:
        found = False
        for name, rows in groups.items():
            for r in rows:
                if r["op"] == op and r["mode"] == mode and r["provider"] == "triton":
                    found = True
                    value = r.get(key)
                    if value is None:
                        verdict = "not measured (baseline missing)"
                    else:
                        unit = "%" if key.startswith("pct") else "x"
                        verdict = f"{'met' if value >= threshold else 'MISSED'}: {value:.2f}{unit}"
                    lines.append(f"- {text} — {name}: {verdict}")
        if not found:
            lines.append(f"- {text} — not measured in this run")
    return lines


def skip_reasons(log_texts) -> list:
    """Unique 'SKIPPED [n] file:line: reason' lines from pytest -rs output."""
    seen = OrderedDict()
    for text in log_texts:
        for match in re.finditer(r"^SKIPPED \[(\d+)\] ([^\n]+)$", text, flags=re.MULTILINE):
            seen[match.group(2)] = seen.get(match.group(2), 0) + int(match.group(1))
    return [f"- {count}× {reason}" for reason, count in seen.items()]


def summarize(bench_json: dict, ceilings: dict, versions: str = "", logs=()) -> str:
    groups = load_rows(bench_json, ceilings)
    machine = bench_json.get("machine_info", {})
    device = ceilings.get("device") or next(
        (r.get("extra_info", {}).get("device") for r in bench_json.get("benchmarks", []) if r.get("extra_info")), "?"
    )
    out = [
        f"# reglue benchmarks — {device}",
        "",
        f"Date: {bench_json.get('datetime', datetime.datetime.now().isoformat())}; "
        f"host: {machine.get('node', '?')}, python {machine.get('python_version', '?')}.",
        "",
    ]
    if versions.strip():
        out += ["## Versions", "", "```", versions.strip(), "```", ""]
    out += ["## Ceilings (measured)", ""]
    if ceilings:
        out.append(
            f"- copy bandwidth (read + write): {_fmt(ceilings.get('copy_gbps'), 1)} GB/s; "
            f"bf16 matmul: {_fmt(ceilings.get('matmul_bf16_tflops'), 1)} TFLOP/s"
        )
    else:
        out.append("- not measured (no --ceilings file): % columns are empty")
    out += ["", "## Results", "", "Speed-ups are baseline median / this median (> 1: faster than the baseline).", ""]
    out += table(groups)
    if any(r["img_per_s"] is not None for rows in groups.values() for r in rows):
        out += ["", "## Throughput", ""] + throughput_table(groups)
    out += ["", "## Targets", ""] + targets(groups) + throughput_targets(groups)
    skips = skip_reasons(logs)
    if skips:
        out += ["", "## Skipped", ""] + skips
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_json", nargs="+", help="one or more pytest-benchmark JSON files (merged)")
    parser.add_argument("--ceilings", help="JSON from `python bench/_roofline.py --out ...`")
    parser.add_argument("--versions", help="text file with the device/driver/library versions")
    parser.add_argument("--log", action="append", default=[], help="pytest output (with -rs) to collect skip reasons from")
    parser.add_argument("--out", help="write the markdown here (it is printed either way)")
    args = parser.parse_args(argv)
    bench_json = {}
    for path in args.bench_json:
        with open(path) as f:
            part = json.load(f)
        benchmarks = bench_json.get("benchmarks", []) + part.get("benchmarks", [])
        bench_json = {**part, **bench_json, "benchmarks": benchmarks}
    ceilings = {}
    if args.ceilings:
        try:
            with open(args.ceilings) as f:
                ceilings = json.load(f)
        except (OSError, ValueError) as e:
            print(f"(ceilings unreadable: {e})")
    versions = open(args.versions).read() if args.versions else ""
    logs = []
    for path in args.log:
        try:
            with open(path) as f:
                logs.append(f.read())
        except OSError:
            pass
    text = summarize(bench_json, ceilings, versions, logs)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
