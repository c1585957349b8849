"""train.py's config errors: one line naming the field (or file) and the problem, exit status 2."""

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
    (["--set", "optim.nope=1"], "train.py: error: optim.nope: unknown field; optim has "
                                "['beta1', 'beta2', 'eps', 'grad_clip', 'lr', 'warmup_steps', 'weight_decay']"),
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
