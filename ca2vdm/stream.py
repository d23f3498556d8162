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
import functools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .cache import CacheBatch
from .conditioning import Condition, Text, classifier_free_guidance
from .diffusion import mix_seed
from .backbone import Backbone
from .safefile import save_safetensors
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

    def __init__(self, model: Backbone, batch: int, cond: Condition, cache_dtype=None):
        self.model, self.cond = model, cond
        self.cache = model.new_cache(batch, cache_dtype)

    def denoise(self, x, t, step_cache: StepCache | None = None, x0: bool = False, modulation=None):
        if step_cache is not None:
            return step_cache.forward(self.model, x, t, self.cache, self.cond, x0, modulation)
        return self.model.forward_cached(x, t, self.cache, self.cond, x0=x0, modulation=modulation)

    def append(self, frames, t, modulation=None):
        self.model.forward_cached(frames, t, self.cache, self.cond, write=True, modulation=modulation)

    @property
    def nbytes(self):
        return self.cache.nbytes


class RecomputeFull:
    """The oracle: full-sequence masked forward over all frames so far at every step."""

    def __init__(self, model: Backbone, batch: int, cond: Condition, cache_dtype=None):
        self.model, self.cond = model, cond
        self.history = None  # (B, C, n, H, W) clean context frames
        self.start = 0       # absolute index of history[:, :, 0]

    def denoise(self, x, t, step_cache=None, x0: bool = False, modulation=None):
        q = x.shape[2]  # the times of the whole sequence change with every chunk: nothing to reuse
        if self.history is None:
            return self.model(x, t, self.cond, start=self.start, x0=x0)
        n = self.history.shape[2]
        full = torch.cat([self.history, x], dim=2)
        tt = torch.cat([t.new_zeros(t.shape[0], n), t], dim=1)
        return self.model(full, tt, self.cond, start=self.start, x0=x0)[:, :, n:n + q]

    def append(self, frames, t=None, modulation=None):
        self.history = frames if self.history is None else torch.cat([self.history, frames], dim=2)

    nbytes = 0


class RecomputeWindow(RecomputeFull):
    """OS-Ext: [last <= P_max frames || noisy chunk] recomputed from scratch at every step."""

    def append(self, frames, t=None, modulation=None):
        super().append(frames)
        drop = max(0, self.history.shape[2] - self.model.config.max_context_frames)
        if drop:
            self.history = self.history[:, :, drop:].contiguous()
            self.start += drop


ENGINES = {"shared": SharedCache, "recompute-full": RecomputeFull, "recompute-window": RecomputeWindow}


