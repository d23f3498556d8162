"""A stream: one generated video's state between chunks, in one object (``StreamSession``).

The autoregressive loop (Ca2-VDM, Algorithm 1 in spirit), one ``next_chunk`` call per chunk::

    cache <- empty;  write(given first frames)                      # chunk 0, clean (sigma = 0)
    for chunk k = 1, 2, ...:
        x <- noise(seed, sample, k)
        for each sampling step i:  x <- step(x, model(x, t_i | cache))   # cache only read
                                   # (a step cache may skip the block stack and reuse a residual)
        write(x)                                 # one clean pass, K/V enqueued (not after the last chunk)
        return x                                 # the session keeps no reference to it

A session owns everything that loop carries from one chunk to the next: the model it reads (never
changes), the context (KV cache or frame history), the prepared conditioning, the per-sample seeds,
the sampler, the step-cache state and the chunk counter. Nothing of a stream lives on the model, so
any number of sessions over one model may run interleaved, each computing what it would alone.

Modes (``MODES``), over the same weights:

* ``shared`` — Ca2-VDM: denoising steps read the KV cache, one clean write pass per chunk.
* ``recompute-full`` — the exact oracle: no cache; each step runs the full-sequence masked forward
  over every frame so far. Same numbers as ``shared`` (to ~1e-9 in float64), quadratic cost.
* ``recompute-window`` — the OS-Ext baseline: each step runs [last <= P_max frames || chunk] from
  scratch; its oldest frames forget what they saw before, so it departs from ``shared`` after
  the first eviction, by design.

Noise: one generator per (seed, sample, chunk, stream) — stream 0 the chunk's starting noise, 1
context noise, 2 + i the few-step re-noising after step i — drawn in float32 on the CPU and cast,
so every mode, device and dtype sees the same numbers. Memory in ``shared`` mode is flat in the number of
frames: nothing but the fixed-size cache survives a chunk.
"""

import contextlib
import time
from dataclasses import dataclass, field

import torch

from .conditioning import Condition, Text
from .diffusion import mix_seed
from .model import CausalVideoDiT
from .stepcache import StepCache, StepCacheConfig

MODES = ("shared", "recompute-full", "recompute-window")


@dataclass
class GenerationStats:
    """Counters filled in while a stream runs (pass one to ``StreamSession`` or ``generate``)."""

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


# --------------------------------------------------------------------------------------------
# Context engines: what a denoising step reads, and how a finished chunk joins the context
# --------------------------------------------------------------------------------------------
class SharedCache:
    """Ca2-VDM: a KV-cache queue written once per chunk, read by every denoising step."""

    def __init__(self, model: CausalVideoDiT, batch: int, cond: Condition, cache_dtype=None):
        self.model, self.cond = model, cond
        self.cache = model.new_cache(batch, cache_dtype)

    def denoise(self, x, t, step_cache: StepCache | None = None, x0: bool = False):
        if step_cache is not None:
            return step_cache.forward(self.model, x, t, self.cache, self.cond, x0)
        return self.model.forward_cached(x, t, self.cache, self.cond, x0=x0)

    def append(self, frames):
        t = frames.new_zeros(frames.shape[0], frames.shape[2], dtype=torch.float64)
        self.model.forward_cached(frames, t, self.cache, self.cond, write=True)

    @property
    def nbytes(self):
        return self.cache.nbytes


class RecomputeFull:
    """The oracle: full-sequence masked forward over all frames so far at every step."""

    def __init__(self, model: CausalVideoDiT, batch: int, cond: Condition, cache_dtype=None):
        self.model, self.cond = model, cond
        self.history = None  # (B, C, n, H, W) clean context frames
        self.start = 0       # absolute index of history[:, :, 0]

    def denoise(self, x, t, step_cache=None, x0: bool = False):
        q = x.shape[2]
        if self.history is None:
            return self.model(x, t, self.cond, start=self.start, x0=x0)
        n = self.history.shape[2]
        full = torch.cat([self.history, x], dim=2)
        tt = torch.cat([t.new_zeros(t.shape[0], n), t], dim=1)
        return self.model(full, tt, self.cond, start=self.start, x0=x0)[:, :, n:n + q]

    def append(self, frames):
        self.history = frames if self.history is None else torch.cat([self.history, frames], dim=2)

    nbytes = 0


