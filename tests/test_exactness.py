"""Cache sharing is exact: `shared` generation equals the full-sequence oracle (docs/CONCEPTS.md §7)."""

import pytest
import torch

from ca2vdm.generate import generate, generate_video

from conftest import random_text, tiny_model


def _kwargs(model, batch=2, guidance=3.0, negative=True, dtype=torch.float64):
    cfg = model.config
    kw = dict(steps=2, guidance=guidance, seed=[3, 11][:batch])
    if cfg.prefix_frames:
        g = torch.Generator().manual_seed(5)
        kw["first_frames"] = torch.randn(batch, cfg.in_channels, cfg.prefix_frames, *cfg.frame_size,
                                         generator=g).to(dtype)
    if cfg.conditioning == "text":
        kw["prompt"] = random_text(batch, 6, cfg.text_dim, dtype, seed=1)
        if negative:
            kw["negative_prompt"] = random_text(batch, 3, cfg.text_dim, dtype, seed=2, ragged=False)
    if cfg.conditioning == "class":
        kw["labels"] = torch.tensor([1, 4][:batch])
    return kw


def _slides(model, num_frames):
    """How many generated chunks saw a window that had already slid (frames evicted)."""
    lay = model.layout
    chunks = range(1, lay.chunk_of(num_frames - 1) + 1)
    return sum(1 for k in chunks if (lay.window(k) or [0])[0] > 0)


@pytest.mark.parametrize("positions", ["cyclic", "rope"])
@pytest.mark.parametrize("objective", ["flow", "eps", "flow-sample"])
@pytest.mark.parametrize("prefix_frames", [0, 1])
def test_shared_equals_oracle_float64(positions, objective, prefix_frames):
    """7 chunks, >= 3 window slides, batch 2 with different prompts and seeds, text + guidance +
    negative prompt, prefix enhancement, both samplers (and x0 prediction with the pooled prompt in
    adaLN, as the default model), both position modes, prefix 0 and 1."""
    objective, _, prediction = objective.partition("-")
    model = tiny_model(positions=positions, objective=objective, prefix_frames=prefix_frames,
                       conditioning="text", text_dim=16, prefix_enhance=True, prediction=prediction or "native",
                       pooled_text=bool(prediction))
    n = prefix_frames + 7 * model.config.chunk_frames
    assert _slides(model, n) >= 3
    kw = _kwargs(model)
    shared = generate_video(model, n, mode="shared", **kw)
    oracle = generate_video(model, n, mode="recompute-full", **kw)
    assert shared.shape == (2, 3, n, 8, 8)
    scale = oracle.abs().max().item()
    assert (shared - oracle).abs().max().item() <= 1e-9 * max(1.0, scale)
    # The two samples really differ (different prompts and seeds), and the video is not trivial.
    assert (shared[0] - shared[1]).abs().max() > 1e-2


@pytest.mark.parametrize("chunk,context,prefix", [(3, 7, 1), (2, 3, 2), (4, 4, 0)])
def test_shared_equals_oracle_wrapping_rings(chunk, context, prefix):
    """Layouts where writes wrap around the ring end and P_max is not a multiple of l."""
    model = tiny_model(chunk_frames=chunk, max_context_frames=context, prefix_frames=prefix,
                       conditioning="class", num_classes=5, prefix_enhance=True)
    n = prefix + 8 * chunk
    assert _slides(model, n) >= 3
    kw = _kwargs(model)
    kw.pop("negative_prompt", None)
    shared = generate_video(model, n, mode="shared", **kw)
    oracle = generate_video(model, n, mode="recompute-full", **kw)
    assert (shared - oracle).abs().max().item() <= 1e-9 * max(1.0, oracle.abs().max().item())


def test_recompute_window_equals_shared_until_first_eviction():
    """OS-Ext sees the same frames as long as nothing has been evicted, then departs (by design)."""
    model = tiny_model(conditioning="text", text_dim=16)
    kw = _kwargs(model, guidance=1.0, negative=False)
    chunks_shared = list(generate(model, 1 + 7 * 2, mode="shared", **kw))
    chunks_window = list(generate(model, 1 + 7 * 2, mode="recompute-window", **kw))
    lay = model.layout
    for k, (a, b) in enumerate(zip(chunks_shared, chunks_window)):
        if k == 0 or (lay.window(k) or [0])[0] == 0:  # nothing evicted yet: both see every earlier frame
            assert (a - b).abs().max().item() <= 1e-9, k
    assert (chunks_shared[-1] - chunks_window[-1]).abs().max() > 1e-6


