"""Pictures of runs: training curves (matplotlib), sample grids (torchvision), ``reglue plot``.

- :func:`metrics_figure` / :func:`save_metrics_plot`: one panel per loss component (log scale
  where every value is positive), gradient norm, learning rate, images/s, and every ``eval/*``
  key (FID and friends from in-training evaluation, the demo's class and shape match) against the step;
  each panel shows the logged points faintly and a smoothed line over them. Several runs overlay
  in the same panels, one colour per run.
- :func:`save_sample_grid`: ``torchvision.utils.make_grid`` rows, each with a caption strip under
  it naming the classes of its images (one name when the row is one class).
- ``reglue plot RUN [RUN ...] [--out FILE]``: the figure for several runs, to compare methods.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot): no global state, no GUI
backend, safe to call from a training process.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from reglue.outputs import add_overwrite_flag, atomic_path, ensure_output_file, read_metrics, removed_on_failure

log = logging.getLogger("reglue.plots")

METRICS_PLOT = "metrics.png"
"""The run's training-curve figure, next to its metrics.jsonl."""

_SCALAR_PANELS = (("grad_norm", "gradient norm"), ("lr", "learning rate"), ("img_per_s", "throughput (images/s)"))


def _panel_keys(runs: Mapping[str, List[Dict]]) -> List[str]:
    """loss/* (total first), then grad norm, lr, img/s, then eval/*: those any run logged."""
    keys = {k for records in runs.values() for r in records for k, v in r.items() if _is_number(v)}
    losses = sorted((k for k in keys if k.startswith("loss/")), key=lambda k: (k != "loss/total", k))
    scalars = [k for k, _ in _SCALAR_PANELS if k in keys]
    evals = sorted(k for k in keys if k.startswith("eval/"))
    return losses + scalars + evals


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_EVAL_NAMES = {"fid": "FID", "sfid": "sFID", "is": "Inception Score", "fd_dinov2": "FD-DINOv2"}


def _title(key: str) -> str:
    """``loss/latent`` -> "latent (loss)", ``eval/fid`` -> "FID (evaluation)", ``lr`` -> "learning rate"."""
    names = dict(_SCALAR_PANELS)
    if key in names:
        return names[key]
    group, _, name = key.partition("/")
    name = _EVAL_NAMES.get(name, name.replace("_", " "))
    return f"{name} ({'loss' if group == 'loss' else 'evaluation'})"


def _series(records: Sequence[Dict], key: str):
    points = [(r["step"], r[key]) for r in records if "step" in r and _is_number(r.get(key))]
    return np.array([p[0] for p in points], dtype=float), np.array([p[1] for p in points], dtype=float)


def smooth(values: np.ndarray, log_scale: bool = False) -> np.ndarray:
    """Bias-corrected exponential moving average spanning about 1/25 of the points (none below
    75 points); in log space for log-scaled panels, so one spike does not lift the line for long."""
    span = len(values) // 25
    if span < 3:
        return values
    x = np.log(values) if log_scale else values
    decay = 1 - 2 / (span + 1)
    out, acc, norm = np.empty_like(x), 0.0, 0.0
    for i, v in enumerate(x):
        acc, norm = decay * acc + v, decay * norm + 1
        out[i] = acc / norm
    return np.exp(out) if log_scale else out


