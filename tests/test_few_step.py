"""Few-step sampling over explicit noise levels (CausVid / Self-Forcing students), on the x0 head."""

import pytest
import torch

from ca2vdm.diffusion import FlowMatching
from ca2vdm.generate import chunk_noise, generate_video

from conftest import random_text, tiny_model
from oracle import Oracle

pytestmark = pytest.mark.usefixtures("one_thread")

LEVELS = FlowMatching(shift=5.0).warped_levels(4)


def test_warped_levels():
    assert LEVELS == pytest.approx([1.0, 3.75 / 4.0, 2.5 / 3.0, 1.25 / 2.0])
    assert FlowMatching().warped_levels(2) == [1.0, 0.5]
    assert FlowMatching(shift=3.0).warped_levels(1) == [1.0]


@pytest.mark.parametrize("prediction", ["native", "sample"])
@pytest.mark.parametrize("positions", ["cyclic", "rope"])
@pytest.mark.parametrize("prefix_frames", [0, 1])
def test_few_step_shared_equals_oracle_float64(prediction, positions, prefix_frames):
    """7 chunks through a sliding window, guidance with a negative prompt, prefix enhancement."""
    model = tiny_model(prediction=prediction, positions=positions, prefix_frames=prefix_frames,
                       conditioning="text", text_dim=16, prefix_enhance=True)
    kw = dict(levels=LEVELS, guidance=2.0, seed=[3, 11], prompt=random_text(2, 6, 16, seed=1),
              negative_prompt=random_text(2, 3, 16, seed=2, ragged=False))
    if prefix_frames:
        kw["first_frames"] = torch.randn(2, 3, 1, 8, 8, generator=torch.Generator().manual_seed(5),
                                         dtype=torch.float64)
    n = prefix_frames + 7 * model.config.chunk_frames
    shared = generate_video(model, n, mode="shared", **kw)
    oracle = generate_video(model, n, mode="recompute-full", **kw)
    assert (shared - oracle).abs().max().item() <= 1e-9 * max(1.0, oracle.abs().max().item())
    assert (shared[0] - shared[1]).abs().max() > 1e-2


def test_one_chunk_by_hand():
    """The loop: x0 head at each level, re-noised to the next level with noise of its own stream per
    (seed, chunk, step); the chunk is the last x0. Rebuilt from the model's forward for chunk 1."""
    model = tiny_model(prediction="sample")
    first = torch.randn(1, 3, 1, 8, 8, dtype=torch.float64)
    video = generate_video(model, 3, first_frames=first, levels=LEVELS, seed=[7])
    cache = model.new_cache(1)
    with torch.no_grad():
        model.forward_cached(first, torch.zeros(1, 1, dtype=torch.float64), cache, write=True)
        x = chunk_noise([7], 1, (3, 2, 8, 8), dtype=torch.float64)
        for i, s in enumerate(LEVELS):
            x0 = model.forward_cached(x, torch.full((1, 2), s * 1000, dtype=torch.float64), cache, x0=True)
            if i + 1 < len(LEVELS):
                x = (1 - LEVELS[i + 1]) * x0 + LEVELS[i + 1] * chunk_noise([7], 1, (3, 2, 8, 8), stream=2 + i,
                                                                           dtype=torch.float64)
    assert (video[:, :, 1:3] - x0).abs().max().item() < 1e-12


def test_the_x0_head_is_not_the_inverted_clamped_velocity():
    """prediction='sample': below sample_sigma_min the velocity is clamped, so x - sigma v is not the
    network's x0; the few-step sampler reads the x0 head itself. For velocity models x0 = x - sigma v."""
    x = torch.randn(1, 3, 2, 8, 8, dtype=torch.float64)
    t = torch.full((1, 2), 20.0, dtype=torch.float64)  # sigma 0.02 < sigma_min 0.05
    sample = tiny_model(prediction="sample")
    with torch.no_grad():
        head, v = sample(x, t, x0=True), sample(x, t)
    assert (head - (x - 0.02 * v)).abs().max().item() > 1e-3
    assert (head - (x - 0.05 * v)).abs().max().item() < 1e-12  # the clamp, undone by hand
    native = tiny_model()
    with torch.no_grad():
        assert (native(x, t, x0=True) - (x - 0.02 * native(x, t))).abs().max().item() < 1e-12


def test_bad_levels_are_refused():
    model = tiny_model()
    first = torch.zeros(1, 3, 1, 8, 8, dtype=torch.float64)
    for levels, words in [([0.9, 0.5], "start at 1"), ([1.0, 0.5, 0.6], "decrease"), ([1.0, 0.0], "decrease"),
                          ([], "at least one")]:
        with pytest.raises(ValueError, match=words):
            generate_video(model, 3, first_frames=first, levels=levels)
    with pytest.raises(ValueError, match="contradicts"):
        generate_video(model, 3, first_frames=first, levels=[1.0, 0.5], steps=3)
    with pytest.raises(ValueError, match="objective='flow'"):
        generate_video(tiny_model(objective="eps"), 3, first_frames=first, levels=[1.0, 0.5])


