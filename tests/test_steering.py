"""Steering a stream between chunks: prompt switching with a re-cache, given frames, video-to-video,
saved streams, and several streams batched into one forward (``stream.StreamSession``, ``next_chunks``)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ca2vdm import StreamSession
from ca2vdm.stream import next_chunks

from conftest import random_text, tiny_model
from oracle import Oracle

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = 16


def _model(**kw):
    base = dict(conditioning="text", text_dim=TEXT)
    base.update(kw)
    return tiny_model(**base)


def _first(model, batch=1, seed=5):
    cfg = model.config
    if not cfg.prefix_frames:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.in_channels, cfg.prefix_frames, *cfg.frame_size, generator=g, dtype=model.dtype)


def _session(model, mode="shared", batch=1, guidance=3.0, seed=3, prompt_seed=1, **kw):
    return StreamSession(model, first_frames=_first(model, batch), prompt=random_text(batch, 6, TEXT, seed=prompt_seed),
                         negative_prompt=random_text(batch, 3, TEXT, seed=2, ragged=False) if guidance != 1 else None,
                         steps=kw.pop("steps", 3), guidance=guidance, seed=seed if batch == 1 else [seed, seed + 7],
                         mode=mode, **kw)


def _run(session, n):
    return [session.next_chunk() for _ in range(n)]


# -- prompt switching ---------------------------------------------------------------------------
@pytest.mark.parametrize("positions", ["cyclic", "rope"])
@pytest.mark.parametrize("prefix_frames,enhance", [(1, True), (0, False), (1, False)])
def test_a_recache_continues_as_the_oracle_cut_at_the_first_kept_frame(positions, prefix_frames, enhance):
    """Shared mode re-caches the window from the kept frames under the new prompt: the chunks after
    the switch equal an independent sampler (``oracle.Oracle``) whose context is cut, by this test,
    to the last P_max frames generated, from their absolute first frame (float64). With prefix 1,
    P_max 5, l 2 the kept window starts mid-chunk. Breaks tried: the re-cache's first frame shifted
    by 1 (all six fail) and by 2, a whole chunk (the cyclic cases fail; under RoPE a shift of every
    position by a whole chunk changes no number, so nothing can see it)."""
    model = _model(positions=positions, prefix_frames=prefix_frames, prefix_enhance=enhance)
    shared = _session(model, batch=2)
    old, new = random_text(2, 6, TEXT, seed=1), random_text(2, 4, TEXT, seed=9)
    negative = random_text(2, 3, TEXT, seed=2, ragged=False)
    oracle = Oracle(model, [3, 10], model.guided_condition(2, old, negative=negative), guidance=3.0, steps=3)
    if prefix_frames:
        oracle.append(_first(model, 2))
    before = 4
    first = [shared.next_chunk()] if prefix_frames else []
    for a, b in zip(_run(shared, before), oracle.run(before, first_chunk=1)):
        assert (a - b).abs().max() < 1e-9
    frames_so_far = prefix_frames + before * model.config.chunk_frames  # 9 or 8
    oracle.keep_last(min(frames_so_far, model.config.max_context_frames))
    assert oracle.start == frames_so_far - 5 and (not prefix_frames or oracle.start % 2 == 0)  # mid-chunk: chunks start odd
    oracle.cond = model.guided_condition(2, new, negative=negative)
    shared.set_prompt(new, recache=True)
    after = _run(shared, 4)
    for a, b in zip(after, oracle.run(4, first_chunk=1 + before)):
        assert (a - b).abs().max() < 1e-9
    stay = _session(model, batch=2)  # a stream that kept the old K/V differs: the re-cache did something
    _run(stay, before + (1 if prefix_frames else 0))
    stay.set_prompt(new, recache=False)
    assert (_run(stay, 1)[0] - after[0]).abs().max() > 1e-6


def test_recompute_full_after_a_switch_is_the_same_oracle():
    """The recompute-full mode (the exactness suite's reference) also cuts its history at the
    first kept frame on a switch: its chunks equal the independent sampler's."""
    model = _model(prefix_frames=1)
    s = _session(model, "recompute-full", batch=2)
    old, new = random_text(2, 6, TEXT, seed=1), random_text(2, 4, TEXT, seed=9)
    negative = random_text(2, 3, TEXT, seed=2, ragged=False)
    oracle = Oracle(model, [3, 10], model.guided_condition(2, old, negative=negative), guidance=3.0, steps=3)
    oracle.append(_first(model, 2))
    s.next_chunk()
    for a, b in zip(_run(s, 3), oracle.run(3, first_chunk=1)):
        assert (a - b).abs().max() < 1e-9
    oracle.keep_last(model.config.max_context_frames)
    oracle.cond = model.guided_condition(2, new, negative=negative)
    s.set_prompt(new)
    for a, b in zip(_run(s, 3), oracle.run(3, first_chunk=4)):
        assert (a - b).abs().max() < 1e-9


def test_without_recache_the_old_kv_stay_and_only_the_text_changes():
    model = _model()
    s = _session(model)
    _run(s, 4)
    kv = {n: b.clone() for n, b in s.engine.cache.buffers().items()}
    old_text_k = s.cond.kv[0][0].clone()
    s.set_prompt(random_text(1, 4, TEXT, seed=9), recache=False)
    assert all(torch.equal(kv[n], b) for n, b in s.engine.cache.buffers().items())
    assert s.cond.kv[0][0].shape != old_text_k.shape or not torch.equal(s.cond.kv[0][0], old_text_k)
    ref = _session(model)
    _run(ref, 4)
    assert (s.next_chunk() - ref.next_chunk()).abs().max() > 1e-6


@pytest.mark.parametrize("recache", [True, False])
def test_turning_guidance_on_recaches_the_unconditional_half(recache):
    """From unguided to guided: the cache doubles; its unconditional half is computed from the kept
    frames under the null / negative prompt; the conditional half is re-cached or kept as it was."""
    model = _model()
    s = _session(model, guidance=1.0)
    _run(s, 4)
    old = {n: b.clone() for n, b in s.engine.cache.buffers().items()}
    negative = random_text(1, 3, TEXT, seed=2, ragged=False)
    s.set_prompt(guidance=3.0, negative_prompt=negative, recache=recache)
    assert s.engine.cache.batch == 2 and s.rows == 2
    fresh = model.new_cache(2, s.cache_dtype)
    with torch.no_grad():
        model.fill_cache(torch.cat([s.kept, s.kept]), fresh, s.cond, start=s.kept_start)
    for name, buf in s.engine.cache.buffers().items():
        assert torch.equal(buf[1:], fresh.buffers()[name][1:]), name  # the unconditional half: re-cached
        assert torch.equal(buf[:1], (fresh.buffers() if recache else old)[name][:1]), name
    oracle = _session(model, "recompute-full", guidance=1.0)
    _run(oracle, 4)
    oracle.set_prompt(guidance=3.0, negative_prompt=negative)
    if recache:
        assert (s.next_chunk() - oracle.next_chunk()).abs().max() < 1e-9
    s.set_prompt(guidance=1.0, recache=False)  # off again: the unconditional half is dropped
    assert s.engine.cache.batch == 1 and s.rows == 1


def test_set_prompt_refuses_what_it_cannot_do_and_changes_nothing():
    model = _model()
    s = _session(model, mode="recompute-full")
    _run(s, 2)
    with pytest.raises(ValueError, match="recache=False"):
        s.set_prompt(random_text(1, 4, TEXT, seed=9), recache=False)
    shared = _session(model)
    _run(shared, 2)
    cond = shared.cond
    with pytest.raises(ValueError, match="text states"):
        shared.set_prompt(random_text(2, 4, TEXT, seed=9))  # a prompt for two videos in a stream of one
    assert shared.cond is cond and shared.rows == 2
    last = _session(model)
    last.next_chunk(last=True) if not model.config.prefix_frames else (last.next_chunk(), last.next_chunk(last=True))
    with pytest.raises(RuntimeError, match="ended"):
        last.set_prompt(random_text(1, 4, TEXT, seed=9))


# -- given frames ------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix_frames", [0, 1])
def test_extended_frames_are_context_as_if_generated(prefix_frames):
    """A stream that is given another stream's chunks continues exactly as that stream does."""
    model = _model(prefix_frames=prefix_frames)
    a = _session(model)
    chunks = _run(a, 4)
    generated = torch.cat(chunks[1:] if prefix_frames else chunks, dim=2)
    b = _session(model)
    b.extend(generated)
    assert b.chunk == a.chunk and b.kept_start == a.kept_start and torch.equal(b.kept, a.kept)
    assert torch.equal(b.next_chunk(), a.next_chunk())
    with pytest.raises(ValueError, match="whole chunks"):
        b.extend(generated[:, :, :1])
    with pytest.raises(ValueError, match=r"\(B, C, n\*2, H, W\)"):
        b.extend(torch.zeros(1, 3, 2, 4, 4, dtype=torch.float64))


# -- video-to-video ----------------------------------------------------------------------------
@pytest.mark.parametrize("levels", [None, [1.0, 0.9, 0.75, 0.5]])
def test_strength_one_is_plain_generation(levels):
    model = _model(prediction="sample")
    kw = dict(steps=None, levels=levels) if levels else {}
    a, b = _session(model, **kw), _session(model, **kw)
    source = torch.rand(1, 3, 2, 8, 8, dtype=torch.float64) * 2 - 1
    for _ in range(3):
        assert torch.equal(a.next_chunk(), b.next_chunk(source=source, strength=1.0) if b.chunk else b.next_chunk())


def test_a_source_enters_the_schedule_at_the_level_its_strength_maps_to():
    model = _model(prediction="sample", prefix_frames=0)
    s = _session(model, guidance=1.0, steps=None, levels=[1.0, 0.9, 0.75, 0.5])
    assert [s.start_step(x) for x in (1.0, 0.95, 0.9, 0.8, 0.75, 0.6, 0.3)] == [0, 1, 1, 2, 2, 3, 3]
    source = torch.rand(1, 3, 2, 8, 8, dtype=torch.float64) * 2 - 1
    trajectory, calls = [], s.stats.denoise_calls
    s.next_chunk(source=source, strength=0.8, trajectory=trajectory)
    noise = torch.randn((3, 2, 8, 8), generator=torch.Generator().manual_seed(__import__("ca2vdm").diffusion.mix_seed(3, 1, 0)))
    assert torch.allclose(trajectory[0], 0.25 * source + 0.75 * noise.double()[None], atol=1e-12)
    assert len(trajectory) == 3 and s.stats.denoise_calls - calls == 2  # steps 2 and 3 only
    many = _session(model, guidance=1.0, steps=10)  # the flow schedule: sigma itself is the level
    i = many.start_step(0.5)
    assert many.sampler.level(i) <= 0.5 < many.sampler.level(i - 1)
    with pytest.raises(ValueError, match="strength"):
        s.next_chunk(source=source, strength=0.0)
    with pytest.raises(ValueError, match="source chunk must be"):
        s.next_chunk(source=source[:, :, :1], strength=0.5)


# -- saved streams ------------------------------------------------------------------------------
CONTINUE = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from conftest import tiny_model
from ca2vdm import StreamSession
from safetensors.torch import save_file
model = tiny_model(conditioning="text", text_dim=16, prefix_enhance=True)
s = StreamSession.load({path!r}, model)
save_file({{"chunks": torch.cat([s.next_chunk() for _ in range(4)], dim=2)}}, {out!r})
"""


@pytest.mark.parametrize("mode,step_cache", [("shared", "fixed:1"), ("recompute-full", None)])
def test_a_saved_stream_continues_bit_for_bit_in_a_new_process(tmp_path, mode, step_cache):
    model = _model(prefix_enhance=True)
    s = _session(model, mode=mode, batch=2, step_cache=step_cache)
    _run(s, 3)
    s.set_prompt(random_text(2, 5, TEXT, seed=4))  # a switched stream: its new prompt and re-cache are saved
    path = s.save(tmp_path / "stream.safetensors")
    expected = torch.cat(_run(s, 4), dim=2)
    out = tmp_path / "continued.safetensors"
    code = CONTINUE.format(tests=str(Path(__file__).parent), path=str(path), out=str(out))
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, timeout=120)
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(out))["chunks"], expected)


def test_a_stream_without_guidance_saves(tmp_path):
    """Without guidance the prepared conditioning holds the prompt's own mask: the file must still
    be written (safetensors refuses tensors that share memory)."""
    model = _model()
    s = _session(model, guidance=1.0)
    _run(s, 2)
    path = s.save(tmp_path / "s.safetensors")
    t = StreamSession.load(path, model)
    assert torch.equal(t.next_chunk(), s.next_chunk())


def test_a_bad_saved_stream_is_a_clear_error(tmp_path):
    model = _model()
    s = _session(model)
    _run(s, 2)
    path = s.save(tmp_path / "s.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        StreamSession.load(tmp_path / "cut.safetensors", model)
    with pytest.raises(ValueError, match="another config"):
        StreamSession.load(path, _model(hidden=16))
    with pytest.raises(ValueError, match="saved in torch.float64"):
        StreamSession.load(path, _model().float())
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a saved stream"):
        StreamSession.load(tmp_path / "other.safetensors", model)


# -- many streams in one forward -----------------------------------------------------------------
@pytest.mark.parametrize("positions,enhance", [("cyclic", False), ("rope", True)])
def test_batched_streams_give_what_each_gives_alone(positions, enhance):
    """Streams that joined at other frames, with other prompts (other lengths), seeds, batch sizes
    and guidance scales, one without guidance (its own group), and two doing video-to-video at other
    strengths (their sources enter the schedule at other steps, in the same batch as plain streams):
    each equals itself run alone (float64), and the shared-key ones really ran as one forward. Break
    tried: zeroing the source inside ``_batched_chunk``."""
    model = _model(positions=positions, prefix_enhance=enhance)
    specs = [dict(guidance=3.0, seed=1, prompt_seed=1), dict(guidance=5.0, seed=2, prompt_seed=2, batch=2),
             dict(guidance=2.0, seed=3, prompt_seed=3), dict(guidance=1.0, seed=4, prompt_seed=4),
             dict(guidance=1.0, seed=5, prompt_seed=5)]
    joins = [0, 1, 3, 0, 2]   # the round at which each stream joins
    lead = [4, 3, 3, 0, 1]    # chunks each stream ran alone before joining
    source = torch.rand(1, 3, 2, 8, 8, dtype=torch.float64) * 2 - 1
    v2v = {2: 0.6, 1: 0.3}    # streams 2 and 1 do video-to-video once batched (entering at steps 1 and 2 of 3)

    def play(batched):
        sessions = [_session(model, **spec) for spec in specs]
        out = [_run(s, n) for s, n in zip(sessions, lead)]
        for r in range(6):
            live = [j for j in range(len(specs)) if joins[j] <= r]
            srcs = [source.expand(sessions[j].batch, -1, -1, -1, -1) if j in v2v else None for j in live]
            sts = [v2v.get(j) for j in live]
            if batched:
                got = next_chunks([sessions[j] for j in live], srcs, sts)
            else:
                got = [sessions[j].next_chunk(source=x, strength=st) for j, x, st in zip(live, srcs, sts)]
            for j, x in zip(live, got):
                out[j].append(x)
        return out

    rows = []
    hook = model.blocks[0].register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    alone = play(False)
    solo_rows = set(rows)
    rows.clear()
    together = play(True)
    hook.remove()
    assert max(rows) > max(solo_rows)  # some forward really held several streams' rows
    guided = [_session(model, **spec) for spec in specs[:3]]
    for s, n in zip(guided, lead):
        _run(s, n)
    assert guided[2].batch_key() == guided[1].batch_key() == guided[0].batch_key()  # the v2v streams batch too
    assert {guided[0].start_step(v) for v in v2v.values()} == {1, 2}
    for j, (a, b) in enumerate(zip(alone, together)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert (x - y).abs().max() < 1e-10, f"stream {j} changed when batched"


def test_next_chunks_refuses_a_session_twice():
    model = _model()
    s = _session(model)
    with pytest.raises(ValueError, match="only once"):
        next_chunks([s, s])


def test_a_draft_chunk_leaves_the_stream_as_it_was():
    model = _model()
    a, b = _session(model), _session(model)
    _run(a, 3), _run(b, 3)
    draft = a.draft_chunk()
    assert torch.equal(draft, a.next_chunk()) and torch.equal(draft, b.next_chunk())
    assert a.chunk == b.chunk and torch.equal(a.kept, b.kept)


SHIPPED = """
import sys, torch
torch.set_num_threads(1)
from ca2vdm import StreamSession, Text
from ca2vdm.assets import asset_path
from ca2vdm.checkpoint import load_checkpoint
from ca2vdm.text import get_text_encoder
from safetensors.torch import save_file
model = load_checkpoint(asset_path({name!r}))
s = StreamSession.load({path!r}, model)
s.set_prompt(Text(*get_text_encoder("cpu").encode(["a 7 moving up"])))
save_file({{"chunks": torch.cat([s.next_chunk() for _ in range(2)], dim=2)}}, {out!r})
"""


@pytest.mark.parametrize("name,guidance", [("digits-fast", 1.0), ("digits", 4.0)])
def test_a_shipped_model_with_its_text_encoder_saves_loads_switches_and_continues(tmp_path, name, guidance):
    """The stream a user starts: a shipped model, a prompt from the shipped text encoder (unguided,
    its condition's mask is a view of the prompt's: they alias in memory), two chunks, saved, loaded
    in a new process, the prompt switched (a re-cache from the restored kept frames), two chunks:
    bit-identical to the same stream never saved. Breaks tried: not restoring ``kept`` /
    ``kept_start`` in ``load`` (the re-cache starts from nothing or the wrong frame), and saving
    aliased tensors as they are (safetensors refuses them)."""
    from ca2vdm import Text
    from ca2vdm.assets import asset_path
    from ca2vdm.checkpoint import load_checkpoint, sampling_for
    from ca2vdm.text import get_text_encoder

    model, enc = load_checkpoint(asset_path(name)), get_text_encoder("cpu")
    sampling = sampling_for(asset_path(name), guidance=guidance)
    s = StreamSession(model, prompt=Text(*enc.encode(["a 4 moving right"])), seed=1, **sampling)
    for _ in range(3):  # 12 frames: the kept window (P_max = 8) starts at frame 4
        s.next_chunk()
    assert s.kept_start == 4
    path = s.save(tmp_path / "stream.safetensors")
    s.set_prompt(Text(*enc.encode(["a 7 moving up"])))
    expected = torch.cat([s.next_chunk() for _ in range(2)], dim=2)
    out = tmp_path / "continued.safetensors"
    code = SHIPPED.format(name=name, path=str(path), out=str(out))
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, timeout=600)
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(out))["chunks"], expected)
