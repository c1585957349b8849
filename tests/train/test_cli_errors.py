"""train.py's config errors: one line naming the field (or file) and the problem, exit status 2."""

import logging
import os

import pytest

from reglue.train.cli import config_from_args


@pytest.mark.parametrize("argv, line", [
    (["--set", "optim.lr=abc"], "train.py: error: optim.lr: cannot parse 'abc' as float"),
    (["--set", "model.depth=x"], "train.py: error: model.depth: cannot parse 'x' as int"),
    (["--set", "train.tensorboard=maybe"], "train.py: error: train.tensorboard: cannot parse 'maybe' as bool (use true or false)"),
    (["--set", "encoders.feature_layers=(1,"],
     "train.py: error: encoders.feature_layers: cannot parse '(1,' as Tuple[int, ...] (write a Python literal, e.g. (1, 2))"),
    (["--set", "encoders.dinov2_overrides=3"],
     "train.py: error: encoders.dinov2_overrides: cannot parse '3' as Dict[str, Any] (write a Python literal, e.g. {'key': 1})"),
    (["--set", "optim.lr=-1"], "train.py: error: optim.lr: must be positive, got -1.0"),
    (["--set", "nonsense"], "train.py: error: --set 'nonsense': expected SECTION.FIELD=VALUE"),
    (["--set", "optim.nope=1"], "train.py: error: optim.nope: unknown field of optim 'nope'; choose from beta1, beta2, "
                                "eps, grad_clip, lr, warmup_steps, weight_decay"),
    (["--set", "train.max_step=5"], "train.py: error: train.max_step: unknown field of train 'max_step'; did you mean "
                                    "max_steps or eval_steps?"),
    (["--set", "optim.weight_decy=0"], "train.py: error: optim.weight_decy: unknown field of optim 'weight_decy'; did you "
                                       "mean weight_decay?"),
    (["--set", "modle.depth=2"], "train.py: error: modle.depth: unknown section 'modle'; did you mean model?"),
    (["--set", "model=2"], "train.py: error: model: expected SECTION.FIELD"),
    (["--preset", "reglue-sit-xl2"], "train.py: error: unknown preset 'reglue-sit-xl2'; did you mean reglue-sit-xl-2, "
                                     "reglue-sit-b-2 or reg-sit-xl-2?"),
    (["--config", "/nonexistent/config.json"], "train.py: error: --config /nonexistent/config.json: no such file"),
])
def test_config_errors_are_one_line(argv, line, capsys):
    with pytest.raises(SystemExit) as exit_info:
        config_from_args(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == line + "\n", "one line, no usage block"


def test_config_file_errors(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text('{"train": {"max_steps": 3}')  # truncated
    with pytest.raises(SystemExit):
        config_from_args(["--config", str(bad)])
    err = capsys.readouterr().err
    assert err.startswith(f"train.py: error: --config {bad}: not valid JSON (") and err.count("\n") == 1
    bad.write_text('[1, 2]')
    with pytest.raises(SystemExit):
        config_from_args(["--config", str(bad)])
    assert capsys.readouterr().err == f"train.py: error: --config {bad}: config: expected a JSON object of sections, got a list\n"


def test_malformed_flags_keep_argparse_usage(capsys):
    with pytest.raises(SystemExit):
        config_from_args(["--max-steps", "ten"])
    assert capsys.readouterr().err.startswith("usage: train.py")


def test_a_disk_filling_up_mid_run_is_one_line_and_the_run_resumes_from_the_last_checkpoint(tmp_path, monkeypatch, capsys,
                                                                                               caplog):
    """Field case: the second checkpoint of a run hits a full disk. Measured on a 10 MiB tmpfs the
    demo ended in a 60-line DCP traceback (exit 1) and left its partial folder behind."""
    import errno

    import torch.distributed.checkpoint as dcp

    from reglue.checkpoint import latest_checkpoint, read_meta
    from reglue.train.cli import main

    real_save, saves = dcp.save, []

    def fills_the_disk_on_the_second_save(state, checkpoint_id, **kwargs):
        saves.append(checkpoint_id)
        if len(saves) == 1:
            return real_save(state, checkpoint_id=checkpoint_id, **kwargs)
        os.makedirs(checkpoint_id, exist_ok=True)
        with open(os.path.join(checkpoint_id, "__0_0.distcp"), "wb") as f:
            f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    argv = ["--out", str(tmp_path), "--max-steps", "4", "--set", "train.ckpt_every=2", "--set", "sample.steps=2",
            "--set", "train.num_sample_images=2", "--set", "data.synthetic_size=64", "--set", "train.tensorboard=false",
            "--set", "train.metrics_plot=false"]
    monkeypatch.setattr(dcp, "save", fills_the_disk_on_the_second_save)
    assert main(argv) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err.splitlines()
    assert err[-2].startswith("train.py: error: saving checkpoint ") and "step-00000004 failed: No space left on device" in err[-2]
    assert err[-1] == "(set REGLUE_DEBUG=1 for the traceback)"
    run = tmp_path / "tiny"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002"]  # partial folder removed
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="reglue.train"):
        assert main(argv) == 0
    assert read_meta(latest_checkpoint(run))["step"] == 4
    assert any(r.getMessage().startswith(f"resumed from {run}/checkpoints/step-00000002 at step 2") for r in caplog.records)


def test_an_os_error_the_checks_did_not_foresee_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    from reglue.train import cli, trainer

    def read_only(config, overwrite=False):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "tiny" / "metrics.jsonl"))

    monkeypatch.setattr(trainer, "run", read_only)
    assert cli.main(["--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"train.py: error: {tmp_path}/tiny/metrics.jsonl: Read-only file system\n"
                                       "(set REGLUE_DEBUG=1 for the traceback)\n")


def test_rerunning_a_finished_run_repeats_its_result_and_a_shorter_one_is_refused(tmp_path, capsys, caplog):
    """After a finished run the same command prints the run's result lines again (read back from
    metrics.jsonl), hue and shape; a --max-steps below the run's step is one error line naming --name and --overwrite."""
    from reglue.train.cli import main

    argv = ["--out", str(tmp_path), "--max-steps", "2", "--set", "sample.steps=2", "--set", "train.num_sample_images=8",
            "--set", "data.synthetic_size=64", "--set", "train.tensorboard=false",
            "--set", "train.metrics_plot=false"]
    with caplog.at_level(logging.INFO, logger="reglue.train"):
        assert main(argv) == 0
        first = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("class match: ", "shape match: "))]
        assert [line.split(":")[0] for line in first] == ["class match", "shape match"], first
        caplog.clear()
        assert main(argv) == 0
    lines = [r.getMessage() for r in caplog.records]
    assert f"{tmp_path / 'tiny'} is complete (step 2 of 2); its results:" in lines
    assert lines[-2:] == first
    capsys.readouterr()
    assert main(argv[:3] + ["1"] + argv[4:]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"train.py: error: {tmp_path / 'tiny'} is at step 2, past --max-steps 1 (train.max_steps): a shorter "
                      "run needs another --name, or --overwrite to move this run aside and start afresh"), err