def _format_y(ax, log_scale: bool) -> None:
    """Plain numbers on log axes (``0.6``, ``2``, ``1,000`` rather than ``6×10⁻¹``), with the minor
    ticks (2, 3, 5 ...) labelled too unless two powers of ten are in view; a common power of ten on
    linear axes with tiny or huge values."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, ScalarFormatter

    if not log_scale:
        formatter = ScalarFormatter(useOffset=False, useMathText=True)
        formatter.set_powerlimits((-3, 4))  # 1e-4 learning rates read "1.0" with "×10⁻⁴" on top
        ax.yaxis.set_major_formatter(formatter)
        return
    formatter = FuncFormatter(lambda v, _: f"{v:.3g}" if v < 1000 else f"{v:,.0f}")
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    ax.yaxis.set_major_formatter(formatter)
    powers_of_ten_shown = math.floor(math.log10(high)) - math.ceil(math.log10(low)) + 1
    if powers_of_ten_shown < 2:  # label 2, 3, 5 (or finer) too, or the axis would carry one number
        ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0) if high / low > 4 else (1.2, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0)))
        ax.yaxis.set_minor_formatter(formatter)
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())


def metrics_figure(runs: Mapping[str, List[Dict]], columns: int = 3):
    """A matplotlib Figure with one panel per metric of ``runs`` ({label: metrics.jsonl records}).
    Panel titles name the metrics (:func:`_title`); a legend names the runs when there are several."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    keys = _panel_keys(runs)
    if not keys:
        raise ValueError("no metrics to plot yet (metrics.jsonl has no numeric rows)")
    rows = math.ceil(len(keys) / columns)
    width, height = 4.2 * columns, 2.9 * rows + (0.3 if len(runs) > 1 else 0)
    fig = Figure(figsize=(width, height))
    # fixed margins in inches (a layout engine would draw the figure twice: a second per plot on a CPU)
    fig.subplots_adjust(left=0.5 / width, right=1 - 0.15 / width, bottom=0.45 / height,
                        top=1 - (0.3 + (0.3 if len(runs) > 1 else 0)) / height, wspace=0.28, hspace=0.55)
    axes = fig.subplots(rows, columns, squeeze=False, sharex=True).ravel()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, key in zip(axes, keys):
        series = {label: _series(records, key) for label, records in runs.items()}
        log_scale = all((y > 0).all() for _, y in series.values()) and any(len(y) for _, y in series.values()) \
            and key != "lr" and not key.startswith("eval/")
        for (label, (x, y)), colour in zip(series.items(), colours):
            if not len(x):
                continue
            ax.plot(x, y, color=colour, alpha=0.3, linewidth=0.8, marker="." if len(x) < 50 else None, markersize=3)
            ax.plot(x, smooth(y, log_scale), color=colour, linewidth=1.6, label=label, marker="o" if len(x) < 3 else None)
        _format_y(ax, log_scale)
        ax.set_title(_title(key), fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.tick_params(which="both", labelsize=8, labelbottom=True)
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    if len(runs) > 1:  # one entry per run, from whichever panel has it (a run may lack some metrics)
        handles = {}
        for ax in axes[: len(keys)]:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, handle)
        fig.legend(list(handles.values()), list(handles), loc="upper center", ncols=min(len(runs), 4), fontsize=9,
                   frameon=False)
    return fig