def batch_size_of(first_frames, prompt, labels, seed, batch) -> int:
    """The batch the given inputs imply (1 if none says); an error naming them when they disagree."""
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

    Steering a stream between chunks: ``set_prompt`` (switch the prompt, re-caching the window),
    ``extend`` (write given frames), ``next_chunk(source=, strength=)`` (video-to-video);
    ``save`` / ``StreamSession.load`` (stop and continue elsewhere); ``next_chunks`` runs several
    sessions as one batched forward. The session keeps the clean frames of the window it wrote
    (``kept``, the last P_max, from frame ``kept_start``; with sink frames, ``sink_kept`` holds the
    sink and ``kept`` the last P_max - s after it): the cache holds only K/V, and a re-cache needs
    the frames.
    """

    def __init__(self, model: Backbone, first_frames: torch.Tensor | None = None, prompt: Text | None = None,
                 negative_prompt: Text | None = None, labels=None, steps: int | None = None, guidance: float = 1.0,
                 seed: int | list[int] = 0, mode: str = "shared", batch: int | None = None,
                 context_noise: float = 0.0, cache_dtype: torch.dtype | None = None,
                 autocast: torch.dtype | None = None, step_cache: "str | StepCacheConfig | StepCache | None" = None,
                 stats: GenerationStats | None = None, levels: list[float] | None = None):
        cfg = model.config
        model.require_causal("chunk-by-chunk generation")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if levels is not None and steps is not None and steps != len(levels):
            raise ValueError(f"steps={steps} contradicts the {len(levels)} noise levels given; give one of them")
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        B = batch_size_of(first_frames, prompt, labels, seed, batch)
        p = cfg.prefix_frames
        if p:
            expected = (B, cfg.in_channels, p, *cfg.frame_size)
            if first_frames is None or tuple(first_frames.shape) != expected:
                got = None if first_frames is None else tuple(first_frames.shape)
                raise ValueError(f"this model starts from {p} given frame(s): first_frames must be {expected}, got {got}")
        elif first_frames is not None:
            raise ValueError("this model has prefix_frames=0 (a prompt alone starts the video); do not pass first_frames")
        if cfg.layout.sink_frames and mode == "recompute-window":
            raise ValueError("recompute-window recomputes the last P_max frames, not a window with sink frames; "
                             "use mode 'shared' or 'recompute-full'")
        if step_cache is not None and "step-cache" not in model.features:
            raise ValueError(f"step caching is not available for {type(model).__name__}; use no step cache")
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
        self.cache_dtype = cache_dtype or autocast or model.dtype
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.labels = None if labels is None else torch.as_tensor(labels).long().reshape(-1)
        self.rows = 2 * B if self.guided else B  # batch rows of every network call
        self._modulation = {}  # (time, rows, frames) -> (t tensor, model.modulation(t, cond)): see ``modulation``
        self.cond = self._condition()
        self.engine = ENGINES[mode](model, self.rows, self.cond, self.cache_dtype)
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
        self.kept = None            # (B, C, <= P_max, H, W): the last clean frames written, as written
        self.kept_start = 0         # absolute index of kept[:, :, 0]
        self.sink_kept = None       # (B, C, <= s, H, W): the sink frames as written (models with a sink)
        self._first = first_frames
        self._t0 = time.perf_counter()

    def _condition(self, prompt=None, labels=None, negative=None, guided=None) -> Condition:
        """The prepared conditioning of every row: the prompt's, then the guidance branch's (the
        session's own prompt, labels, negative prompt and guidance unless others are given)."""
        prompt = self.prompt if prompt is None else prompt
        labels = self.labels if labels is None else labels
        if self.guided if guided is None else guided:
            negative = self.negative_prompt if negative is None else negative
            return self.model.guided_condition(self.batch, prompt, labels, negative)
        return self.model.condition(self.batch, prompt, labels)

    @contextlib.contextmanager
    def _network(self, grad: bool = False):
        """no_grad (and autocast) around each network call; ``grad``: autograd records it instead."""
        dev = self.model.device
        amp = torch.autocast(dev.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with torch.set_grad_enabled(grad), amp:
            yield

    # -- the context ---------------------------------------------------------------------------
    def _context_frames(self, frames: torch.Tensor, chunk: int) -> torch.Tensor:
        """Frames as they join the context: optionally noise-augmented, detached (a rollout's gradient
        never crosses into later chunks), kept for re-caching, doubled for guidance."""
        model, B = self.model, self.batch
        if self.context_noise:
            noise = chunk_noise(self.seeds, chunk, tuple(frames.shape[1:]), stream=1, dtype=model.dtype,
                                device=model.device)
            level = torch.full((B, frames.shape[2]), self.context_noise, dtype=torch.float64, device=model.device)
            frames = model.diffusion.add_noise(frames, noise, level)
        frames = frames.detach()
        layout = model.config.layout
        keep, sink = frames, layout.sink_frames
        start = layout.chunk_start(chunk)
        if start < sink:  # the sink's frames stay for good; the window's others slide after them
            n = min(sink - start, frames.shape[2])
            self.sink_kept = frames[:, :, :n] if self.sink_kept is None else torch.cat([self.sink_kept, frames[:, :, :n]], 2)
            keep = frames[:, :, n:]
            self.kept_start = start + n  # no frame after the sink was kept before this chunk
        kept = keep if self.kept is None else torch.cat([self.kept, keep], dim=2)
        drop = max(0, kept.shape[2] - layout.recent_frames)
        self.kept, self.kept_start = kept[:, :, drop:], self.kept_start + drop
        return torch.cat([frames, frames]) if self.guided else frames

    def window_frames(self) -> tuple[torch.Tensor, list[int]]:
        """The kept clean frames of the window (B, C, n, H, W) and their absolute indices: the sink
        frames, then the most recent others (what a re-cache re-encodes)."""
        parts = [p for p in (self.sink_kept, self.kept) if p is not None and p.shape[2]]
        sinks = 0 if self.sink_kept is None else self.sink_kept.shape[2]
        idx = list(range(sinks)) + list(range(self.kept_start, self.kept_start + self.kept.shape[2]))
        return torch.cat(parts, dim=2), idx

    def _append(self, frames: torch.Tensor, chunk: int) -> None:
        """Frames join the context: one clean write pass (or a history append)."""
        rows = self._context_frames(frames, chunk)
        with self._network():
            t, mod = self.modulation(0.0, rows.shape[0], rows.shape[2])
            self.engine.append(rows, t, mod)
        self.stats.write_calls += 1

    def _check_open(self) -> None:
        if self.ended:
            raise RuntimeError("this stream has ended: its last chunk was not written into the context")

    def extend(self, frames: torch.Tensor) -> None:
        """Write given clean frames into the context as the stream's next frames, as if generated:
        continuing a real clip (any model), at chunk granularity. frames: (B, C, n * l, H, W), in the
        model's space (latents for a latent model). The given first frames of a model that takes
        them are written first. Nothing is returned; later chunks continue after these frames."""
        self._check_open()
        cfg, l = self.model.config, self.model.config.chunk_frames
        want = (self.batch, cfg.in_channels, *cfg.frame_size)
        if frames.dim() != 5 or (frames.shape[0], frames.shape[1], *frames.shape[3:]) != want:
            raise ValueError(f"frames must be (B, C, n*{l}, H, W) = ({want[0]}, {want[1]}, n*{l}, {want[2]}, "
                             f"{want[3]}), got {tuple(frames.shape)}")
        if frames.shape[2] == 0 or frames.shape[2] % l:
            raise ValueError(f"extend writes whole chunks of {l} frames; got {frames.shape[2]} frames")
        if self.chunk == 0:
            self.next_chunk()
        for piece in frames.to(self.model.device, self.model.dtype).split(l, dim=2):
            self._append(piece, self.chunk)
            self.chunk += 1

    def set_prompt(self, prompt: Text | None = None, recache: bool = True, negative_prompt: Text | None = None,
                   guidance: float | None = None, labels=None, sinks: str = "reencode") -> None:
        """Switch the conditioning between chunks (prompt switching, LongLive-style).

        The text K/V of cross-attention (and the pooled prompt) are replaced by ``prompt``'s (class
        models: ``labels``); None keeps the current one. With ``recache`` the window's K/V are
        recomputed from the kept frames (the last P_max clean frames) by one masked forward over
        them alone, from the first kept frame (which may sit mid-chunk), under the new conditioning:
        the stream then continues exactly as a recompute-full stream whose history starts at that
        frame. Without it the old K/V stay (shared mode only: the recompute modes hold no K/V).
        ``guidance`` changes the scale; turning guidance on, or a new ``negative_prompt``, re-caches
        the unconditional half in any case (it has no K/V of its own yet), and turning it off drops it.

        ``sinks`` (models with sink frames): ``"reencode"`` re-caches the sink frames under the new
        conditioning with the rest of the window; ``"keep"`` keeps the sink's K/V as they were (the old
        prompt's) and re-encodes the other window frames attending to it, as a stream that had the
        new prompt only after its sink. Before the sink is complete, or when guidance changes, the
        sink is re-encoded either way (there is no full sink of the right rows to keep).
        """
        self._check_open()
        model, cfg, B = self.model, self.model.config, self.batch
        if sinks not in ("reencode", "keep"):
            raise ValueError(f"sinks must be 'reencode' or 'keep', got {sinks!r}")
        if cfg.layout.sink_frames and self.mode != "shared" and self.kept is not None:
            raise ValueError("the recompute modes cannot re-cache a window with sink frames (its frames are not "
                             "consecutive); use mode 'shared'")
        if not recache and self.mode != "shared":
            raise ValueError(f"recache=False keeps the old K/V, which only the shared cache has (mode {self.mode!r})")
        if negative_prompt is not None and cfg.conditioning != "text":
            raise ValueError("a negative prompt needs a text-conditioned model")
        guidance = self.guidance if guidance is None else float(guidance)
        guided = guidance != 1.0
        if guided and cfg.conditioning == "none":
            raise ValueError("classifier-free guidance needs a conditioned model (conditioning='class' or 'text')")
        if labels is not None:
            labels = torch.as_tensor(labels).long().reshape(-1)
        cond = self._condition(prompt, labels, negative_prompt, guided)  # checks everything before anything changes
        was_guided, old_engine = self.guided, self.engine
        uncond_new = guided and (not was_guided or negative_prompt is not None)
        self.prompt = self.prompt if prompt is None else prompt
        self.labels = self.labels if labels is None else labels
        self.negative_prompt = self.negative_prompt if negative_prompt is None else negative_prompt
        self.guided, self.guidance, self.rows, self.cond = guided, guidance, 2 * B if guided else B, cond
        self._modulation = {}  # computed under the old conditioning
        if self.kept is None:  # nothing written yet: a fresh, empty context under the new conditioning
            self.engine = ENGINES[self.mode](model, self.rows, self.cond, self.cache_dtype)
        elif self.mode != "shared":  # the oracle: history cut at the first kept frame, new conditioning
            self.engine.cond = self.cond
            self.engine.history = torch.cat([self.kept, self.kept]) if guided else self.kept
            self.engine.start = self.kept_start
        elif recache or uncond_new or guided != was_guided:
            fresh = SharedCache(model, self.rows, self.cond, self.cache_dtype)
            if recache or uncond_new:
                frames, idx = self.window_frames()
                sink = fresh.cache.sink
                if (sinks == "keep" and sink and guided == was_guided and not uncond_new
                        and old_engine.cache.frames_written >= sink):
                    fresh.cache.keep_sinks(old_engine.cache)
                    frames, idx = frames[:, :, sink:], idx[sink:]
                frames = torch.cat([frames, frames]) if guided else frames
                if not idx:  # only the sink was written, and it is kept
                    fresh.cache.advance(sink)
                else:
                    with self._network():
                        model.fill_cache(frames, fresh.cache, self.cond, start=idx)
            else:
                fresh.cache.frames_written = old_engine.cache.frames_written
            if not recache:  # the conditional half keeps its old K/V
                fresh.cache.copy_rows(old_engine.cache, B)
            self.engine = fresh
        else:
            self.engine.cond = self.cond
        self.stats.cache_bytes = self.engine.nbytes

    # -- denoising -----------------------------------------------------------------------------
    def start_step(self, strength: float) -> int:
        """Video-to-video: the sampling step a source chunk enters at for ``strength`` s in (0, 1]:
        the first step whose input noise level (sigma for flow, sqrt(1 - abar) for eps) is <= s, the
        last step if none is. Step 0 starts from pure noise, ignoring the source (s = 1 is plain generation)."""
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        levels = [self.sampler.level(i) for i in range(len(self.sampler))]
        return next((i for i, s in enumerate(levels) if s <= strength + 1e-12), len(levels) - 1)

    def modulation(self, t: float, rows: int, frames: int) -> tuple[torch.Tensor, tuple | None]:
        """The (rows, frames) network-time tensor of time t and, outside autograd, the adaLN outputs
        the model computes from it under this session's conditioning (``Backbone.modulation``),
        computed once per (t, rows, frames) and kept by the session: its levels repeat in every chunk
        and its write pass is always t = 0, so after the first chunk no call computes them. The times
        are made on the device (no host-to-device copy). Under autograd (a rollout's exit step) the
        outputs are None: the network computes them, so that gradients reach the adaLN weights.

        The kept outputs are the session's own state: ``set_prompt`` drops them (a new conditioning),
        and they are computed from the weights of the first chunk, as the KV cache is: a model whose
        weights change mid-stream needs a new session."""
        key = (float(t), rows, frames)
        if key not in self._modulation:
            times = torch.full((rows, frames), key[0], dtype=torch.float64, device=self.model.device)
            self._modulation[key] = (times, None)
        times, mod = self._modulation[key]
        if torch.is_grad_enabled():
            return times, None
        if mod is None:
            mod = self.model.modulation(times, self.cond)
            self._modulation[key] = (times, mod)
        return times, mod

    def _denoise(self, k: int, exit_step: int | None = None, grad: bool = False,
                 trajectory: list | None = None, source: torch.Tensor | None = None,
                 strength: float | None = None) -> torch.Tensor:
        """Chunk k from its noise through the sampling steps (the context is only read). With
        ``exit_step`` (few-step levels) the chunk is the x0 predicted at that step, and with ``grad``
        that one step runs under autograd (the Self-Forcing rollout). ``trajectory``: a list that
        receives the state before every step and, last, the chunk. ``source``: a chunk noised to the
        step ``strength`` maps to, denoised from there (video-to-video)."""
        run, sc = _ChunkRun(self, k, exit_step, source, strength), self.step_cache
        if sc is not None:  # the reuse state starts afresh in every chunk
            sc.begin_chunk(len(self.sampler), self.rows)
            before = sc.computed
        for i in range(run.first, run.steps):
            if trajectory is not None:
                trajectory.append(run.x)
            xin, t = run.inputs(i)
            if sc is not None:
                sc.begin_step(i)
            with self._network(grad and i == run.steps - 1):
                t, mod = self.modulation(t, self.rows, xin.shape[2])
                pred = self.engine.denoise(xin, t, sc, x0=self.sampler.predicts_x0, modulation=mod)
            run.update(i, pred)
        if trajectory is not None:
            trajectory.append(run.x)
        row_steps = run.count()
        if sc is not None:
            sc.end_chunk()  # the write pass always runs the whole network
            row_steps = sc.computed - before
        self.stats.steps_computed += row_steps
        return run.x

    def _check_source(self, source, strength):
        if source is None:
            if strength is not None:
                raise ValueError("strength needs a source chunk (video-to-video)")
            return None
        cfg = self.model.config
        want = (self.batch, cfg.in_channels, cfg.chunk_frames, *cfg.frame_size)
        if tuple(source.shape) != want:
            raise ValueError(f"a source chunk must be (B, C, l, H, W) = {want}, got {tuple(source.shape)}")
        if strength is None:
            raise ValueError("a source chunk needs a strength in (0, 1]")
        if self.step_cache is not None:
            raise ValueError("video-to-video enters the schedule mid-way, which a step cache cannot; use no step cache")
        return self.start_step(strength)

    def next_chunk(self, last: bool = False, frames: int | None = None, exit_step: int | None = None,
                   grad: bool = False, trajectory: list | None = None, source: torch.Tensor | None = None,
                   strength: float | None = None) -> torch.Tensor:
        """The next chunk (B, C, f, H, W): chunk 0 (the given first frames) first when the model
        takes them, then one generated chunk per call.

        last: skip the write pass (nothing will follow; saves one network call at a video's end),
        after which the session has ended. frames: keep only the first ``frames`` of the chunk (a
        video's trimmed end; counted in ``stats.frames``). The session keeps no reference to what
        it returns.

        source, strength — streaming video-to-video (CausVid): the source chunk (B, C, l, H, W) is
        noised to the level that ``strength`` maps to (``start_step``) with the chunk's own starting
        noise, and the remaining steps denoise it against the cache of the generated output, which
        the result then joins. Strength 1 ignores the source: exactly ``next_chunk()``.

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
        self._check_open()
        self._check_source(source, strength)
        l = self.model.config.chunk_frames
        keep = l if frames is None else frames
        if not 1 <= keep <= l or (keep < l and not last):
            raise ValueError(f"frames={frames}: a chunk keeps 1 to {l} frames, fewer only in the last one (last=True)")
        k = self.chunk
        if k == 0:  # the given frames: clean context, returned as given
            first = self._first.to(self.model.device, self.model.dtype)
            self._first = None
            self._append(first, 0)
            self.chunk = 1
            return first.clone()
        tc = time.perf_counter()
        x = self._denoise(k, exit_step, grad, trajectory, source, strength)
        if last:
            self.ended = True
        else:
            self._append(x, k)
        self._count(keep, time.perf_counter() - tc)
        return x[:, :, :keep] if keep < l else x

    def draft_chunk(self, source: torch.Tensor | None = None, strength: float | None = None) -> torch.Tensor:
        """The next chunk as ``next_chunk`` would denoise it, without writing it into the context or
        advancing: the stream is left as it was (its counters aside). With ``extend`` of another
        stream's chunk after it, a policy can be measured against a context held identical."""
        self._check_open()
        self._check_source(source, strength)
        if self.chunk == 0:
            raise ValueError("the next chunk is the given first frames; there is nothing to denoise")
        return self._denoise(self.chunk, source=source, strength=strength)

    def _count(self, frames: int, seconds: float) -> None:
        stats = self.stats
        self.chunk += 1
        stats.chunks += 1
        stats.frames += frames
        stats.chunk_seconds.append(seconds)
        if stats.seconds_to_first_chunk is None:
            stats.seconds_to_first_chunk = time.perf_counter() - self._t0

    # -- batching --------------------------------------------------------------------------------
    def batch_key(self):
        """Sessions with equal keys can run their next chunk as one batched forward (``next_chunks``):
        the same model, sampler, dtypes, guidance on or off (video-to-video sources may enter the
        schedule at different steps). None: this session's next chunk runs alone (not the shared
        mode, a step cache, the given first frames, or ended)."""
        if (self.mode != "shared" or self.step_cache is not None or self.chunk == 0 or self.ended
                or "batched-streams" not in self.model.features):
            return None
        m, c = self.model, self.engine.cache
        return (id(m), m.dtype, c.dtype, self.autocast, type(self.sampler).__name__,
                tuple(self.sampler.timesteps), self.guided, c.prefix_len)

    # -- saving ------------------------------------------------------------------------------------
    def save(self, path, extra_tensors: dict | None = None, extra_meta: dict | None = None) -> Path:
        """Write the whole stream to one safetensors file, atomically: the cache (or the history of a
        recompute mode), the kept frames, the prepared conditioning and the prompts, the counters and
        the noise positions (seeds and chunk index). ``StreamSession.load`` continues it bit for bit
        (same dtype, device kind and thread count). extra_tensors / extra_meta: what a caller keeps
        beside the stream in the same file (``extra.<name>`` tensors, JSON under ``extra``; a Wan
        stream's VAE caches), read back with ``read_stream``."""
        t = {f"extra.{k}": v for k, v in (extra_tensors or {}).items()}
        if self.mode == "shared":
            t.update({f"cache.{n}": b for n, b in self.engine.cache.buffers().items()})
        elif self.engine.history is not None:
            t["history"] = self.engine.history
        for name, value in (("kept", self.kept), ("sink_kept", self.sink_kept), ("first", self._first),
                            ("labels", self.labels),
                            ("cond.mask", self.cond.mask), ("cond.vector", self.cond.vector)):
            if value is not None:
                t[name] = value
        for i, (k, v) in enumerate(self.cond.kv or []):
            t[f"cond.k.{i}"], t[f"cond.v.{i}"] = k, v
        for name, text in (("prompt", self.prompt), ("negative", self.negative_prompt)):
            if text is not None:
                t[f"{name}.states"], t[f"{name}.mask"] = text.states, text.mask
        s = self.stats
        meta = dict(format=STREAM_FORMAT, config=self.model.config.to_dict(), mode=self.mode, batch=self.batch,
                    seeds=self.seeds, guidance=self.guidance, context_noise=self.context_noise,
                    dtype=str(self.model.dtype), cache_dtype=str(self.cache_dtype),
                    autocast=None if self.autocast is None else str(self.autocast),
                    levels=getattr(self.sampler, "levels", None),
                    steps=None if self.sampler.predicts_x0 else len(self.sampler),
                    step_cache=None if self.step_cache is None else asdict(self.step_cache.config),
                    chunk=self.chunk, ended=self.ended, kept_start=self.kept_start,
                    frames_written=self.engine.cache.frames_written if self.mode == "shared" else None,
                    history_start=None if self.mode == "shared" else self.engine.start,
                    stats={f: getattr(s, f) for f in ("chunks", "frames", "denoise_calls", "write_calls",
                                                     "steps_computed", "steps_total")}, extra=extra_meta)
        return save_safetensors(t, path, metadata={"stream": json.dumps(meta)})

    @classmethod
    def load(cls, path, model: Backbone) -> "StreamSession":
        """A stream written by ``save``, continued over ``model`` (which must have the saved config and
        dtype). A file that is not a saved stream, or one that does not fit the model, is a ValueError."""
        t, meta = _read_stream(path)
        if meta["config"] != model.config.to_dict():
            raise ValueError(f"{path}: the stream was saved from a model with another config")
        if meta["dtype"] != str(model.dtype):
            raise ValueError(f"{path}: the stream was saved in {meta['dtype']}, the model is {model.dtype}")
        dev, dt = model.device, model.dtype
        text = lambda n: Text(t[f"{n}.states"].to(dev), t[f"{n}.mask"].to(dev)) if f"{n}.states" in t else None  # noqa: E731
        cfg, B = model.config, meta["batch"]
        first = t.get("first")
        if cfg.prefix_frames and first is None:  # already written: a placeholder of the right shape
            first = torch.zeros(B, cfg.in_channels, cfg.prefix_frames, *cfg.frame_size, dtype=dt)
        session = cls(model, first_frames=first, prompt=text("prompt"), negative_prompt=text("negative"),
                      labels=t.get("labels"), steps=meta["steps"], levels=meta["levels"], guidance=meta["guidance"],
                      seed=meta["seeds"], mode=meta["mode"], batch=B, context_noise=meta["context_noise"],
                      cache_dtype=_dtype(meta["cache_dtype"]), autocast=_dtype(meta["autocast"]),
                      step_cache=_step_cache_config(meta["step_cache"]))
        cond = session.cond
        cond.mask = t["cond.mask"].to(dev) if "cond.mask" in t else None
        cond.vector = t["cond.vector"].to(dev) if "cond.vector" in t else None
        if cond.kv is not None:
            cond.kv = [(t[f"cond.k.{i}"].to(dev), t[f"cond.v.{i}"].to(dev)) for i in range(len(cond.kv))]
        engine = session.engine
        if meta["mode"] == "shared":
            for name, buf in engine.cache.buffers().items():
                saved = t.get(f"cache.{name}")
                if saved is None or saved.shape != buf.shape or saved.dtype != buf.dtype:
                    raise ValueError(f"{path}: cache buffer {name} is missing or has another shape or dtype")
                buf.copy_(saved)
            engine.cache.frames_written = meta["frames_written"]
        else:
            engine.history = t["history"].to(dev) if "history" in t else None
            engine.start = meta["history_start"]
        session.kept = t["kept"].to(dev) if "kept" in t else None
        session.sink_kept = t["sink_kept"].to(dev) if "sink_kept" in t else None
        session._first = t["first"].to(dev) if "first" in t else None
        session.kept_start, session.chunk, session.ended = meta["kept_start"], meta["chunk"], meta["ended"]
        for f, v in meta["stats"].items():
            setattr(session.stats, f, v)
        return session


STREAM_FORMAT = "ca2vdm-stream/1"


def _dtype(name: str | None):
    return None if name is None else getattr(torch, name.removeprefix("torch."))


def _step_cache_config(d: dict | None) -> StepCacheConfig | None:
    """A ``StepCacheConfig`` back from its JSON form (codebook keys are strings there, tuples lists)."""
    if d is None:
        return None
    d = dict(d, moreg_strides=tuple(d["moreg_strides"]), moreg_window=tuple(d["moreg_window"]))
    if d["codebook"] is not None:
        d["codebook"] = {float(k): v for k, v in d["codebook"].items()}
    return StepCacheConfig(**d)


def read_stream(path) -> tuple[dict, dict]:
    """The tensors and metadata of a stream file (``save``'s extras: ``extra.*`` tensors, ``meta["extra"]``)."""
    return _read_stream(path)


def _read_stream(path) -> tuple[dict, dict]:
    """The tensors and metadata of a saved stream; a clear error for anything else."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"saved stream not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("stream")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        meta = json.loads(meta) if meta else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != STREAM_FORMAT:
        raise ValueError(f"{path}: not a saved stream (no {STREAM_FORMAT!r} metadata)")
    return tensors, meta


class _ChunkRun:
    """One chunk on its way through the sampling steps: the state a denoising loop carries between
    network calls (``StreamSession._denoise`` drives one, ``next_chunks`` several at once)."""

    def __init__(self, session: StreamSession, k: int, exit_step: int | None = None,
                 source: torch.Tensor | None = None, strength: float | None = None):
        model, cfg, sampler = session.model, session.model.config, session.sampler
        self.session, self.sampler, self.rows = session, sampler, session.rows
        shape = (cfg.in_channels, cfg.chunk_frames, *cfg.frame_size)
        self.x = chunk_noise(session.seeds, k, shape, dtype=model.dtype, device=model.device)
        # noise streams of a chunk: 0 its starting noise, 1 context noise, 2 + i re-noising after step i
        self.first = 0 if source is None else session.start_step(strength)
        if self.first:  # video-to-video: the source enters the schedule at step `first`, with this noise
            self.x = sampler.noised(source.to(model.device, model.dtype), self.x, self.first)
        self.steps = len(sampler) if exit_step is None else exit_step + 1
        self.renoise = None
        if sampler.predicts_x0 and self.steps > 1:  # every re-noising draw, drawn on the host, sent in one copy
            renoise = torch.stack([chunk_noise(session.seeds, k, shape, stream=2 + i) for i in range(self.steps - 1)])
            self.renoise = renoise.to(device=model.device, dtype=model.dtype)

    def inputs(self, i: int) -> tuple[torch.Tensor, float]:
        """The network's input at step i: x (doubled for guidance) and its time (one for every frame)."""
        s = self.session
        xin = torch.cat([self.x, self.x]) if s.guided else self.x
        return xin, self.sampler.timesteps[i]

    def update(self, i: int, pred: torch.Tensor) -> None:
        """Step i's network output -> x at step i + 1 (the chunk itself after the exit step)."""
        s, sampler = self.session, self.sampler
        pred = pred.to(s.model.dtype)
        s.stats.denoise_calls += 1
        if s.guided:
            pred = classifier_free_guidance(pred, s.guidance)
        if sampler.predicts_x0 and i == self.steps - 1:  # the exit: this x0 is the chunk
            self.x = pred
        elif sampler.predicts_x0:  # re-noise the x0 prediction to the next level with this step's own noise
            self.x = sampler.step(self.x, pred, i, self.renoise[i])
        else:
            self.x = sampler.step(self.x, pred, i)

    def count(self) -> int:
        """Row-steps this chunk ran (added to ``stats.steps_total``)."""
        row_steps = self.rows * (self.steps - self.first)
        self.session.stats.steps_total += row_steps
        return row_steps


def next_chunks(sessions: list[StreamSession], sources: list | None = None,
                strengths: list | None = None) -> list[torch.Tensor]:
    """The next chunk of every session, each exactly what its own ``next_chunk(source=, strength=)``
    would return, with the sessions whose ``batch_key`` agree run as one batched forward per
    denoising step and one batched write pass (a server's streams at different frames, prompts,
    guidance scales and seeds). Sessions that cannot be batched run alone."""
    n = len(sessions)
    if len({id(s) for s in sessions}) != n:
        raise ValueError("a session may appear only once in one next_chunks call")
    sources, strengths = sources or [None] * n, strengths or [None] * n
    if len(sources) != n or len(strengths) != n:
        raise ValueError(f"{n} sessions need {n} sources and strengths (None for plain generation)")
    groups, out = {}, [None] * n
    for j, s in enumerate(sessions):
        s._check_open()
        s._check_source(sources[j], strengths[j])
        key = s.batch_key()
        groups.setdefault(("alone", j) if key is None else key, []).append(j)
    for idx in groups.values():
        if len(idx) == 1:
            j = idx[0]
            out[j] = sessions[j].next_chunk(source=sources[j], strength=strengths[j])
            continue
        chunks = _batched_chunk([sessions[j] for j in idx], [sources[j] for j in idx], [strengths[j] for j in idx])
        for j, x in zip(idx, chunks):
            out[j] = x
    return out


def _batched_chunk(sessions: list[StreamSession], sources: list, strengths: list) -> list[torch.Tensor]:
    """One chunk of several compatible shared-mode sessions: every denoising step and the write pass
    run once over all their rows, against a ``CacheBatch`` of their own caches (positions per row).
    A video-to-video session whose source enters the schedule at step f joins the batch from step f
    on (the steps before it run over the other sessions alone)."""
    tc = time.perf_counter()
    model, l = sessions[0].model, sessions[0].model.config.chunk_frames
    runs = [_ChunkRun(s, s.chunk, None, src, st) for s, src, st in zip(sessions, sources, strengths)]
    groups = {}  # the sessions taking part in a step -> their CacheBatch and conditioning

    def group(members):
        if members not in groups:
            groups[members] = (CacheBatch([sessions[j].engine.cache for j in members]),
                               functools.reduce(Condition.cat, [sessions[j].cond for j in members]))
        return groups[members]

    for i in range(min(r.first for r in runs), runs[0].steps):
        members = tuple(j for j, r in enumerate(runs) if r.first <= i)
        cache, cond = group(members)
        xs, times, mods = [], [], []
        with sessions[0]._network():
            for j in members:
                x, t = runs[j].inputs(i)
                t, mod = sessions[j].modulation(t, sessions[j].rows, l)
                xs.append(x), times.append(t), mods.append(mod)
            pred = model.forward_cached(torch.cat(xs), torch.cat(times), cache, cond, x0=runs[0].sampler.predicts_x0,
                                        modulation=_cat_modulation(mods))
        for j, p in zip(members, pred.split([sessions[j].rows for j in members])):
            runs[j].update(i, p)
    for r in runs:
        r.session.stats.steps_computed += r.count()
    frames = torch.cat([s._context_frames(r.x, s.chunk) for s, r in zip(sessions, runs)])
    cache, cond = group(tuple(range(len(sessions))))
    with sessions[0]._network():
        writes = [s.modulation(0.0, s.rows, l) for s in sessions]
        model.forward_cached(frames, torch.cat([t for t, _ in writes]), cache, cond, write=True,
                             modulation=_cat_modulation([m for _, m in writes]))
    seconds = time.perf_counter() - tc
    for s in sessions:
        s.stats.write_calls += 1
        s._count(l, seconds)
    return [r.x for r in runs]


def _cat_modulation(mods: list):
    """Several sessions' ``modulation`` outputs (tensors, or tuples and lists of them, as the backbone
    makes them) stacked along the rows; None when any is None."""
    if any(m is None for m in mods):
        return None
    if torch.is_tensor(mods[0]):
        return torch.cat(mods)
    return type(mods[0])(_cat_modulation(list(parts)) for parts in zip(*mods))