class RecomputeWindow(RecomputeFull):
    """OS-Ext: [last <= P_max frames || noisy chunk] recomputed from scratch at every step."""

    def append(self, frames):
        super().append(frames)
        drop = max(0, self.history.shape[2] - self.model.config.max_context_frames)
        if drop:
            self.history = self.history[:, :, drop:].contiguous()
            self.start += drop


ENGINES = {"shared": SharedCache, "recompute-full": RecomputeFull, "recompute-window": RecomputeWindow}


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


# --------------------------------------------------------------------------------------------
# The session
# --------------------------------------------------------------------------------------------
class StreamSession:
    """One stream of B videos generated chunk by chunk: ``next_chunk()`` returns the next chunk.

    The first call returns the given first frames (chunk 0) when the model takes them, after
    writing them into the context; every later call denoises one chunk of ``chunk_frames`` frames
    (B, C, l, H, W), writes it into the context for its successors and returns it.

    first_frames: (B, C, prefix_frames, H, W), required iff ``config.prefix_frames`` > 0.
    prompt / negative_prompt: ``Text`` token states (text models). labels: (B,) ints (class models).
    steps: sampling steps per chunk (default 10), on the objective's schedule. levels: instead, an
    explicit list of noise levels 1 = sigma_1 > ... > sigma_K (few-step students): at each level the
    x0 prediction is re-noised to the next with noise from a generator per (seed, sample, chunk,
    step), and the chunk is the last x0 (``diffusion.FewStepSampler``). guidance: classifier-free guidance scale; 1 disables the
    unconditional branch. seed: an int (sample b uses seed + b) or one int per sample.
    mode: one of ``MODES``. context_noise: noise augmentation of context frames as they enter the
    context, in the schedule's units (sigma for flow, timestep for eps); the model is still told t = 0.
    autocast: e.g. torch.bfloat16. cache_dtype: dtype of the KV cache; default: the compute dtype
    (the autocast dtype under autocast, so K/V are stored as computed and never cast per step; else
    the model's).
    step_cache: a step-caching policy (spec string, ``StepCacheConfig``, or a ``StepCache`` whose
    counters the caller wants to read), ``shared`` mode only; this session's own state.
    stats: a ``GenerationStats`` to fill in (default: a new one, ``session.stats``).
    """

    def __init__(self, model: CausalVideoDiT, first_frames: torch.Tensor | None = None, prompt: Text | None = None,
                 negative_prompt: Text | None = None, labels=None, steps: int | None = None, guidance: float = 1.0,
                 seed: int | list[int] = 0, mode: str = "shared", batch: int | None = None,
                 context_noise: float = 0.0, cache_dtype: torch.dtype | None = None,
                 autocast: torch.dtype | None = None, step_cache: "str | StepCacheConfig | StepCache | None" = None,
                 stats: GenerationStats | None = None, levels: list[float] | None = None):
        cfg = model.config
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if levels is not None and steps is not None and steps != len(levels):
            raise ValueError(f"steps={steps} contradicts the {len(levels)} noise levels given; give one of them")
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        B = _batch_size(first_frames, prompt, labels, seed, batch)
        p = cfg.prefix_frames
        if p:
            expected = (B, cfg.in_channels, p, *cfg.frame_size)
            if first_frames is None or tuple(first_frames.shape) != expected:
                got = None if first_frames is None else tuple(first_frames.shape)
                raise ValueError(f"this model starts from {p} given frame(s): first_frames must be {expected}, got {got}")
        elif first_frames is not None:
            raise ValueError("this model has prefix_frames=0 (a prompt alone starts the video); do not pass first_frames")
        if step_cache is not None and mode != "shared":
            raise ValueError(f"step caching runs inside the cached loop: use mode='shared' (got {mode!r}), "
                             "or no step cache")
        if negative_prompt is not None and cfg.conditioning != "text":
            raise ValueError("a negative prompt needs a text-conditioned model")
        self.guided = guidance != 1.0
        if self.guided and cfg.conditioning == "none":
            raise ValueError("classifier-free guidance needs a conditioned model (conditioning='class' or 'text')")

        self.model, self.batch, self.guidance, self.mode = model, B, guidance, mode
        self.seeds = [seed + b for b in range(B)] if isinstance(seed, int) else [int(s) for s in seed]
        self.context_noise, self.autocast = context_noise, autocast
        self.rows = 2 * B if self.guided else B  # batch rows of every network call
        cond = model.condition(B, prompt, labels)
        if self.guided:
            cond = Condition.cat(cond, model.unconditional(B, negative_prompt))
        self.cond = cond
        self.engine = ENGINES[mode](model, self.rows, cond, cache_dtype or autocast or model.dtype)
        if levels is not None:
            self.sampler = model.diffusion.few_step_sampler(levels)
        else:
            self.sampler = model.diffusion.sampler(10 if steps is None else steps)
        if step_cache is not None and not isinstance(step_cache, StepCache):
            step_cache = StepCache(step_cache, cfg.depth)
        self.step_cache = step_cache
        self.stats = stats if stats is not None else GenerationStats()
        self.stats.cache_bytes = self.engine.nbytes
        self.chunk = 0 if p else 1  # index of the chunk the next call returns
        self.ended = False          # the last chunk was not written: nothing can follow it
        self._first = first_frames
        self._t0 = time.perf_counter()

    @contextlib.contextmanager
    def _network(self, grad: bool = False):
        """no_grad (and autocast) around each network call; ``grad``: autograd records it instead."""
        dev = self.model.device
        amp = torch.autocast(dev.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with torch.set_grad_enabled(grad), amp:
            yield

    def _append(self, frames: torch.Tensor, chunk: int) -> None:
        """Frames join the context: optionally noise-augmented, doubled for guidance, then written."""
        model, B = self.model, self.batch
        if self.context_noise:
            noise = chunk_noise(self.seeds, chunk, tuple(frames.shape[1:]), stream=1, dtype=model.dtype,
                                device=model.device)
            level = torch.full((B, frames.shape[2]), self.context_noise, dtype=torch.float64, device=model.device)
            frames = model.diffusion.add_noise(frames, noise, level)
        frames = frames.detach()  # a rollout's gradient never crosses into later chunks
        with self._network():
            self.engine.append(torch.cat([frames, frames]) if self.guided else frames)
        self.stats.write_calls += 1

    def _denoise(self, k: int, exit_step: int | None = None, grad: bool = False,
                 trajectory: list | None = None) -> torch.Tensor:
        """Chunk k from its noise through the sampling steps (the context is only read). With
        ``exit_step`` (few-step levels) the chunk is the x0 predicted at that step, and with ``grad``
        that one step runs under autograd (the Self-Forcing rollout). ``trajectory``: a list that
        receives the state before every step and, last, the chunk."""
        model, cfg, sampler, sc = self.model, self.model.config, self.sampler, self.step_cache
        l, rows = cfg.chunk_frames, self.rows
        x = chunk_noise(self.seeds, k, (cfg.in_channels, l, *cfg.frame_size), dtype=model.dtype, device=model.device)
        # noise streams of a chunk: 0 its starting noise, 1 context noise, 2 + i re-noising after step i
        if sc is not None:  # the reuse state starts afresh in every chunk
            sc.begin_chunk(len(sampler), rows)
            before = sc.computed
        x0 = sampler.predicts_x0
        shape = (cfg.in_channels, l, *cfg.frame_size)
        steps = len(sampler) if exit_step is None else exit_step + 1
        if x0 and steps > 1:  # every re-noising draw of the chunk, drawn on the host, sent in one copy
            renoise = torch.stack([chunk_noise(self.seeds, k, shape, stream=2 + i) for i in range(steps - 1)])
            renoise = renoise.to(device=model.device, dtype=model.dtype)
        for i, tv in enumerate(sampler.timesteps[:steps]):
            if trajectory is not None:
                trajectory.append(x)
            xin = torch.cat([x, x]) if self.guided else x
            t = torch.full((rows, l), tv, dtype=torch.float64, device=model.device)
            if sc is not None:
                sc.begin_step(i)
            with self._network(grad and i == steps - 1):
                pred = self.engine.denoise(xin, t, sc, x0=x0).to(model.dtype)
            self.stats.denoise_calls += 1
            if self.guided:  # linear in the prediction: the same in velocity, noise or x0 space
                cond_pred, uncond_pred = pred.chunk(2)
                pred = uncond_pred + self.guidance * (cond_pred - uncond_pred)
            if x0 and i == steps - 1:  # the exit: this x0 is the chunk
                x = pred
            elif x0:  # re-noise the x0 prediction to the next level with this step's own noise
                x = sampler.step(x, pred, i, renoise[i])
            else:
                x = sampler.step(x, pred, i)
        if trajectory is not None:
            trajectory.append(x)
        row_steps = rows * steps
        self.stats.steps_total += row_steps
        if sc is not None:
            sc.end_chunk()  # the write pass always runs the whole network
            row_steps = sc.computed - before
        self.stats.steps_computed += row_steps
        return x

    def next_chunk(self, last: bool = False, frames: int | None = None, exit_step: int | None = None,
                   grad: bool = False, trajectory: list | None = None) -> torch.Tensor:
        """The next chunk (B, C, f, H, W): chunk 0 (the given first frames) first when the model
        takes them, then one generated chunk per call.

        last: skip the write pass (nothing will follow; saves one network call at a video's end),
        after which the session has ended. frames: keep only the first ``frames`` of the chunk (a
        video's trimmed end; counted in ``stats.frames``). The session keeps no reference to what
        it returns.

        exit_step, grad — the Self-Forcing rollout (few-step levels only): the chunk is the x0
        predicted at step ``exit_step`` (earlier steps as usual, later ones skipped), and with
        ``grad`` that step alone is recorded by autograd; the chunk is then written into the cache
        detached, so gradients never cross chunks. At the last step it is exactly ``generate``'s chunk.

        trajectory: a list that receives the sampling trajectory of a generated chunk, the state
        before each step (B, C, l, H, W) and then the chunk itself (the teacher's ODE pairs).
        """
        if exit_step is not None:
            if not self.sampler.predicts_x0:
                raise ValueError("exit_step needs few-step levels (the chunk is an x0 prediction)")
            if not 0 <= exit_step < len(self.sampler):
                raise ValueError(f"exit_step must be in [0, {len(self.sampler)}), got {exit_step}")
        if grad and (exit_step is None or self.step_cache is not None):
            raise ValueError("grad=True needs an exit_step and no step cache (one differentiable step per chunk)")
        if self.ended:
            raise RuntimeError("this stream has ended: its last chunk was not written into the context")
        l = self.model.config.chunk_frames
        keep = l if frames is None else frames
        if not 1 <= keep <= l or (keep < l and not last):
            raise ValueError(f"frames={frames}: a chunk keeps 1 to {l} frames, fewer only in the last one (last=True)")
        stats, k = self.stats, self.chunk
        if k == 0:  # the given frames: clean context, returned as given
            first = self._first.to(self.model.device, self.model.dtype)
            self._first = None
            self._append(first, 0)
            self.chunk = 1
            return first.clone()
        tc = time.perf_counter()
        x = self._denoise(k, exit_step, grad, trajectory)
        if last:
            self.ended = True
        else:
            self._append(x, k)
        self.chunk += 1
        stats.chunks += 1
        stats.frames += keep
        stats.chunk_seconds.append(time.perf_counter() - tc)
        if stats.seconds_to_first_chunk is None:
            stats.seconds_to_first_chunk = time.perf_counter() - self._t0
        return x[:, :, :keep] if keep < l else x
