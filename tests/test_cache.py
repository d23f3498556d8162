"""The KV-cache queue: FIFO window semantics, wrap-around, bytes, no host syncs, no torch.roll."""

import pytest
import torch

from ca2vdm import ChunkLayout, KVCache
from ca2vdm.generate import GenerationStats, generate_video

from conftest import random_text, tiny_model


@pytest.mark.parametrize("prefix,chunk,context", [(1, 8, 25), (1, 2, 5), (1, 3, 7), (0, 4, 6), (2, 3, 2), (1, 5, 3)])
def test_mask_matches_scalar_definition(prefix, chunk, context):
    lay = ChunkLayout(prefix, chunk, context)
    n = prefix + 6 * chunk
    mask = lay.mask(range(n), range(n))
    for i in range(n):
        for j in range(n):
            assert bool(mask[i, j]) == lay.attends(i, j)
    # the window is what a chunk attends to before itself
    for k in range(1, 6):
        s = lay.chunk_start(k)
        assert [j for j in range(s) if mask[s, j]] == list(lay.window(k))


@pytest.mark.parametrize("prefix,chunk,context,enhance", [(1, 8, 25, 3), (1, 2, 5, 3), (1, 3, 7, 3),
                                                           (0, 4, 6, 3), (2, 3, 2, 3), (1, 5, 3, 2)])
def test_ring_holds_exactly_the_window(prefix, chunk, context, enhance):
    """Write frames whose K equals their index; after each chunk the ring holds the next window."""
    lay = ChunkLayout(prefix, chunk, context)
    cache = KVCache(lay, depth=2, batch=1, tokens=1, heads=1, head_dim=1, prefix_enhance_frames=enhance,
                    dtype=torch.float64)
    frame = 0
    for k in range(0 if prefix else 1, 12):
        q = lay.chunk_len(k)
        ids = torch.arange(frame, frame + q, dtype=torch.float64).view(1, 1, 1, q, 1)
        for b in range(2):
            kk, vv = cache.stage(b, ids, -ids)
            assert kk.shape[3] == cache.window_len + q
            assert sorted(kk[0, 0, 0, :, 0].tolist()) == list(lay.window(k)) + list(range(frame, frame + q))
            cache.commit(b, q)
            cache.write_prefix(b, ids.view(1, 1, q, 1, 1), -ids.view(1, 1, q, 1, 1))
        cache.advance(q)
        frame += q
        window = sorted(cache.k[0][0, 0, 0, :cache.window_len, 0].tolist())
        assert window == list(lay.window(k + 1)), (k, window)
        assert sorted((-cache.v[1][0, 0, 0, :cache.window_len, 0]).tolist()) == window
        pk, _ = cache.prefix(0)
        assert sorted(pk[0, 0, :, 0].tolist()) == list(range(max(0, frame - enhance), frame))


def test_cache_bytes_equal_formula_and_double_with_guidance():
    model = tiny_model(conditioning="text", text_dim=16, prefix_enhance=True, max_context_frames=5)
    cfg = model.config
    cache = model.new_cache(batch=3, dtype=torch.float16)
    per_frame = cfg.depth * cfg.tokens * 2 * cfg.hidden * 2  # bytes, fp16
    staging = cfg.chunk_frames
    assert cache.nbytes == cache.formula_bytes()
    assert cache.nbytes == 3 * per_frame * (cfg.max_context_frames + staging + cfg.prefix_enhance_frames)
    assert cache.window_bytes() == 3 * per_frame * cfg.max_context_frames
    # the paper's figure (docs/CONCEPTS.md §4): 28 x 256 x 2304 x 2 B per frame, 25 frames ~ 0.77 GiB
    paper = KVCache(ChunkLayout(1, 8, 25), depth=28, batch=1, tokens=256, heads=16, head_dim=72,
                    dtype=torch.bfloat16, device="meta")
    window = sum(t[:, :, :, :25].numel() * t.element_size() for t in paper.k + paper.v)  # the ring's slots
    assert paper.window_bytes() == window
    assert abs(paper.window_bytes() / 2**30 - 0.77) < 0.01

    kw = dict(first_frames=torch.zeros(1, 3, 1, 8, 8, dtype=torch.float64), steps=1, seed=0,
              prompt=random_text(1, 4, 16))
    plain, guided = GenerationStats(), GenerationStats()
    generate_video(model, 5, stats=plain, **kw)
    generate_video(model, 5, guidance=2.0, stats=guided, **kw)
    assert guided.cache_bytes == 2 * plain.cache_bytes == 2 * model.new_cache(1).nbytes


def test_cache_dtype_is_selectable():
    model = tiny_model(dtype=torch.float32)
    stats = GenerationStats()
    out = generate_video(model, 7, first_frames=torch.zeros(1, 3, 1, 8, 8), steps=1,
                         cache_dtype=torch.bfloat16, stats=stats)
    assert torch.isfinite(out).all()
    assert stats.cache_bytes == model.new_cache(1, torch.bfloat16).nbytes == model.new_cache(1).nbytes // 2


def test_hot_path_has_no_host_sync_and_no_roll(monkeypatch):
    """Denoising steps and write passes never read a device value on the host, never torch.roll."""
    model = tiny_model(conditioning="text", text_dim=16, prefix_enhance=True, positions="rope")
    cond = model.condition(2, random_text(2, 4, 16))
    cache = model.new_cache(2)
    frames = torch.randn(2, 3, 1 + 6 * 2, 8, 8, dtype=torch.float64)

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync or roll in the hot path")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch, "roll", forbidden)
    with torch.no_grad():
        for first, end in model.layout.chunks(0, frames.shape[2]):
            x = frames[:, :, first:end]
            t = torch.full((2, end - first), 500.0, dtype=torch.float64)
            model.forward_cached(x, t, cache, cond)  # a denoising step
            model.forward_cached(x, t * 0, cache, cond, write=True)  # the write pass
    monkeypatch.undo()
    assert cache.frames_written == frames.shape[2]


