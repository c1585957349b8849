"""The ``reglue`` command line: a bad output path is one error line, found before the work starts;
an OS error no check foresaw is one line too (no traceback)."""

import json
from pathlib import Path

import pytest

from reglue import cli, outputs
from reglue.train import plots


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss/total": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    return run


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    return captured.err.strip()


def test_plot_checks_its_output_before_reading_the_runs(tmp_path, capsys, monkeypatch):
    """An unwritable folder (a write into it fails, as for a user without the permission) is
    refused before the runs are read: the missing run is not what the error names."""
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(outputs.tempfile, "mkstemp", denied)
    assert cli.main(["plot", str(tmp_path / "missing-run"), "--out", str(tmp_path / "locked" / "plot.png")]) == 2
    assert _error_line(capsys) == (f"reglue plot: error: --out {tmp_path / 'locked'}: the directory is not writable "
                                   "(Permission denied)")


def test_the_write_check_writes_for_real_and_leaves_nothing(tmp_path):
    """os.access answers yes to root everywhere (e.g. /proc): the check writes a probe file instead."""
    assert outputs.ensure_output_file(tmp_path / "sub" / "x.json") == tmp_path / "sub" / "x.json"
    assert list((tmp_path / "sub").iterdir()) == []
    proc = Path("/proc")
    if proc.is_dir():
        with pytest.raises(outputs.OutputError, match="/proc: the directory is not writable"):
            outputs.ensure_output_file(proc / "x.json")


@pytest.mark.parametrize("out, why", [("plot.txt", "the file name must end in .avif or"),
                                      ("file/plot.png", "a file is in the way of this directory")])
def test_plot_refuses_a_bad_output_path(run, tmp_path, capsys, out, why):
    (tmp_path / "file").write_text("")
    assert cli.main(["plot", str(run), "--out", str(tmp_path / out)]) == 2
    assert why in _error_line(capsys)


def test_plot_writes_the_figure(run, tmp_path, capsys):
    assert cli.main(["plot", str(run), "--out", str(tmp_path / "plot.pdf")]) == 0
    assert (tmp_path / "plot.pdf").read_bytes().startswith(b"%PDF")


def test_an_os_error_during_the_work_is_one_line(run, tmp_path, capsys, monkeypatch):
    """What no check foresaw (the folder turned read-only, the disk filled) is the last resort of
    ``main``: one line naming the file and the reason."""
    target = tmp_path / "plot.png"

    def denied(runs, path, dpi=100):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(plots, "save_metrics_plot", denied)
    assert cli.main(["plot", str(run), "--out", str(target)]) == 2
    assert _error_line(capsys) == f"reglue plot: error: {target}: Permission denied"


@pytest.mark.parametrize("argv, why", [
    (["export", "--run", "{tmp}/missing-run", "--out", "{tmp}/config.json"], "--out {tmp}/config.json: the file name must end in .safetensors"),
    (["stats", "--preset", "tiny", "--data", "{tmp}/missing-data", "--out", "{tmp}/stats.pt"],
     "--out {tmp}/stats.pt: the file name must end in .safetensors"),
])
def test_output_names_are_checked_before_the_inputs_are_read(tmp_path, capsys, argv, why):
    """A slip of --out (e.g. onto the run's config.json) is refused first: nothing is read or replaced."""
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert cli.main(argv) == 2
    assert why.format(tmp=tmp_path) in _error_line(capsys)


def _parsers():
    """(name, parser) of train.py and of every ``reglue`` subcommand."""
    import argparse

    from reglue.train.cli import build_parser as train_parser

    yield "train.py", train_parser()
    root = cli.build_parser()
    yield "reglue", root
    [sub] = [a for a in root._actions if isinstance(a, argparse._SubParsersAction)]
    for name, parser in sub.choices.items():
        yield f"reglue {name}", parser


