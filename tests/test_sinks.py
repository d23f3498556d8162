"""Attention sets past the training window (issue 24 item 1): sink frames that never leave the
cache beside a sliding window, for both backbones, and Wan's RoPE absolute (refused past its
table) or re-based (LongLive's rule), each exact against an oracle that shares no cache state
with the engine, in float64. Breaks tried by hand are named in each docstring."""

import pytest
import torch

from ca2vdm import ChunkLayout, KVCache, StreamSession
from ca2vdm.causal_wan import CausalWan
from ca2vdm.conditioning import Text
from ca2vdm.generate import generate_video
from ca2vdm.stream import next_chunks
from ca2vdm.wan import WanConfig, rotate

from conftest import random_text, tiny_model, tiny_wan
from oracle import Oracle

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT_DIM = 8
LEVELS = [1.0, 0.6, 0.25]  # a few-step sampler: x0 at each level, re-noised to the next


def close(a, b, tol=1e-9):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


# -- the attention set and the cache's slots ---------------------------------------------------------
@pytest.mark.parametrize("prefix,chunk,context,sink", [(0, 2, 6, 2), (1, 3, 7, 1), (0, 3, 5, 3), (2, 2, 5, 2),
                                                       (0, 4, 5, 1)])
def test_the_sink_stays_in_the_window_and_the_ring_holds_exactly_it(prefix, chunk, context, sink):
    """The mask equals the scalar definition; a chunk's window is the sink plus the most recent
    P_max - s frames; writing frames whose K is their index, the cache holds exactly that window
    after every chunk (including chunks longer than the ring: (0, 4, 5, 1) has a ring of 4). Breaks
    tried: ``slot_of`` without the sink (the ring over every slot) -> the sink is overwritten."""
    lay = ChunkLayout(prefix, chunk, context, sink)
    n = prefix + 8 * chunk
    mask = lay.mask(range(n), range(n))
    assert all(bool(mask[i, j]) == lay.attends(i, j) for i in range(n) for j in range(n))
    for k in range(1, 8):
        s = lay.chunk_start(k)
        window = lay.window(k)
        assert [j for j in range(s) if mask[s, j]] == window
        assert len(window) == min(s, context) and window[:sink] == list(range(min(sink, s)))
    cache = KVCache(lay, depth=1, batch=1, tokens=1, heads=1, head_dim=1, dtype=torch.float64)
    frame = 0
    for k in range(0 if prefix else 1, 10):
        q = lay.chunk_len(k)
        ids = torch.arange(frame, frame + q, dtype=torch.float64).view(1, 1, 1, q, 1)
        kk, _ = cache.stage(0, ids, -ids)
        assert sorted(kk[0, 0, 0, :, 0].tolist()) == lay.window(k) + list(range(frame, frame + q))
        cache.commit(0, q)
        cache.advance(q)
        frame += q
        assert sorted(cache.k[0][0, 0, 0, :cache.window_len, 0].tolist()) == lay.window(k + 1)
    assert cache.k[0][0, 0, 0, :sink, 0].tolist() == list(range(sink))  # the sink's own slots


def test_configs_refuse_a_sink_that_leaves_no_window():
    with pytest.raises(ValueError, match="fewer than max_context_frames"):
        ChunkLayout(0, 2, 3, 3)
    with pytest.raises(ValueError, match="prefix_enhance"):
        tiny_model(sink_frames=1, prefix_enhance=True)
    with pytest.raises(ValueError, match="rope_positions"):
        WanConfig(rope_positions="relative")


