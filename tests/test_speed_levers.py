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
    copy = lin._low[2]
    assert copy.dtype == torch.bfloat16 and torch.equal(copy, lin.weight.to(torch.bfloat16))
    run()
    assert lin._low[2] is copy  # kept between calls
    with torch.no_grad():  # an in-place change of the weight (an optimizer step, load_state_dict) is seen
        for p in model.parameters():
            p.add_(0.01)
    got = run()
    assert lin._low[2] is not copy and torch.equal(got, _plain_autocast(model, run))
    with torch.no_grad():
        plain = model(x, t)
    assert plain.dtype == torch.float32 and not torch.equal(plain, got.float())  # no autocast: float32 weights


def test_low_precision_weights_follow_assign_and_are_dropped_after_a_data_edit():
    """``load_state_dict(..., assign=True)`` puts new Parameter objects in: seen (the copy is tied to
    the Parameter object, not only to an address the allocator may reuse). An edit through ``p.data``
    is not seen (documented) until ``drop_low_precision``. Break tried: ``drop_low_precision`` that
    drops nothing."""
    from ca2vdm.layers import drop_low_precision

    model = tiny_model(dtype=torch.float32, conditioning="text", text_dim=16).eval()
    other = tiny_model(dtype=torch.float32, conditioning="text", text_dim=16, seed=1).eval()
    x, t = torch.randn(2, 3, 4, 8, 8), torch.full((2, 4), 300.0, dtype=torch.float64)

    def run(m):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return m(x, t)

    run(model)
    lin = model.blocks[0].mlp[0]
    state = {k: v.clone() for k, v in other.state_dict().items()}
    model.load_state_dict(state, assign=True)
    assert torch.equal(run(model), _plain_autocast(model, lambda: run(model)))
    lin.weight.data.mul_(0.5)  # not seen until dropped
    stale = run(model)
    drop_low_precision(model)
    fresh = run(model)
    assert torch.equal(fresh, _plain_autocast(model, lambda: run(model))) and not torch.equal(stale, fresh)


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


def test_a_stream_computes_its_adaLN_once_per_level_and_gets_the_same_video():
    """The session keeps the adaLN outputs of its levels and its write pass: after the first chunk no
    call computes them, and the video equals one whose every call computed them (the model's own
    forward, ``modulation=None``). Break tried: keying the session's store on the time alone (the
    write pass's zeros and the levels then collide)."""
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
    fresh = StreamSession(model, **kw)
    fresh.modulation = lambda t, rows, frames: (torch.full((rows, frames), float(t), dtype=torch.float64), None)
    calls.clear()
    again = [fresh.next_chunk() for _ in range(4)]
    assert len(calls) == 4 * per_chunk  # every call computed them
    assert all(torch.equal(a, b) for a, b in zip(video, again))


def test_batched_streams_reuse_each_sessions_adaLN_outputs():
    """``next_chunks`` stacks what each session keeps: after every session's first chunk, batched
    chunks compute no adaLN output (the old memo on the model recomputed all of them every chunk),
    and each stream's chunks are the ones it makes alone."""
    from ca2vdm import StreamSession
    from ca2vdm.stream import next_chunks

    from conftest import random_text

    model = tiny_model(conditioning="text", text_dim=16, prefix_frames=0)
    kws = [dict(prompt=random_text(1, 5, 16, seed=i), steps=3, guidance=2.0 + i, seed=i) for i in range(3)]
    alone = [[s.next_chunk() for _ in range(3)] for s in (StreamSession(model, **kw) for kw in kws)]
    sessions = [StreamSession(model, **kw) for kw in kws]
    firsts = next_chunks(sessions)
    calls = _count_adaLN(model)
    rest = [next_chunks(sessions), next_chunks(sessions)]
    assert calls == []
    for j in range(3):  # float64: batching changes only the GEMMs' rounding
        assert all((a - b).abs().max() < 1e-10 for a, b in zip(alone[j], [firsts[j], rest[0][j], rest[1][j]]))


def test_under_inference_mode_a_stream_keeps_its_adaLN_reuse_and_its_video():
    """The server runs sessions under ``torch.inference_mode``: the session's kept outputs are its own
    state (no version counters involved), so they are reused there too and the video is the one made
    under no_grad."""
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
    assert all(torch.equal(a, b) for a, b in zip(video, again))


def test_the_model_keeps_no_adaLN_outputs_so_weight_changes_are_always_seen():
    """The model computes its modulation on every call: a forward after ``load_state_dict(...,
    assign=True)`` or a ``p.data`` edit (neither bumps a version counter that a memo could watch)
    equals a fresh model with those weights; the same t and cond objects are reused throughout.
    Under autograd the outputs reach the adaLN weights. Break tried: the former memo keyed on
    Parameter objects and version counters (stale after both changes)."""
    model = tiny_model(conditioning="none", prefix_frames=0)
    cond = model.condition(1)
    t = torch.full((1, 2), 400.0, dtype=torch.float64)
    x = torch.randn(1, 3, 2, 8, 8, dtype=torch.float64)
    other = tiny_model(conditioning="none", prefix_frames=0, seed=1)
    with torch.no_grad():
        before = model(x, t, cond)
        model.load_state_dict(other.state_dict(), assign=True)
        assert torch.equal(model(x, t, cond), other(x, t, cond)) and not torch.equal(model(x, t, cond), before)
        model.blocks[0].adaLN[1].bias.data += 1.0
        other.blocks[0].adaLN[1].bias.add_(1.0)
        assert torch.equal(model(x, t, cond), other(x, t, cond))
        assert torch.equal(model.modulation(t, cond)[1][0], other.modulation(t, cond)[1][0])
    with torch.enable_grad():
        c, mods = model.modulation(t, cond)
        mods[0].sum().backward()
        assert model.blocks[0].adaLN[1].weight.grad is not None
