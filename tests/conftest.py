"""Shared test set-up: Triton interpreter on CPU, seeds, a `gpu` marker, a verbose allclose."""

import os

import torch

# The Triton interpreter must be switched on before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")


def pytest_collection_modifyitems(config, items):
    from tests.kernels import _facts

    _facts.start_if_needed(config, items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def assert_close(actual, expected, atol=1e-5, rtol=1e-5, name="tensor"):
    """allclose that reports how many elements differ and the worst offenders."""
    actual = actual.detach().float().cpu()
    expected = expected.detach().float().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any() or torch.isnan(expected).any(), f"{name}: NaN in result"
    diff = (actual - expected).abs()
    bad = diff > atol + rtol * expected.abs()
    if bad.any():
        n_bad = int(bad.sum())
        flat = torch.where(bad, diff, torch.zeros_like(diff)).flatten()
        worst = flat.topk(min(5, n_bad)).indices
        rows = [
            f"  idx {tuple(int(i) for i in torch.unravel_index(w, actual.shape))}: "
            f"got {actual.flatten()[w].item():.6g}, want {expected.flatten()[w].item():.6g}"
            for w in worst
        ]
        raise AssertionError(
            f"{name}: {n_bad}/{actual.numel()} elements differ (atol={atol}, rtol={rtol}, "
            f"max abs diff {diff.max().item():.3g}):\n" + "\n".join(rows)
        )