def test_write_pass_count_and_denoise_count():
    model = tiny_model()
    stats = GenerationStats()
    out = generate_video(model, 1 + 5 * 2 - 1, first_frames=torch.zeros(1, 3, 1, 8, 8, dtype=torch.float64),
                         steps=2, stats=stats)
    assert out.shape[2] == 10 and stats.chunks == 5 and stats.frames == 9
    assert stats.denoise_calls == 5 * 2
    assert stats.write_calls == 1 + 4  # chunk 0, then every chunk that has a successor


def test_text_kv_computed_once_per_prompt(monkeypatch):
    """Cross-attention K/V of the prompt are computed once per generation, not per denoising step."""
    from ca2vdm.layers import CrossAttention

    calls = []
    original = CrossAttention.text_kv
    monkeypatch.setattr(CrossAttention, "text_kv", lambda self, s: calls.append(1) or original(self, s))
    model = tiny_model(conditioning="text", text_dim=16)
    stats = GenerationStats()
    generate_video(model, 1 + 5 * 2, first_frames=torch.zeros(1, 3, 1, 8, 8, dtype=torch.float64),
                   prompt=random_text(1, 4, 16), guidance=2.0, steps=3, stats=stats)
    assert stats.denoise_calls == 15
    assert len(calls) == 2 * model.config.depth  # conditional + unconditional branch, each once per block


def test_a_row_view_copies_nothing_up_front_and_stages_what_the_whole_cache_would():
    """Step caching runs a denoising step on the rows that are due: their view of the cache owns no
    K/V (it used to copy every block's buffers for those rows on every partial step)."""
    model = tiny_model(prefix_enhance=True)
    cache = model.new_cache(batch=3)
    with torch.no_grad():
        model.forward_cached(torch.randn(3, 3, 1, 8, 8, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64),
                             cache, write=True)
    k_new = torch.randn(3, cache.tokens, cache.heads, 2, cache.head_dim, dtype=torch.float64)
    v_new = torch.randn_like(k_new)
    for rows in ([0, 2], [1, 2]):
        view = cache.rows(rows)
        assert view.nbytes == 0 and view.batch == 2
        k, v = view.stage(1, k_new[rows], v_new[rows])
        n = cache.window_len
        assert torch.equal(k[:, :, :, :n], cache.k[1][rows, :, :, :n]) and torch.equal(k[:, :, :, n:], k_new[rows])
        assert torch.equal(v[:, :, :, n:], v_new[rows])
        assert torch.equal(view.prefix(0)[0], cache.prefix(0)[0][rows])
    contiguous = cache.rows([1, 2]).stage(0, k_new[1:], v_new[1:])[0]
    assert contiguous.untyped_storage().data_ptr() == cache.k[0].untyped_storage().data_ptr()  # a view
    with pytest.raises(RuntimeError, match="only read"):
        cache.rows([0]).commit(0, 2)


@pytest.mark.parametrize("prefix_enhance", [False, True])
def test_gradients_flow_through_the_cache_across_chunks_and_evictions(prefix_enhance):
    """A rollout under autograd: 5 chunks of 2 frames through a 5-frame window (evictions from the
    third chunk on), the loss on every chunk's prediction, the write passes recorded too. Its
    parameter gradients equal those of the no-cache reference (the masked full-sequence forward over
    the same frames), so the out-of-place cache writes lose no path and add none."""
    model = tiny_model(prefix_enhance=prefix_enhance, conditioning="class", num_classes=3)
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    frames = torch.randn(2, 3, 1 + 5 * 2, 8, 8, generator=g, dtype=torch.float64)  # clean context frames
    noisy = torch.randn(2, 3, 5 * 2, 8, 8, generator=g, dtype=torch.float64)
    t = torch.full((2, 2), 400.0, dtype=torch.float64)
    cond = lambda: model.condition(2, labels=torch.tensor([0, 2]))  # noqa: E731

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    cache, c, loss = model.new_cache(2), cond(), 0.0
    model.forward_cached(frames[:, :, :1], torch.zeros(2, 1, dtype=torch.float64), cache, c, write=True)
    for k in range(5):
        x = noisy[:, :, 2 * k:2 * k + 2]
        loss = loss + (model.forward_cached(x, t, cache, c) ** 2).mean()
        model.forward_cached(frames[:, :, 1 + 2 * k:3 + 2 * k], torch.zeros(2, 2, dtype=torch.float64), cache, c,
                             write=True)
    assert cache.frames_written == 11 > cfg.max_context_frames
    cached = grads(loss)

    c, loss = cond(), 0.0
    for k in range(5):
        n = 1 + 2 * k
        full = torch.cat([frames[:, :, :n], noisy[:, :, 2 * k:2 * k + 2]], dim=2)
        tt = torch.cat([torch.zeros(2, n, dtype=torch.float64), t], dim=1)
        loss = loss + (model(full, tt, c)[:, :, n:] ** 2).mean()
    reference = grads(loss)
    assert cached.keys() == reference.keys() and len(cached) > 10
    for name, gr in reference.items():
        assert (cached[name] - gr).abs().max().item() <= 1e-10 * max(1.0, gr.abs().max().item()), name
