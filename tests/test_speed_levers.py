"""Speed levers keep the numbers: each one is checked against the path it replaces."""

import pytest
import torch

from ca2vdm.layers import Linear

from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _plain_autocast(model, fn):
    """``fn()`` with autocast's own cast of every weight on every call."""
    Linear.keep_low_precision = False
    try:
        return fn()
    finally:
        Linear.keep_low_precision = True


def test_low_precision_weights_are_reused_and_bitwise_equal_to_autocast():
    torch.manual_seed(0)
    model = tiny_model(dtype=torch.float32, conditioning="text", text_dim=16).eval()
    x = torch.randn(2, 3, 4, 8, 8)
    t = torch.full((2, 4), 300.0, dtype=torch.float64)

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x, t)

    want = _plain_autocast(model, run)
    got = run()
    assert torch.equal(got, want)
    lin = model.blocks[0].mlp[0]
    copy = lin._low[1]
    assert copy.dtype == torch.bfloat16 and torch.equal(copy, lin.weight.to(torch.bfloat16))
    run()
    assert lin._low[1] is copy  # kept between calls
    with torch.no_grad():  # an in-place change of the weight (an optimizer step, load_state_dict) is seen
        for p in model.parameters():
            p.add_(0.01)
    got = run()
    assert lin._low[1] is not copy and torch.equal(got, _plain_autocast(model, run))
    with torch.no_grad():
        plain = model(x, t)
    assert plain.dtype == torch.float32 and not torch.equal(plain, got.float())  # no autocast: float32 weights


def test_autograd_reaches_the_weights_through_autocast_as_before():
    torch.manual_seed(0)
    lin = Linear(8, 4)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lin(x).float().sum().backward()
    assert lin.weight.grad is not None and lin._low is None  # autocast's own differentiable cast
    frozen = Linear(8, 4).requires_grad_(False)
    xg = torch.randn(3, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        frozen(xg).float().sum().backward()  # a frozen teacher under a student's loss: the copy is reused
    assert frozen._low is not None and xg.grad is not None
    assert torch.allclose(xg.grad, frozen.weight.sum(0).to(torch.bfloat16).float().expand(3, -1), atol=1e-2)