@pytest.mark.parametrize("name, parser", list(_parsers()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_command_and_flag_has_help(name, parser):
    assert parser.description, f"{name} has no description"
    missing = [a.option_strings or a.dest for a in parser._actions if not a.help]
    assert not missing, f"{name}: no help text for {missing}"


def test_reference_help_says_each_recipes_precision():
    """What --reference trains in is each preset's parallel.reference_precision, as the help says."""
    from reglue.presets import get_preset
    from reglue.train.cli import build_parser

    text = " ".join(build_parser().format_help().split())
    assert get_preset("sit-xl-2").parallel.reference_precision == "fp32"
    assert get_preset("reglue-sit-xl-2").parallel.reference_precision == "fp16"
    assert "fp32 for sit-*, redi-*; fp16 autocast for repa-*, reg-*, reglue-*" in text


@pytest.mark.parametrize("cpus, workers", [(1, 0), (2, 1), (5, 4), (64, 8)])
def test_dataloader_workers_default_to_the_cpus_this_process_may_use(monkeypatch, cpus, workers):
    import os
    import warnings

    import torch

    from reglue.runtime import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert default_workers() == workers
    args = cli.build_parser().parse_args(["evaluate", "--make-ref", "--data", "d", "--out", "r.npz"])
    assert args.workers == workers
    loader = torch.utils.data.DataLoader(range(4), num_workers=default_workers())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "This DataLoader will create N worker processes ... suggested max ..."
        loader.check_worker_number_rationality()


def test_plot_replaces_an_existing_figure_only_with_overwrite(run, tmp_path, capsys):
    out = tmp_path / "plot.png"
    out.write_bytes(b"an older figure")
    assert cli.main(["plot", str(run), "--out", str(out)]) == 2
    assert _error_line(capsys) == (f"reglue plot: error: --out {out}: already exists; pass --overwrite to replace it, "
                                   "or choose another name")
    assert out.read_bytes() == b"an older figure"
    assert cli.main(["plot", str(tmp_path / "missing-run"), "--out", str(out), "--overwrite"]) == 2
    assert out.read_bytes() == b"an older figure"  # replaced only by a complete figure
    assert cli.main(["plot", str(run), "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes().startswith(b"\x89PNG") and not list(tmp_path.glob(".plot.png.*"))


def test_a_failed_command_leaves_no_output_folder(run, tmp_path, capsys):
    """Field case: folders created for --out stayed behind, empty, after a bad input."""
    assert cli.main(["plot", str(tmp_path / "missing-run"), "--out", str(tmp_path / "new" / "sub" / "plot.png")]) == 2
    assert "no metrics.jsonl there" in _error_line(capsys)
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    assert cli.main(["stats", "--preset", "tiny", "--data", str(tmp_path / "missing-data"),
                     "--out", str(tmp_path / "kept" / "new" / "stats.safetensors")]) == 2
    assert "missing-data" in _error_line(capsys)
    assert list((tmp_path / "kept").iterdir()) == []  # what existed before stays


def test_stats_refuses_an_existing_output_without_overwrite(tmp_path, capsys):
    out = tmp_path / "stats.safetensors"
    out.write_bytes(b"earlier statistics")
    assert cli.main(["stats", "--preset", "tiny", "--data", str(tmp_path / "d"), "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in _error_line(capsys)
    assert cli.main(["stats", "--preset", "tiny", "--data", str(tmp_path / "d"), "--out", str(out), "--overwrite"]) == 2
    assert "already exists" not in _error_line(capsys) and out.read_bytes() == b"earlier statistics"


def test_ctrl_c_while_the_console_script_loads_is_one_line_and_exit_130(tmp_path):
    """What the installed ``reglue`` entry point runs (``from reglue.cli import main``), interrupted
    while torch is being imported."""
    from tests.train.test_cli_errors import _interrupted

    code, err = _interrupted(["-c", "import sys; from reglue.cli import main; sys.exit(main())", "stats", "--help"],
                             tmp_path, delay=0.5)
    assert code == 130, err[-3000:]
    assert err.splitlines() == ["reglue stats: interrupted (Ctrl-C)"], err[-3000:]
