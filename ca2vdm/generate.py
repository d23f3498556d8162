"""Autoregressive chunk-by-chunk generation, streamed, in three modes over the same weights.

The loop (Ca2-VDM, Algorithm 1 in spirit)::

    cache <- empty;  write(given first frames)                      # chunk 0, clean (sigma = 0)
    for chunk k = 1, 2, ...:
        x <- noise(seed, sample, k)
        for each sampling step i:  x <- step(x, model(x, t_i | cache))   # cache only read
                                   # (a step cache may skip the block stack and reuse a residual)
        write(x)                                 # one clean pass, K/V enqueued (skipped for the last chunk)
        yield x                                  # the generator keeps no reference to it

Modes (``MODES``):

* ``shared`` — Ca2-VDM: denoising steps read the KV cache, one clean write pass per chunk.
* ``recompute-full`` — the exact oracle: no cache; each step runs the full-sequence masked forward
  over every frame so far. Same numbers as ``shared`` (to ~1e-9 in float64), quadratic cost.
* ``recompute-window`` — the OS-Ext baseline: each step runs [last <= P_max frames || chunk] from
  scratch; its oldest frames forget what they saw before, so it departs from ``shared`` after
  the first eviction, by design.

Noise: one generator per (seed, sample, chunk), drawn in float32 on the CPU and cast, so every
mode, device and dtype sees the same numbers. Memory in ``shared`` mode is flat in the number of
frames: nothing but the fixed-size cache survives a chunk, and yielded chunks are not kept.
"""

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch

from .diffusion import mix_seed
from .model import CausalVideoDiT, Condition, Text

MODES = ("shared", "recompute-full", "recompute-window")


@dataclass
class GenerationStats:
    """Counters filled in while a generation runs (pass one to ``generate`` to read them)."""

    chunks: int = 0
    frames: int = 0
    denoise_calls: int = 0   # network forwards for denoising (a guided step counts once: 2B batch)
    write_calls: int = 0     # clean write passes (shared mode) or history appends
    cache_bytes: int = 0
    steps_computed: int = 0  # denoising row-steps whose block stack ran (all of them without a step cache)
    steps_total: int = 0     # denoising row-steps (rows = videos, x2 with guidance)
    seconds_to_first_chunk: float | None = None
    chunk_seconds: list = field(default_factory=list)