def test_a_failed_start_leaves_no_run_directory(tmp_path, capsys):
    """Field case: an empty OUT/tiny/ after a bad --data."""
    from reglue.train.cli import main

    assert main(["--out", str(tmp_path / "runs"), "--data", str(tmp_path / "no-such-data")]) == 2
    assert "no-such-data" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs").mkdir()
    assert main(["--out", str(tmp_path / "runs"), "--data", str(tmp_path / "no-such-data")]) == 2
    assert list((tmp_path / "runs").iterdir()) == []  # the folder that was there stays, the run dir does not


def test_log_lines_go_above_the_progress_bar_and_one_time_lines_print_once(tmp_path, capsys, monkeypatch):
    """Field case: the attention-backend line printed twice (the FLOP counter's meta-device model
    chose again) and log lines written into the middle of the bar."""
    import sys

    from reglue.config import apply_overrides
    from reglue.models import attention
    from reglue.presets import get_preset
    from reglue.train.trainer import Trainer

    monkeypatch.setattr(attention, "_logged", set())
    handler = logging.StreamHandler(sys.stderr)  # a console handler, as train.py's logging.basicConfig installs
    handler.setFormatter(logging.Formatter("[log] %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        config = apply_overrides(get_preset("tiny"), {
            "train.out_dir": str(tmp_path), "train.max_steps": "3", "train.log_every": "1", "sample.steps": "2",
            "train.num_sample_images": "2", "data.synthetic_size": "64", "train.tensorboard": "false", "train.metrics_plot": "false",
            "train.inject_nonfinite_steps": "(1,)"})  # a warning in mid-bar: "steps 2-2: 1 skipped ..."
        Trainer(config).fit()
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    lines = capsys.readouterr().err.split("\n")
    assert sum("attention: using" in line for line in lines) == 1
    skipped = [line for line in lines if "skipped for a non-finite" in line]
    assert skipped and all(line.split("\r")[-1].startswith("[log] ") for line in skipped), skipped
    assert any(line.split("\r")[-1].startswith("tiny:") for line in lines)  # the bar itself


def _interrupted(argv, tmp_path, after_line=None, delay=1.0):
    """Run ``argv`` in a subprocess, send SIGINT ``delay`` s after start or as soon as a stderr line
    contains ``after_line``; return (exit status, stderr)."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    # as from a terminal: SIGINT with its default action, even where this test runs with it ignored
    # (started by a script's `cmd &`), which the child would inherit and keep (StopSignals)
    proc = subprocess.Popen([sys.executable, *argv], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    if after_line is None:
        time.sleep(delay)
    else:
        for line in proc.stderr:
            seen.append(line)
            if after_line in line:
                break
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=300)
    return proc.returncode, "".join(seen) + rest


@pytest.mark.parametrize("after_line", [None, "reglue.parallelize: execution on"], ids=["imports", "model-build"])
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path, after_line):
    from pathlib import Path

    train_py = str(Path(__file__).resolve().parents[2] / "train.py")
    code, err = _interrupted([train_py, "--out", str(tmp_path / "runs")], tmp_path, after_line)
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and err.splitlines()[-1] == (
        "train.py: interrupted (Ctrl-C) before training started; nothing was saved"), err[-3000:]
    assert not (tmp_path / "runs").exists()  # the start-up's run directory is removed again