# -- the factorized backbone ------------------------------------------------------------------------
@pytest.mark.parametrize("positions", ["cyclic", "rope"])
def test_factorized_shared_with_a_sink_equals_the_masked_oracle(positions):
    """Prefix 1 (the sink is the given first frame), chunks of 2 in a window of 5: 8 chunks (6
    slides), text, guidance and a negative prompt: the cached stream equals the recompute-full
    oracle (the masked full-sequence forward over every frame so far), and differs from the same
    weights without a sink (the sink is used). Breaks tried: ``slot_of`` without the sink; the
    mask's sink term dropped (then both sides lose it: caught by the without-sink control)."""
    kw = dict(positions=positions, prefix_frames=1, chunk_frames=2, max_context_frames=5, conditioning="text",
              text_dim=16)
    model, plain = tiny_model(sink_frames=1, **kw), tiny_model(**kw)
    g = torch.Generator().manual_seed(5)
    args = dict(steps=2, guidance=3.0, seed=[3, 11], prompt=random_text(2, 6, 16, seed=1),
                negative_prompt=random_text(2, 3, 16, seed=2, ragged=False),
                first_frames=torch.randn(2, 3, 1, 8, 8, generator=g).double())
    shared = generate_video(model, 17, mode="shared", **args)
    oracle = generate_video(model, 17, mode="recompute-full", **args)
    assert close(shared, oracle)
    without = generate_video(plain, 17, mode="shared", **args)
    assert (shared[:, :, -2:] - without[:, :, -2:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="recompute-window"):
        StreamSession(model, mode="recompute-window", **{k: v for k, v in args.items()})


# -- the Wan backbone -------------------------------------------------------------------------------
def wan(sink=2, window=8, chunk=2, rope="absolute", rope_max=1024, seed=0) -> CausalWan:
    """``conftest.tiny_wan`` with chunks of 2 in a window of 8 and a sink of 2 (the cache: the sink's 2
    slots, then a ring of 4)."""
    return tiny_wan(seed, window, chunk, sink_frames=sink, rope_positions=rope, rope_max_seq_len=rope_max)


def text(batch, tokens=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Text(torch.randn(batch, tokens, TEXT_DIM, generator=g, dtype=torch.float64))


def literal_rebased(model: CausalWan, x, t, cond, frames, x0=True):
    """LongLive's relative RoPE written out, independent of ``sink_shifts`` and the cache: per chunk,
    queries and keys rotated at small positions — the sink frames at 0..s-1, the rest of the
    window and the chunk right after them (positions never reach the window W) — with the model's
    layers, block by block. x (B, C, F, H, W) at absolute ``frames``; returns x0 (or the velocity)."""
    tr, cfg = model.transformer, model.config.wan
    B, _, Fr, H, W = x.shape
    h, (e, mod) = tr.tokens(x), tr.modulation(t)
    one = tr.rope([0] * Fr, H, W)
    identity = (torch.ones_like(one[0]), torch.zeros_like(one[1]))
    mask = tr.block_causal_mask(frames, frames)
    groups = []  # (query rows, key rows, query positions, key positions)
    for q0 in range(Fr):
        if q0 and mask[q0].equal(mask[q0 - 1]):
            continue
        q1 = q0 + 1
        while q1 < Fr and mask[q1].equal(mask[q0]):
            q1 += 1
        keys = [j for j in range(Fr) if mask[q0, j]]
        sinks = [j for j in keys if frames[j] < cfg.sink_frames]
        rest = [j for j in keys if frames[j] >= cfg.sink_frames]
        first = frames[rest[0]] if rest else 0
        if sinks and first > cfg.sink_frames:  # the window has left the sink behind: re-base it
            pos = {j: frames[j] for j in sinks} | {j: cfg.sink_frames + frames[j] - first for j in rest}
        else:
            pos = {j: frames[j] for j in keys}
        pos |= {i: pos.get(i, cfg.sink_frames + frames[i] - first) for i in range(q0, q1)}
        assert max(pos.values()) < cfg.max_context_frames
        groups.append((range(q0, q1), keys, [pos[i] for i in range(q0, q1)], [pos[j] for j in keys]))
    for i, block in enumerate(tr.blocks):
        P = block.ffn.fc1.weight.dtype
        m = (block.modulation.to(mod.dtype) + mod)[:, :, :, None]
        shift, scale, gate, c_shift, c_scale, c_gate = m.unbind(2)
        q, k, v = block.self_attn.qkv((block.norm1(h) * (1 + scale) + shift).to(P), identity)
        parts = []
        for rows, keys, qpos, kpos in groups:
            cq, sq = tr.rope(qpos, H, W)
            ck, sk = tr.rope(kpos, H, W)
            qq = rotate(q[:, :, rows.start:rows.stop], cq[:, :, 0], sq[:, :, 0])  # (B, H, Fq, S, d)
            kk = rotate(k[:, :, keys], ck[:, :, 0], sk[:, :, 0])
            parts.append(block.self_attn.attend(qq, kk, v[:, :, keys]))
        h = h + torch.cat(parts, dim=1).to(h.dtype) * gate
        h = h + block.cross_attn(block.norm_cross(h).to(P), cond.kv[i]).to(h.dtype)
        h = h + block.ffn((block.norm2(h) * (1 + c_scale) + c_shift).to(P)).to(h.dtype) * c_gate
    out = tr.head_output(h, e, H, W).to(x.dtype)
    return x - (t / 1000)[:, None, :, None, None] * out if x0 else out


class Literal:
    """``literal_rebased`` as the network the independent sampler (``oracle.Oracle``) calls."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    def __call__(self, x, t, cond, start=0, x0=False):
        frames = list(range(start, start + x.shape[2])) if isinstance(start, int) else list(start)
        return literal_rebased(self.model, x, t, cond, frames, x0)


def test_wan_shared_with_a_sink_equals_the_oracle_and_batches_with_a_stream_elsewhere():
    """Window 8 with a sink of 2, chunks of 2: 9 chunks (5 slides) with a prompt, a negative prompt
    and guidance 3: every chunk equals the independent sampler over Wan's block-causal forward with
    the sink; a second stream at another frame batched with it gives the same chunks as alone; the
    sink matters (a model without it differs). Breaks tried: ``slot_of`` without the sink;
    ``window_before`` without the sink (the session re-caches the wrong frames, caught below)."""
    model = wan()
    prompt, negative = text(2), text(2, 3, seed=2)
    shared = generate_video(model, 18, prompt=prompt, negative_prompt=negative, guidance=3.0, seed=[4, 9],
                            levels=LEVELS)
    oracle = Oracle(model, [4, 9], model.guided_condition(2, prompt, negative=negative), guidance=3.0, levels=LEVELS)
    assert close(shared, torch.cat(oracle.run(9, first_chunk=1), dim=2))
    without = generate_video(wan(sink=0), 18, prompt=prompt, negative_prompt=negative, guidance=3.0, seed=[4, 9],
                             levels=LEVELS)
    assert (shared[:, :, -2:] - without[:, :, -2:]).abs().max() > 1e-3
    a = StreamSession(model, prompt=text(1), seed=1, levels=LEVELS)
    b = StreamSession(model, prompt=text(1, seed=3), seed=2, levels=LEVELS)
    alone = StreamSession(model, prompt=text(1), seed=1, levels=LEVELS)
    ref = [alone.next_chunk() for _ in range(8)]
    for _ in range(3):
        a.next_chunk()
    together = [next_chunks([a, b])[0] for _ in range(5)]
    assert all(close(x, y) for x, y in zip(together, ref[3:]))


def test_rebased_positions_equal_the_literal_rule_and_go_past_the_rope_table():
    """Re-based RoPE (a tiny table of 12 positions stands in for Wan's 1024): the block-causal
    forward over 20 frames equals the literal rule (every chunk's sink at 0..1, its window after it;
    positions never reach the window) and the cached stream equals the independent sampler over the
    literal rule past frame 12, where absolute positions are refused with a clear error (also at
    Wan's real 1024). Breaks tried: no sink move in the cache (``advance`` without ``_shift_sinks``);
    moving it by the chunk start instead of the frames evicted; ``frame_shift`` rotating the height
    part; the absolute check off."""
    model = wan(rope="rebased", rope_max=12)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, 20, 4, 4, generator=g, dtype=torch.float64)
    t = torch.rand(1, 20, generator=g, dtype=torch.float64) * 1000
    cond = model.condition(1, text(1))
    frames = list(range(20))
    assert close(model(x, t, cond, x0=True), literal_rebased(model, x, t, cond, frames))
    prompt = text(2)
    shared = generate_video(model, 24, prompt=prompt, seed=[4, 9], levels=LEVELS)
    oracle = Oracle(Literal(model), [4, 9], model.condition(2, prompt), levels=LEVELS, start=[])
    assert close(shared, torch.cat(oracle.run(12, first_chunk=1), dim=2))
    absolute = wan(rope="absolute", rope_max=12)
    with pytest.raises(ValueError, match="past the 12 absolute RoPE positions.*rebased"):
        generate_video(absolute, 24, prompt=prompt, seed=[4, 9], levels=LEVELS)
    with pytest.raises(ValueError, match="past the 1024 absolute RoPE positions"):
        wan().transformer.rope(range(1020, 1026), 4, 4)
    cache = model.new_cache(2)
    assert cache.nbytes == cache.formula_bytes() > wan().new_cache(2).nbytes  # the sink's keys as written


@pytest.mark.parametrize("rope", ["absolute", "rebased"])
def test_a_prompt_switch_reencodes_or_keeps_the_sink(rope, tmp_path):
    """After 7 chunks (frames 0-13; the window: sink 0-1 and frames 10-13) the prompt switches.
    ``reencode``: the next chunks equal the independent sampler whose context is those 6 frames at
    their indices under the new prompt. ``keep``: the sink's K/V stay as they were, bit for bit, and
    the rest differs from ``reencode``; before any eviction (after 2 chunks), ``keep`` equals a
    stream that wrote the sink under the old prompt, switched without re-cache and wrote the same
    frames as given frames under the new one. Breaks tried: ``keep_sinks`` copying the moved keys
    instead of the kept ones (rebased); the re-cache without the sink frames."""
    model = wan(rope=rope)
    old, new = text(1), text(1, seed=5)
    s = StreamSession(model, prompt=old, seed=3, levels=LEVELS)
    for _ in range(7):
        s.next_chunk()
    frames, idx = s.window_frames()
    assert idx == [0, 1, 10, 11, 12, 13]
    oracle = Oracle(model, [3], model.condition(1, new), levels=LEVELS, context=frames, start=idx)
    k = StreamSession.load(s.save(tmp_path / "s.safetensors"), model)  # the same stream, to switch the other way
    sink = [[x.clone() for x in s.engine.cache.sink_kv(i)] for i in range(2)]  # K as written, V
    s.set_prompt(new)
    reencoded = [s.next_chunk() for _ in range(3)]
    assert close(torch.cat(reencoded, 2), torch.cat(oracle.run(3, first_chunk=8), 2))
    assert not torch.equal(s.engine.cache.sink_kv(0)[1], sink[0][1])
    k.set_prompt(new, sinks="keep")
    assert all(torch.equal(x, y) for i in range(2) for x, y in zip(k.engine.cache.sink_kv(i), sink[i]))
    assert (k.next_chunk() - reencoded[0]).abs().max() > 1e-6
    # before any eviction: keep == old-prompt sink, then the new prompt's frames written as given frames
    a = StreamSession(model, prompt=old, seed=3, levels=LEVELS)
    written = [a.next_chunk() for _ in range(2)]
    a.set_prompt(new, sinks="keep")
    b = StreamSession(model, prompt=old, seed=3, levels=LEVELS)
    b.next_chunk()
    b.set_prompt(new, recache=False)
    b.extend(written[1])
    assert close(a.next_chunk(), b.next_chunk(), 1e-12)


def test_a_saved_stream_with_a_rebased_sink_continues_bit_for_bit(tmp_path):
    """Past evictions, the saved stream (the sink frames, the sink's keys as written and as moved)
    loads in place of the original and both continue to the same bits."""
    model = wan(rope="rebased")
    s = StreamSession(model, prompt=text(1), seed=2, levels=LEVELS)
    for _ in range(6):
        s.next_chunk()
    r = StreamSession.load(s.save(tmp_path / "s.safetensors"), model)
    assert torch.equal(r.sink_kept, s.sink_kept)
    assert all(torch.equal(r.next_chunk(), s.next_chunk()) for _ in range(3))


def test_all_chunks_training_forward_sees_the_rebased_sink_as_the_cache_does():
    """Teacher forcing with a rebased sink: one forward over [clean clip || noisy copies] (6 chunks
    of 2, window 8 with a sink of 2: 2 evictions) predicts for every noisy chunk what its cached
    denoising step computes, and a rollout through the cache under autograd (out-of-place writes,
    the sink moved out of place) back-propagates. Break tried: the sink keys of groups whose keys
    are not one slice (the noisy copies') left unmoved."""
    model = wan(rope="rebased")
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(1, 4, 12, 4, 4, generator=g, dtype=torch.float64)
    noisy = torch.randn(1, 4, 12, 4, 4, generator=g, dtype=torch.float64)
    t = (torch.rand(1, 6, generator=g, dtype=torch.float64) * 1000).repeat_interleave(2, dim=1)
    cond = model.condition(1, text(1))
    with torch.no_grad():
        together = model.forward_all_chunks(clean, noisy, t, cond)
    cache = model.new_cache(1)
    x = clean.clone().requires_grad_(True)
    outs = []
    for k in range(6):
        s = slice(2 * k, 2 * k + 2)
        outs.append(model.forward_cached(noisy[:, :, s], t[:, s], cache, cond))
        assert close(together[:, :, s], outs[-1].detach()), k
        model.forward_cached(x[:, :, s], torch.zeros(1, 2, dtype=torch.float64), cache, cond, write=True)
    torch.cat(outs, 2).square().sum().backward()
    assert x.grad[:, :, :2].abs().sum() > 0  # the sink's frames reach the last chunks through the moved keys


def test_a_sink_longer_than_a_chunk_is_kept_and_recached_at_its_frames():
    """A sink of 3 frames with chunks of 2 (the sink ends inside the second chunk): after every chunk
    the session keeps exactly the window's frames at their indices, for both backbones, and a prompt
    switch after evictions continues as the independent sampler over those frames. Break tried:
    ``kept_start`` set only when nothing was kept (the first chunk, all sink, leaves an empty
    ``kept``): the indices shift and the re-cache lands at the wrong frames."""
    dit = tiny_model(prefix_frames=1, chunk_frames=2, max_context_frames=7, sink_frames=3)
    s = StreamSession(dit, first_frames=torch.randn(1, 3, 1, 8, 8, dtype=torch.float64), steps=1)
    for _ in range(6):
        s.next_chunk()
        fw = s.engine.cache.frames_written
        assert s.window_frames()[1] == dit.layout.window_before(fw), fw
    model = wan(sink=3, window=9)
    old, new = text(1), text(1, seed=5)
    w = StreamSession(model, prompt=old, seed=3, levels=LEVELS)
    for _ in range(6):
        w.next_chunk()
        assert w.window_frames()[1] == model.layout.window_before(w.engine.cache.frames_written)
    frames, idx = w.window_frames()
    assert idx == [0, 1, 2, 8, 9, 10, 11]
    oracle = Oracle(model, [3], model.condition(1, new), levels=LEVELS, context=frames, start=idx)
    w.set_prompt(new)
    assert close(torch.cat([w.next_chunk() for _ in range(2)], 2), torch.cat(oracle.run(2, first_chunk=7), 2))
