"""An independent sampler for the tests: what a stream must produce, rebuilt from the model's
full-sequence forward and the sampling formulas written out here.

It shares no loop, schedule, cache or session state with ``ca2vdm.stream`` or
``ca2vdm.diffusion``: every network call is ``model.forward`` over [context ‖ noisy chunk] (the
masked full-sequence forward, or the unmasked one of a bidirectional clip), the flow schedule is
diffusers' ``FlowMatchEulerDiscreteScheduler`` written out in float64, and the noise of sample b,
chunk k, stream j comes from a generator seeded by ``mix_seed(seed_b, k, j)`` (the library's
documented noise contract: stream 0 a chunk's starting noise, 2 + i the re-noising after step i).
Which frames a stream keeps as its context, and from which absolute frame, the caller decides.
"""

import torch

from ca2vdm.conditioning import classifier_free_guidance
from ca2vdm.diffusion import mix_seed


def noise(seeds, chunk, shape, stream=0, dtype=torch.float64):
    """(B, *shape): sample b drawn in float32 from its own generator, then cast."""
    draws = [torch.randn(shape, generator=torch.Generator().manual_seed(mix_seed(s, chunk, stream))) for s in seeds]
    return torch.stack(draws).to(dtype)


def flow_sigmas(steps, shift, n=1000):
    """diffusers' flow-matching Euler schedule: network times evenly spaced between the shifted
    extremes, shifted again; then 0."""
    warp = lambda s: shift * s / (1 + (shift - 1) * s)  # noqa: E731
    hi, lo = warp(1.0) * n, warp(1.0 / n) * n
    ts = [hi + (lo - hi) * i / (steps - 1) for i in range(steps)] if steps > 1 else [hi]
    return [warp(t / n) for t in ts] + [0.0]


class Oracle:
    """Chunks of one stream, each denoised by full-sequence forwards over its context.

    context: (B, C, n, H, W) clean frames [start, start + n) that the next chunk attends to (None:
    nothing yet); ``start`` a list: the absolute index of every context frame (a window with sink
    frames), the chunks following the last. ``cond``: the conditioning of every row (guided: 2B
    rows, conditional first)."""

    def __init__(self, model, seeds, cond, guidance=1.0, steps=None, levels=None, context=None, start=0):
        self.model, self.seeds, self.cond, self.guidance = model, list(seeds), cond, guidance
        self.steps, self.levels = steps, levels
        self.context, self.start = context, start
        n = model.config.num_train_timesteps
        if levels is not None:
            self.sigmas = list(levels)
        else:
            self.sigmas = flow_sigmas(steps, model.config.flow_shift, n)

    def predict(self, x, sigma, x0):
        """One network call on chunk x at level sigma (guided when the scale is not 1)."""
        m, B, n = self.model, x.shape[0], self.model.config.num_train_timesteps
        rows = 2 * B if self.guidance != 1.0 else B
        xs = torch.cat([x, x]) if rows > B else x
        ctx = None if self.context is None else (torch.cat([self.context] * (rows // B)))
        q = x.shape[2]
        t = torch.full((rows, q), sigma * n, dtype=torch.float64)
        if ctx is not None:
            xs = torch.cat([ctx, xs], dim=2)
            t = torch.cat([torch.zeros(rows, ctx.shape[2], dtype=torch.float64), t], dim=1)
        start = self.start
        if not isinstance(start, int):  # every frame's index: the context's, then the chunk's
            start = list(start) + list(range(start[-1] + 1 if start else 0, (start[-1] + 1 if start else 0) + q))
        with torch.no_grad():
            out = m(xs, t, self.cond, start=start, x0=x0)[:, :, -q:]
        return classifier_free_guidance(out, self.guidance) if rows > B else out

    def chunk(self, k, frames, exit_step=None, source=None, first_step=0):
        """Chunk k (noise of chunk index k) of ``frames`` frames: flow Euler steps over the schedule,
        or few-step levels (x0 at each level, re-noised to the next; the chunk is the x0 at
        ``exit_step``, default the last). ``source`` enters at step ``first_step`` (video-to-video)."""
        cfg = self.model.config
        shape = (cfg.in_channels, frames, *cfg.frame_size)
        x = noise(self.seeds, k, shape)
        if source is not None:
            s = self.sigmas[first_step]
            x = (1 - s) * source + s * x
        if self.levels is not None:
            last = len(self.levels) - 1 if exit_step is None else exit_step
            for i in range(first_step, last + 1):
                x0 = self.predict(x, self.levels[i], x0=True)
                if i == last:
                    return x0
                s = self.levels[i + 1]
                x = (1 - s) * x0 + s * noise(self.seeds, k, shape, stream=2 + i)
        for i in range(first_step, self.steps):
            v = self.predict(x, self.sigmas[i], x0=False)
            x = x + (self.sigmas[i + 1] - self.sigmas[i]) * v
        return x

    def append(self, frames):
        """Clean frames join the context (no window: the oracle sees everything it was given)."""
        if not isinstance(self.start, int):
            nxt = self.start[-1] + 1 if self.start else 0
            self.start = list(self.start) + list(range(nxt, nxt + frames.shape[2]))
        self.context = frames if self.context is None else torch.cat([self.context, frames], dim=2)

    def keep_last(self, n_frames):
        """Cut the context to its last ``n_frames`` frames (a re-cache's window), moving ``start``."""
        drop = self.context.shape[2] - n_frames
        if drop > 0:
            self.context, self.start = self.context[:, :, drop:], self.start + drop

    def run(self, chunks, first_chunk, exit_step=None):
        """``chunks`` chunks from chunk index ``first_chunk``, each joining the context."""
        out = []
        for k in range(first_chunk, first_chunk + chunks):
            x = self.chunk(k, self.model.config.chunk_frames, exit_step)
            self.append(x)
            out.append(x)
        return out