def chunk_noise(seeds: list[int], chunk: int, shape: tuple, stream: int = 0, dtype=torch.float32,
                device=None) -> torch.Tensor:
    """Gaussian noise (B, *shape), sample b drawn from its own generator seeded by (seeds[b], chunk, stream)."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(mix_seed(s, chunk, stream))
        out.append(torch.randn(shape, generator=g, dtype=torch.float32))
    return torch.stack(out).to(device=device, dtype=dtype)


class _Shared:
    """Ca2-VDM: a KV-cache queue written once per chunk, read by every denoising step."""

    def __init__(self, model: CausalVideoDiT, batch: int, cond: Condition, cache_dtype):
        self.model, self.cond = model, cond
        self.cache = model.new_cache(batch, cache_dtype)

    def denoise(self, x, t):
        return self.model.forward_cached(x, t, self.cache, self.cond)

    def append(self, frames):
        t = frames.new_zeros(frames.shape[0], frames.shape[2], dtype=torch.float64)
        self.model.forward_cached(frames, t, self.cache, self.cond, write=True)

    @property
    def nbytes(self):
        return self.cache.nbytes


class _RecomputeFull:
    """The oracle: full-sequence masked forward over all frames so far at every step."""

    def __init__(self, model: CausalVideoDiT, batch: int, cond: Condition, cache_dtype=None):
        self.model, self.cond = model, cond
        self.history = None  # (B, C, n, H, W) clean context frames
        self.start = 0       # absolute index of history[:, :, 0]

    def denoise(self, x, t):
        q = x.shape[2]
        if self.history is None:
            return self.model(x, t, self.cond, start=self.start)
        n = self.history.shape[2]
        full = torch.cat([self.history, x], dim=2)
        tt = torch.cat([t.new_zeros(t.shape[0], n), t], dim=1)
        return self.model(full, tt, self.cond, start=self.start)[:, :, n:n + q]

    def append(self, frames):
        self.history = frames if self.history is None else torch.cat([self.history, frames], dim=2)

    nbytes = 0


class _RecomputeWindow(_RecomputeFull):
    """OS-Ext: [last <= P_max frames || noisy chunk] recomputed from scratch at every step."""

    def append(self, frames):
        super().append(frames)
        drop = max(0, self.history.shape[2] - self.model.config.max_context_frames)
        if drop:
            self.history = self.history[:, :, drop:].contiguous()
            self.start += drop


_ENGINES = {"shared": _Shared, "recompute-full": _RecomputeFull, "recompute-window": _RecomputeWindow}


def _batch_size(first_frames, prompt, labels, seed, batch):
    sizes = {}
    if first_frames is not None:
        sizes["first_frames"] = first_frames.shape[0]
    if prompt is not None:
        sizes["prompt"] = prompt.states.shape[0]
    if labels is not None:
        sizes["labels"] = torch.as_tensor(labels).reshape(-1).shape[0]
    if isinstance(seed, (list, tuple)):
        sizes["seed"] = len(seed)
    if batch is not None:
        sizes["batch"] = batch
    if len(set(sizes.values())) > 1:
        raise ValueError("batch sizes disagree: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
    return next(iter(sizes.values()), 1)


def generate(model: CausalVideoDiT, num_frames: int, first_frames: torch.Tensor | None = None,
             prompt: Text | None = None, negative_prompt: Text | None = None, labels=None,
             steps: int = 10, guidance: float = 1.0, seed: int | list[int] = 0, mode: str = "shared",
             batch: int | None = None, context_noise: float = 0.0, cache_dtype: torch.dtype | None = None,
             autocast: torch.dtype | None = None, stats: GenerationStats | None = None):
    """Generate a video chunk by chunk, yielding each chunk (B, C, f, H, W) as soon as it exists.

    The first yield is the given first frames (chunk 0) when the model takes them; every later
    yield is one generated chunk of ``chunk_frames`` frames, the last one trimmed so that the
    frames yielded add up to ``num_frames``. Unbounded: memory in ``shared`` mode does not grow.

    first_frames: (B, C, prefix_frames, H, W), required iff ``config.prefix_frames`` > 0.
    prompt / negative_prompt: ``Text`` token states (text models). labels: (B,) ints (class models).
    guidance: classifier-free guidance scale; 1 disables the unconditional branch.
    seed: an int (sample b uses seed + b) or one int per sample.
    mode: one of ``MODES``. context_noise: prefix noise augmentation of context frames, in the
    schedule's units (sigma for flow, timestep for eps); the model is still told t = 0.
    cache_dtype: dtype of the KV cache (default: the model's). autocast: e.g. torch.bfloat16.
    """
    cfg = model.config
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    p, l = cfg.prefix_frames, cfg.chunk_frames
    if num_frames <= p:
        raise ValueError(f"num_frames={num_frames} must exceed the {p} given first frame(s)")
    B = _batch_size(first_frames, prompt, labels, seed, batch)
    seeds = [seed + b for b in range(B)] if isinstance(seed, int) else [int(s) for s in seed]
    frame_shape = (cfg.in_channels, l, *cfg.frame_size)
    if p:
        expected = (B, cfg.in_channels, p, *cfg.frame_size)
        if first_frames is None or tuple(first_frames.shape) != expected:
            got = None if first_frames is None else tuple(first_frames.shape)
            raise ValueError(f"this model starts from {p} given frame(s): first_frames must be {expected}, got {got}")
    elif first_frames is not None:
        raise ValueError("this model has prefix_frames=0 (a prompt alone starts the video); do not pass first_frames")
    step_cache = model.step_cache
    if step_cache is not None and mode != "shared":
        raise ValueError(f"step caching runs inside the cached loop: use mode='shared' (got {mode!r}), "
                         "or call model.disable_step_cache()")
    if negative_prompt is not None and cfg.conditioning != "text":
        raise ValueError("a negative prompt needs a text-conditioned model")

    guided = guidance != 1.0
    if guided and cfg.conditioning == "none":
        raise ValueError("classifier-free guidance needs a conditioned model (conditioning='class' or 'text')")
    cond = model.condition(B, prompt, labels)
    if guided:
        cond = model.cat_conditions(cond, model.unconditional(B, negative_prompt))
    mult = 2 if guided else 1
    engine = _ENGINES[mode](model, B * mult, cond, cache_dtype)
    sampler = model.diffusion.sampler(steps)
    dev, dt = model.device, model.dtype

    @contextlib.contextmanager
    def amp():
        """no_grad (and autocast) around each network call, never across a yield: a decorator
        on this generator would hold the last yielded chunk alive while suspended."""
        with torch.no_grad(), (torch.autocast(dev.type, dtype=autocast) if autocast else contextlib.nullcontext()):
            yield

    stats = stats if stats is not None else GenerationStats()
    stats.cache_bytes = engine.nbytes
    t0 = time.perf_counter()

    def context(frames, chunk):
        """Frames as they enter the history: optionally noise-augmented, doubled for guidance."""
        if context_noise:
            noise = chunk_noise(seeds, chunk, tuple(frames.shape[1:]), stream=1, dtype=dt, device=dev)
            level = torch.full((B, frames.shape[2]), context_noise, dtype=torch.float64, device=dev)
            frames = model.diffusion.add_noise(frames, noise, level)
        return torch.cat([frames] * mult) if guided else frames

    n_chunks = math.ceil((num_frames - p) / l)
    if p:
        first = first_frames.to(dev, dt)
        with amp():
            engine.append(context(first, 0))
        stats.write_calls += 1
        out = [first.clone()]
        del first
        yield out.pop()  # the generator keeps no reference to what it yields
    for k in range(1, n_chunks + 1):
        tc = time.perf_counter()
        x = chunk_noise(seeds, k, frame_shape, dtype=dt, device=dev)
        if step_cache is not None:  # the reuse state starts afresh in every chunk
            step_cache.begin_chunk(len(sampler.timesteps), B * mult)
            before = step_cache.computed
        for i, tv in enumerate(sampler.timesteps):
            xin = torch.cat([x, x]) if guided else x
            t = torch.full((B * mult, l), tv, dtype=torch.float64, device=dev)
            if step_cache is not None:
                step_cache.begin_step(i)
            with amp():
                pred = engine.denoise(xin, t).to(dt)
            stats.denoise_calls += 1
            if guided:
                cond_pred, uncond_pred = pred.chunk(2)
                pred = uncond_pred + guidance * (cond_pred - uncond_pred)
            x = sampler.step(x, pred, i)
        row_steps = B * mult * len(sampler.timesteps)
        stats.steps_total += row_steps
        if step_cache is not None:
            step_cache.end_chunk()  # the write pass below always runs the whole network
            row_steps = step_cache.computed - before
        stats.steps_computed += row_steps
        if k < n_chunks:  # the last chunk has no successor to condition: no write pass
            with amp():
                engine.append(context(x, k))
            stats.write_calls += 1
        keep = min(l, num_frames - p - (k - 1) * l)
        out = [x[:, :, :keep] if keep < l else x]
        del x
        stats.chunks += 1
        stats.frames += keep
        stats.chunk_seconds.append(time.perf_counter() - tc)
        if stats.seconds_to_first_chunk is None:
            stats.seconds_to_first_chunk = time.perf_counter() - t0
        yield out.pop()


def generate_video(model: CausalVideoDiT, num_frames: int, **kwargs) -> torch.Tensor:
    """Run ``generate`` to the end and return the whole video (B, C, num_frames, H, W)."""
    return torch.cat(list(generate(model, num_frames, **kwargs)), dim=2)