def test_a_checkpoint_recommends_its_levels(tmp_path):
    """export --levels records the student's levels (and their number as steps); sampling_for
    uses them unless steps or levels are given; a contradiction is refused."""
    from ca2vdm.checkpoint import export_checkpoint, sampling_for, save_checkpoint

    save_checkpoint(tmp_path / "raw", tiny_model(dtype=torch.float32))
    assert sampling_for(tmp_path / "raw") == {"steps": 20, "levels": None, "guidance": 4.0}
    export_checkpoint(tmp_path / "raw", tmp_path / "student", guidance=1.0, levels=LEVELS)
    rec = sampling_for(tmp_path / "student")
    assert rec == {"steps": 4, "levels": pytest.approx(LEVELS), "guidance": 1.0}
    assert sampling_for(tmp_path / "student", steps=8) == {"steps": 8, "levels": None, "guidance": 1.0}
    assert sampling_for(tmp_path / "student", levels=[1.0, 0.5])["steps"] == 2
    with pytest.raises(ValueError, match="contradict"):
        sampling_for(tmp_path / "student", steps=3, levels=[1.0, 0.5])
    with pytest.raises(ValueError, match="start at 1"):
        export_checkpoint(tmp_path / "raw", tmp_path / "bad", levels=[0.5, 0.25])


def _rollout(model, mode, exit_step, grad, chunks=5):
    from ca2vdm import StreamSession

    session = StreamSession(model, first_frames=torch.randn(2, 3, 1, 8, 8, generator=torch.Generator().manual_seed(4),
                                                            dtype=torch.float64),
                            labels=torch.tensor([0, 2]), levels=LEVELS, seed=[5, 6], mode=mode)
    session.next_chunk()
    return [session.next_chunk(exit_step=exit_step, grad=grad) for _ in range(chunks)], session


@pytest.mark.parametrize("mode", ["shared", "recompute-full"])
@pytest.mark.parametrize("exit_step", [0, 1, len(LEVELS) - 1])
def test_self_rollout_equals_an_independent_sampler_exiting_at_that_step(mode, exit_step):
    """Every chunk is the x0 predicted at ``exit_step`` (later steps skipped), and that x0 is what
    joins the context: 5 chunks through a 5-frame window, against ``oracle.Oracle`` (full-sequence
    forwards, the re-noising written out). Break tried: ignoring ``exit_step`` (every chunk runs all
    levels): the exit steps 0 and 1 fail."""
    model = tiny_model(conditioning="class", num_classes=3, prediction="sample")
    chunks, _ = _rollout(model, mode, exit_step=exit_step, grad=False)
    oracle = Oracle(model, [5, 6], model.condition(2, labels=torch.tensor([0, 2])), levels=LEVELS)
    oracle.append(torch.randn(2, 3, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    for a, b in zip(chunks, oracle.run(5, first_chunk=1, exit_step=exit_step)):
        assert (a - b).abs().max() < 1e-9


def test_self_rollout_gradients_flow_only_through_each_exit_step():
    """Exit at step 1 of 4 in every chunk, 5 chunks through a 5-frame window (evictions): only the
    exit step carries a gradient and the cache never does. The parameter gradients equal a
    reference rebuilt by hand, chunk by chunk: a fresh cache written without gradient from the
    rollout's own (detached) earlier chunks, step 0 without gradient, then step 1 under autograd."""
    model = tiny_model(conditioning="class", num_classes=3, prediction="sample", prefix_enhance=True)
    chunks, session = _rollout(model, "shared", exit_step=1, grad=True)
    assert all(c.requires_grad for c in chunks)
    cache = session.engine.cache
    assert cache.frames_written == 11 and not any(t.requires_grad for t in cache.k + cache.v + cache.pk)
    model.zero_grad()
    sum((c ** 2).mean() for c in chunks).backward()
    rollout = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    nograd, _ = _rollout(model, "shared", exit_step=1, grad=False)
    assert torch.equal(torch.cat(nograd, 2), torch.cat(chunks, 2).detach())  # autograd changes no value

    first = torch.randn(2, 3, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    context = [first] + [c.detach() for c in chunks]
    cond, shape, loss = model.condition(2, labels=torch.tensor([0, 2])), (3, 2, 8, 8), 0.0
    for k in range(1, 6):
        fresh = model.new_cache(2)
        with torch.no_grad():
            for c in context[:k]:
                model.forward_cached(c, torch.zeros(2, c.shape[2], dtype=torch.float64), fresh, cond, write=True)
            x = chunk_noise([5, 6], k, shape, dtype=torch.float64)
            x0 = model.forward_cached(x, torch.full((2, 2), 1000.0, dtype=torch.float64), fresh, cond, x0=True)
            x = (1 - LEVELS[1]) * x0 + LEVELS[1] * chunk_noise([5, 6], k, shape, stream=2, dtype=torch.float64)
        out = model.forward_cached(x, torch.full((2, 2), LEVELS[1] * 1000, dtype=torch.float64), fresh, cond, x0=True)
        assert torch.equal(out.detach(), chunks[k - 1].detach())
        loss = loss + (out ** 2).mean()
    model.zero_grad()
    loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert rollout.keys() == reference.keys() and len(rollout) > 10
    for name, g in reference.items():
        assert (rollout[name] - g).abs().max().item() <= 1e-12 * max(1.0, g.abs().max().item()), name
    with pytest.raises(ValueError, match="exit_step"):
        _rollout(model, "shared", exit_step=None, grad=True, chunks=1)
