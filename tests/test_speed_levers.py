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


def _count_adaLN(model):
    calls = []
    for b in model.blocks:
        b.adaLN.register_forward_hook(lambda m, i, o: calls.append(1))
    return calls


def test_a_stream_computes_its_adaLN_once_per_level_and_gets_the_same_video(monkeypatch):
    from ca2vdm import StreamSession

    from conftest import random_text

    model = tiny_model(conditioning="text", text_dim=16, prefix_frames=0)
    kw = dict(prompt=random_text(1, 5, 16), steps=3, guidance=2.0, seed=3)
    calls = _count_adaLN(model)
    session = StreamSession(model, **kw)
    first = session.next_chunk()
    per_chunk = len(calls)
    assert per_chunk == 4 * model.config.depth  # 3 levels and the write pass, each once
    video = [first] + [session.next_chunk() for _ in range(3)]
    assert len(calls) == per_chunk  # later chunks reuse every adaLN output
    # the same session with a fresh time tensor at every call recomputes them all: the same video
    monkeypatch.setattr(StreamSession, "times", lambda s, t, rows, frames: torch.full((rows, frames), float(t),
                                                                                        dtype=torch.float64))
    calls.clear()
    fresh = StreamSession(model, **kw)
    again = [fresh.next_chunk() for _ in range(4)]
    assert len(calls) == per_chunk + 3 * 3 * model.config.depth  # every denoising call computed them again
    assert all(torch.equal(a, b) for a, b in zip(video, again))


def test_under_inference_mode_a_stream_keeps_its_adaLN_reuse_and_its_video():
    """The server runs sessions under ``torch.inference_mode``, where new tensors have no version
    counter: the session's own time tensors stay ordinary ones (reused), a caller's inference tensor
    is computed afresh every time, and the video is the one made under no_grad."""
    from ca2vdm import StreamSession

    from conftest import random_text

    model = tiny_model(conditioning="text", text_dim=16, prefix_frames=0)
    kw = dict(prompt=random_text(1, 5, 16), steps=3, guidance=2.0, seed=3)
    video = [c for s in [StreamSession(model, **kw)] for c in (s.next_chunk(), s.next_chunk(), s.next_chunk())]
    calls = _count_adaLN(model)
    with torch.inference_mode():
        session = StreamSession(model, **kw)
        again = [session.next_chunk() for _ in range(3)]
        assert len(calls) == 4 * model.config.depth  # the first chunk's 3 levels and write pass, then reused
        cond, t = model.condition(1), torch.full((1, 2), 400.0, dtype=torch.float64)
        assert t.is_inference()
        calls.clear()
        first = model.modulation(t, cond)[1][0].clone()
        t.fill_(100.0)  # no version counter would show this change: such a tensor is never kept
        assert not torch.equal(model.modulation(t, cond)[1][0], first) and len(calls) == 2 * model.config.depth
    assert all(torch.equal(a, b) for a, b in zip(video, again))


def test_kept_adaLN_outputs_follow_weight_changes_and_never_enter_autograd():
    model = tiny_model(conditioning="none", prefix_frames=0)
    cond = model.condition(1)
    t = torch.full((1, 2), 400.0, dtype=torch.float64)
    with torch.no_grad():
        c1, m1 = model.modulation(t, cond)
        c2, m2 = model.modulation(t, cond)
        assert m2[0] is m1[0]  # kept
        model.blocks[0].adaLN[1].bias.add_(1.0)  # an in-place weight change (an optimizer step)
        c3, m3 = model.modulation(t, cond)
        assert m3[0] is not m1[0] and torch.allclose(m3[0] - m1[0], torch.ones_like(m1[0]), atol=1e-12)
        t.fill_(100.0)  # the same tensor, new values
        assert not torch.equal(model.modulation(t, cond)[0], c3)
    with torch.enable_grad():
        model.train()
        c4, m4 = model.modulation(t, cond)
        assert m4[0].requires_grad and m4[0] is not model.modulation(t, cond)[1][0]
