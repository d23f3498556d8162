"""StreamSession: one object owns a stream's state, so streams over one model never interfere."""

import pytest
import torch

from ca2vdm import StepCache, StepCacheConfig, StreamSession
from ca2vdm.generate import generate_video

from conftest import random_text, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    return tiny_model(conditioning="text", text_dim=16, prefix_enhance=True)


def _first(batch, seed):
    return torch.randn(batch, 3, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _streams(model):
    """Three streams that differ in prompt, seed, guidance, batch and step-cache policy."""
    return [
        dict(first_frames=_first(2, 1), prompt=random_text(2, 5, 16, seed=1), steps=6, guidance=3.0, seed=[4, 9],
             step_cache=StepCacheConfig(policy="adacache", codebook={1e9: 2})),  # the tiny model's change is
        # large: a codebook whose every stride is 2 makes it skip
        dict(first_frames=_first(1, 2), prompt=random_text(1, 7, 16, seed=2), steps=6, guidance=2.0, seed=17,
             step_cache="fixed:1"),
        dict(first_frames=_first(1, 3), prompt=random_text(1, 3, 16, seed=3), steps=4, guidance=1.0, seed=5),
    ]


def _alone(model, kw, chunks):
    session = StreamSession(model, **kw)
    return [session.next_chunk() for _ in range(chunks)]


def test_interleaved_sessions_give_what_each_gives_alone():
    model = _model()
    kws, chunks = _streams(model), 6  # 1 given frame + 5 chunks of 2: two window slides (P_max = 5)
    alone = [_alone(model, kw, chunks) for kw in kws]
    sessions = [StreamSession(model, **kw) for kw in kws]
    got = [[] for _ in kws]
    order = [0, 1, 2, 0, 0, 1, 2, 2, 1, 0, 2, 1, 1, 0, 2, 0, 1, 2]  # irregular interleaving, 6 calls each
    for i in order:
        got[i].append(sessions[i].next_chunk())
    for i in range(len(kws)):
        assert len(got[i]) == chunks
        for a, b in zip(alone[i], got[i]):
            assert torch.equal(a, b), f"stream {i} changed when interleaved with the others"
    assert sessions[0].step_cache.computed < sessions[0].step_cache.total  # the policies really skipped steps
    assert sessions[1].step_cache.computed < sessions[1].step_cache.total
    assert sessions[2].step_cache is None


def test_a_session_is_what_generate_runs():
    model = _model()
    kw = _streams(model)[0]
    video = generate_video(model, 9, **kw)  # 1 given frame + 4 chunks
    session = StreamSession(model, **kw)
    chunks = [session.next_chunk() for _ in range(4)] + [session.next_chunk(last=True)]
    assert torch.equal(torch.cat(chunks, dim=2), video)
    assert session.ended and session.stats.write_calls == 4 and session.stats.frames == 8
    with pytest.raises(RuntimeError, match="ended"):
        session.next_chunk()


def test_the_session_passes_its_own_step_cache():
    model = _model()
    sc = StepCache("fixed:2", model.config.depth)
    session = StreamSession(model, **dict(_streams(model)[1], step_cache=sc))
    assert session.step_cache is sc
    session.next_chunk()
    session.next_chunk()
    assert sc.chunk_computed == [3 * 2]  # 6 steps, fixed:2: steps 0, 3 and 5 (last), x 2 guidance rows
    assert not hasattr(model, "step_cache")


def test_trimming_only_the_last_chunk():
    model = _model()
    session = StreamSession(model, **_streams(model)[2])
    session.next_chunk()
    with pytest.raises(ValueError, match="last"):
        session.next_chunk(frames=1)
    one = session.next_chunk(last=True, frames=1)
    assert one.shape[2] == 1 and session.stats.frames == 1