def save_metrics_plot(runs: Mapping[str, List[Dict]], path: Path, dpi: int = 100) -> Path:
    path = Path(path)
    fig = metrics_figure(runs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    return path


def write_run_plot(run_dir: Path) -> Optional[Path]:
    """``run_dir/metrics.png`` from ``run_dir/metrics.jsonl``; None (nothing written) while there is
    no numeric row yet (a checkpoint before the first log step). Called at every checkpoint and at
    the end of a run."""
    metrics = Path(run_dir) / "metrics.jsonl"
    records = read_metrics(metrics) if metrics.is_file() else []
    if not _panel_keys({"run": records}):
        return None
    try:
        return save_metrics_plot({Path(run_dir).name: records}, Path(run_dir) / METRICS_PLOT)
    except ImportError as err:  # an environment installed before matplotlib was a dependency: train on
        log.warning("no %s: %s (pip install matplotlib)", METRICS_PLOT, err)
        return None


# --------------------------------------------------------------------------------------------
# Sample grids
# --------------------------------------------------------------------------------------------


def dataset_class_names(dataset) -> Optional[List[str]]:
    """Class names of a training set: its ``class_names`` (the synthetic set), or the name -> index
    map a prepared dataset keeps in ``dataset.json``; None when it has none."""
    names = getattr(dataset, "class_names", None)
    if names is None:
        classes = getattr(dataset, "meta", {}).get("classes")
        if isinstance(classes, dict):
            names = [name for name, _ in sorted(classes.items(), key=lambda item: item[1])]
    return list(names) if names else None


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or without FreeType: the bitmap font
        return ImageFont.load_default()


def _caption_strip(texts: Sequence[str], width: int, tile: int, padding: int, height: int = 14) -> torch.Tensor:
    """uint8 (3, height, width): one centred text, or one per ``tile``-wide slot."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(strip)
    font = _font(height - 4)
    room = width if len(texts) == 1 else tile + padding
    for i, text in enumerate(texts):
        while text and draw.textlength(text, font=font) > room - 2:
            text = text[:-1]
        centre = width / 2 if len(texts) == 1 else padding + i * (tile + padding) + tile / 2
        draw.text((centre, height / 2), text, fill="black", font=font, anchor="mm")
    return torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1)


def grid_columns(labels: Optional[torch.Tensor], count: int) -> int:
    """Columns of a sample grid: the images per class when every class has as many (one row per
    class after :func:`save_sample_grid` sorts them), else about a square."""
    if labels is not None and len(labels):
        per_class = torch.unique(labels, return_counts=True)[1]
        if (per_class == per_class[0]).all() and per_class[0] > 1:
            return int(per_class[0])
    return max(1, math.ceil(math.sqrt(count)))


def save_sample_grid(images: torch.Tensor, path: Path, labels: Optional[torch.Tensor] = None,
                     class_names: Optional[Sequence[str]] = None, padding: int = 2) -> Path:
    """images: uint8 (N, 3, H, W); labels: (N,) class indices. Written with torchvision's
    ``make_grid``/``save_image``; with labels, images are grouped by class (stable order), and with
    names too each row gets a caption strip naming its class (or each image's class)."""
    from torchvision.utils import make_grid, save_image

    images = images.cpu()
    columns = grid_columns(labels, len(images))
    if labels is not None:
        labels = labels.cpu()
        order = torch.sort(labels, stable=True).indices
        images, labels = images[order], labels[order]
    if labels is None or class_names is None:
        grid = make_grid(images, nrow=columns, padding=padding, pad_value=255)
    else:
        parts = []
        for start in range(0, len(images), columns):
            row_images = images[start : start + columns]
            blank = torch.full((columns - len(row_images), *images.shape[1:]), 255, dtype=torch.uint8)
            row = make_grid(torch.cat([row_images, blank]), nrow=columns, padding=padding, pad_value=255)
            names = [class_names[k] if k < len(class_names) else f"class {k}" for k in labels[start : start + columns].tolist()]
            parts += [row, _caption_strip(names[:1] if len(set(names)) == 1 else names, row.shape[-1], images.shape[-1], padding)]
        grid = torch.cat(parts, dim=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_image(grid.float() / 255, tmp)
    return path


# --------------------------------------------------------------------------------------------
# reglue plot
# --------------------------------------------------------------------------------------------


def _run_records(run: str) -> List[Dict]:
    path = Path(run)
    metrics = path if path.is_file() else path / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{run}: no metrics.jsonl there (give run directories or metrics.jsonl files)")
    return read_metrics(metrics)


def _labels(runs: Sequence[str]) -> List[str]:
    """Short names: the run directories' names, full paths where two would be the same."""
    dirs = [Path(r).parent if Path(r).is_file() else Path(r) for r in runs]
    names = [d.resolve().name for d in dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, dirs)]


def _figure_suffixes() -> List[str]:
    """The file endings matplotlib writes (``.png``, ``.pdf``, ``.svg``, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return sorted(f".{ext}" for ext in FigureCanvasBase.get_supported_filetypes())


def cmd_plot(args) -> int:
    with removed_on_failure():
        out = ensure_output_file(args.out, "--out", suffixes=_figure_suffixes(), overwrite=args.overwrite)
        runs = dict(zip(_labels(args.runs), (_run_records(r) for r in args.runs)))
        out = save_metrics_plot(runs, out)
    print(f"wrote {out}: {len(_panel_keys(runs))} panels, runs {', '.join(runs)}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="training curves of one or several runs in one figure (to compare methods)",
                       description="One panel per metric of the runs' metrics.jsonl (losses, grad norm, lr, img/s, "
                                   "eval/*) against the step, every run as a line of its own.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (or their metrics.jsonl files)")
    p.add_argument("--out", default="runs-plot.png", help="output image (default: runs-plot.png)")
    add_overwrite_flag(p)
    p.set_defaults(func=cmd_plot)