def test_layer_by_layer_full_forward_equals_incremental_cache():
    """Every block's output over a clean clip: one masked forward == chunk-by-chunk cached writes."""
    for positions in ("cyclic", "rope"):
        model = tiny_model(positions=positions, conditioning="text", text_dim=16, prefix_enhance=True)
        cfg = model.config
        n = cfg.prefix_frames + 8 * cfg.chunk_frames
        x = torch.randn(2, 3, n, 8, 8, dtype=torch.float64)
        t = torch.zeros(2, n, dtype=torch.float64)
        cond = model.condition(2, random_text(2, 6, 16))
        _, full = model(x, t, cond, return_hidden=True)
        cache = model.new_cache(2)
        pieces = [[] for _ in range(cfg.depth)]
        for first, end in model.layout.chunks(0, n):
            _, hidden = model.forward_cached(x[:, :, first:end], t[:, first:end], cache, cond,
                                             write=True, return_hidden=True)
            for i, h in enumerate(hidden):
                pieces[i].append(h)
        assert cache.frames_written == n and cache.window_len == cfg.max_context_frames
        for i in range(cfg.depth):
            assert (torch.cat(pieces[i], dim=1) - full[i]).abs().max().item() <= 1e-12


@pytest.mark.parametrize("positions", ["cyclic", "rope"])
def test_single_forward_float32_agrees(positions):
    """fp32: one denoising call against the cache == the masked full forward on identical inputs."""
    model = tiny_model(dtype=torch.float32, positions=positions, conditioning="text", text_dim=16,
                       prefix_enhance=True)
    cfg = model.config
    hist = cfg.prefix_frames + 6 * cfg.chunk_frames  # several evictions already happened
    history = torch.randn(2, 3, hist, 8, 8)
    cond = model.condition(2, random_text(2, 6, 16, torch.float32))
    cache = model.new_cache(2)
    with torch.no_grad():
        for first, end in model.layout.chunks(0, hist):
            model.forward_cached(history[:, :, first:end], torch.zeros(2, end - first), cache, cond, write=True)
        x = torch.randn(2, 3, cfg.chunk_frames, 8, 8)
        t = torch.full((2, cfg.chunk_frames), 637.0)
        cached = model.forward_cached(x, t, cache, cond)
        full = model(torch.cat([history, x], 2), torch.cat([torch.zeros(2, hist), t], 1), cond)[:, :, hist:]
    assert (cached - full).abs().max().item() <= 1e-5


def test_bf16_autocast_on_cpu_runs_close_to_fp32():
    model = tiny_model(dtype=torch.float32, conditioning="text", text_dim=16)
    kw = _kwargs(model, batch=1, guidance=2.0, dtype=torch.float32)
    ref = generate_video(model, 9, **kw)
    amp = generate_video(model, 9, autocast=torch.bfloat16, **kw)
    assert amp.dtype == torch.float32 and torch.isfinite(amp).all()
    assert (amp - ref).abs().max().item() < 0.1 * ref.abs().max().item()
    oracle = generate_video(model, 9, autocast=torch.bfloat16, mode="recompute-full", **kw)
    assert (amp - oracle).abs().max().item() < 0.1 * ref.abs().max().item()


def test_under_autocast_the_cache_is_kept_in_the_compute_dtype():
    """K/V are stored as autocast computes them (bf16), so no denoising step casts the window; an
    explicit cache_dtype still wins."""
    from ca2vdm import StreamSession

    model = tiny_model(dtype=torch.float32, conditioning="text", text_dim=16, prefix_enhance=True)
    kw = _kwargs(model, batch=1, guidance=2.0, dtype=torch.float32)
    session = StreamSession(model, autocast=torch.bfloat16, **kw)
    session.next_chunk()
    session.next_chunk()
    cache = session.engine.cache
    assert cache.dtype == torch.bfloat16 and all(t.dtype == torch.bfloat16 for t in cache.k + cache.v + cache.pk)
    assert StreamSession(model, **kw).engine.cache.dtype == torch.float32
    assert StreamSession(model, autocast=torch.bfloat16, cache_dtype=torch.float32, **kw).engine.cache.dtype \
        == torch.float32


@pytest.mark.parametrize("positions", ["cyclic", "rope"])
@pytest.mark.parametrize("prefix_frames", [0, 1, 2])
def test_all_chunks_layout_equals_per_chunk_forward(positions, prefix_frames):
    """The teacher-forcing layout [clean || noisy copies]: each noisy chunk's prediction equals the
    forward over [clean frames before it || that noisy chunk] (what cached inference computes)."""
    model = tiny_model(positions=positions, prefix_frames=prefix_frames, max_context_frames=5,
                       conditioning="text", text_dim=16, prefix_enhance=True)
    cfg, p = model.config, prefix_frames
    n = p + 6 * cfg.chunk_frames
    clean = torch.randn(2, 3, n, 8, 8, dtype=torch.float64)
    noisy = torch.randn(2, 3, n - p, 8, 8, dtype=torch.float64)
    t_noisy = torch.rand(2, n - p, dtype=torch.float64) * 1000
    cond = model.condition(2, random_text(2, 5, 16))
    out = model.forward_all_chunks(clean, noisy, t_noisy, cond)
    for first, end in model.layout.chunks(p, n):
        x = torch.cat([clean[:, :, :first], noisy[:, :, first - p:end - p]], 2)
        t = torch.cat([torch.zeros(2, first, dtype=torch.float64), t_noisy[:, first - p:end - p]], 1)
        ref = model(x, t, cond)[:, :, first:]
        assert (ref - out[:, :, first - p:end - p]).abs().max().item() <= 1e-12
