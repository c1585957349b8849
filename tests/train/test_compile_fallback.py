"""parallel.compile=auto: a region whose compile fails (lazily, at its first call) runs eager with
one warning naming it, recorded in the execution metrics; parallel.compile=true fails loudly.

The failure is injected: ``torch.compile`` is replaced by one whose compiled callable raises the
exception Inductor raises when a backend compiler fails, so no real compile runs (CPU-cheap); or,
for a backward graph, a real torch.compile with an AOTAutograd backend whose backward compiler
raises (no Inductor: the forward "compiles" to its FX graph)."""

import logging

import pytest
import torch
import torch.nn as nn
from torch._dynamo.exc import BackendCompilerFailed

from reglue.train import parallelize


def _failing_compile(calls):
    def fake_compile(fn, **kwargs):
        def compiled(*args, **kw):
            calls.append(fn)
            raise BackendCompilerFailed(fn, RuntimeError("ptxas fatal: sm_100a is not supported (injected)"), None)
        return compiled
    return fake_compile


@pytest.fixture
def failing_compile(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", _failing_compile(calls))
    monkeypatch.setattr(parallelize, "compile_fallbacks", {})
    return calls


def test_auto_falls_back_to_eager_per_region_with_one_warning(failing_compile, caplog):
    blocks = [nn.Linear(4, 4) for _ in range(3)]
    for block in blocks:
        assert parallelize.compile_region(block, "SiT block", fallback=True) is block
    fn = parallelize.compile_region(torch.tanh, "loss terms", fallback=True)
    x = torch.randn(2, 4)
    with caplog.at_level(logging.WARNING, logger="reglue.parallelize"):
        outs = [block(x) for block in blocks] + [block(x) for block in blocks]
        assert torch.equal(fn(x), torch.tanh(x)) and torch.equal(fn(x), torch.tanh(x))
    for block, out in zip(blocks * 2, outs):
        torch.testing.assert_close(out, nn.functional.linear(x, block.weight, block.bias))
    # One compile per region name: the first block's failure sends its copies eager without a try.
    assert len(failing_compile) == 2
    warnings = [r.getMessage() for r in caplog.records if "COMPILE FAILED" in r.getMessage()]
    assert len(warnings) == 2 and "'SiT block'" in warnings[0] and "'loss terms'" in warnings[1]
    assert set(parallelize.compile_fallbacks) == {"SiT block", "loss terms"}
    assert "BackendCompilerFailed" in parallelize.compile_fallbacks["SiT block"]
    summary = parallelize.Execution(frozenset(), frozenset(), True, "sdpa", compile_fallback=True).summary()
    assert summary["compile_fallbacks"] == parallelize.compile_fallbacks
    # The module's state-dict keys and gradients are those of the eager module.
    assert list(blocks[0].state_dict()) == ["weight", "bias"]
    blocks[0](x).sum().backward()
    assert blocks[0].weight.grad is not None


def _backward_failing_backend(compiled_graphs):
    """An AOTAutograd backend that runs the forward graph as is and fails to compile the backward,
    as Inductor or ptxas can fail on a backward graph only."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def forward_compiler(graph, example_inputs):
        compiled_graphs.append("fwd")
        return make_boxed_func(graph.forward)

    def backward_compiler(graph, example_inputs):
        compiled_graphs.append("bwd")
        raise RuntimeError("ptxas fatal: backward graph (injected)")

    return aot_autograd(fw_compiler=forward_compiler, bw_compiler=backward_compiler)


def test_a_backward_compile_failure_falls_back_too(monkeypatch, caplog):
    """The backward graph is compiled inside the guard with the forward (AOTAutograd would compile it
    at the first .backward(), outside it, and the run would crash there)."""
    compiled_graphs = []
    monkeypatch.setattr(parallelize, "COMPILE_OPTIONS", {**parallelize.COMPILE_OPTIONS,
                                                         "backend": _backward_failing_backend(compiled_graphs)})
    monkeypatch.setattr(parallelize, "compile_fallbacks", {})
    torch._dynamo.reset()
    try:
        blocks = [parallelize.compile_region(nn.Linear(4, 4), "SiT block", fallback=True) for _ in range(2)]
        x = torch.randn(2, 4, requires_grad=True)
        with caplog.at_level(logging.WARNING, logger="reglue.parallelize"):
            for _ in range(2):
                blocks[1](blocks[0](x)).sum().backward()
    finally:
        torch._dynamo.reset()
    assert compiled_graphs == ["fwd", "bwd"]  # one try, by the first block; its copy ran eager without one
    assert "BackendCompilerFailed" in parallelize.compile_fallbacks["SiT block"]
    assert sum("COMPILE FAILED" in r.getMessage() for r in caplog.records) == 1
    eager = [nn.Linear(4, 4) for _ in range(2)]
    for e, b in zip(eager, blocks):
        e.load_state_dict(b.state_dict())
    x_eager = x.detach().clone().requires_grad_()
    for _ in range(2):
        eager[1](eager[0](x_eager)).sum().backward()
    torch.testing.assert_close(x.grad, x_eager.grad)
    torch.testing.assert_close(blocks[0].weight.grad, eager[0].weight.grad)


def test_compile_true_fails_loudly(failing_compile):
    block = parallelize.compile_region(nn.Linear(4, 4), "SiT block", fallback=False)
    with pytest.raises(BackendCompilerFailed, match="injected"):
        block(torch.randn(2, 4))
    with pytest.raises(BackendCompilerFailed):
        parallelize.compile_region(torch.tanh, "loss terms")(torch.randn(2))
    assert parallelize.compile_fallbacks == {}


def test_other_errors_are_not_swallowed(monkeypatch):
    monkeypatch.setattr(parallelize, "compile_fallbacks", {})

    def compiled(*args):
        raise ValueError("a bug in the model, not in the compiler")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled)
    fn = parallelize.compile_region(torch.tanh, "loss terms", fallback=True)
    with pytest.raises(ValueError, match="a bug"):
        fn(torch.randn(2))
    assert parallelize.compile_fallbacks == {}


def test_auto_resolves_to_fallback_and_true_does_not(monkeypatch):
    from reglue.presets import get_preset

    monkeypatch.setattr(parallelize, "_resolved", {})
    config = get_preset("tiny")
    config.model.kernels = "eager"  # no self-check: resolving for a CUDA device needs none here
    resolved = {}
    for value in ("auto", True, False):
        config.parallel.compile = value
        execution = parallelize.resolve_execution(config, torch.device("cuda"))
        resolved[value] = (execution.compile, execution.compile_fallback)
    assert resolved == {"auto": (True, True), True: (True, False), False: (False, False)}
