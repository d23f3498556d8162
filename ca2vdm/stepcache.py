"""Training-free step caching: reuse the block stack's residual across denoising steps (AdaCache).

Within one chunk the denoising steps change the network's inner features slowly. On a *computed*
step the model keeps, per sample, the residual its block stack added to the token embeddings
(the sum of every block's attention and MLP residuals for the noisy chunk); on a *reused* step it
skips the block stack and adds the kept residual to the new embeddings. Patch embedding, timestep
embedding and the final layer always run, so a reused step still sees its own input and time.

Policies (``StepCacheConfig.parse``):

* ``adacache`` — after a computed step, the relative L1 change of one mid-depth block's
  temporal-attention residual since the last computed step, divided by the steps between them,
  picks through a codebook how many steps ahead the next computed step is (AdaCache).
* ``adacache-moreg`` — the same metric multiplied by a motion score: the frame-to-frame
  difference of that residual (large for fast motion) plus the magnitude of its change per step
  (motion gradient), so moving content is computed more often (AdaCache's MoReg).
* ``fixed:N`` — reuse for N steps after every computed step (FORA-style; ``fixed:0`` = uncached).
* ``first-block:THRESHOLD`` — the first block always runs; when its residual changed by less
  than THRESHOLD (relative L1) since the last computed step, the other blocks are skipped.

Rules for the autoregressive loop: the first and last denoising steps of every chunk are always
computed; all state resets at every chunk (``begin_chunk``); the clean cache-write pass never
consults this module; every sample of the batch — and, with guidance, its conditional and
unconditional rows — keeps its own state, so a video's output does not depend on its batch-mates.

This module holds the policies, the per-sample state and the step-cached denoising forward
(``StepCache.forward``), composed from the model's public pieces (``embed``, ``blocks``, ``head``);
the model itself knows nothing of step caching. A ``StepCache`` belongs to one stream
(``stream.StreamSession``), so streams over one model never share it. Decisions are made on the
host, so each computed step costs one small device-to-host copy.
"""

import math
from dataclasses import dataclass

import torch

# Metric threshold -> stride to the next computed step (1 = compute the next step too).
# Long schedules: AdaCache's 30-step Open-Sora codebook. Short schedules (<= 20 steps, the library's
# default is 20): the per-step change is larger and fewer steps remain to reuse, so thresholds and
# strides shorter; calibrated on an earlier default moving-digits model, whose mid-schedule change
# per step is 0.10-0.15 at 20 steps (so most steps get stride 2 or 3).
CODEBOOK_LONG = {0.08: 6, 0.16: 5, 0.24: 4, 0.32: 3, 0.40: 2, 1.00: 1}
CODEBOOK_SHORT = {0.06: 4, 0.12: 3, 0.18: 2, 1.00: 1}
SHORT_SCHEDULE_STEPS = 20

POLICIES = ("adacache", "adacache-moreg", "fixed", "first-block")


@dataclass
class StepCacheConfig:
    """A step-caching policy and its knobs.

    policy: one of ``POLICIES``. reuse: steps reused after each computed step (``fixed``).
    threshold: relative-L1 threshold of the first block's residual (``first-block``).
    codebook: {metric threshold: stride}, ascending; None picks ``CODEBOOK_SHORT`` for schedules of
    at most ``SHORT_SCHEDULE_STEPS`` steps and ``CODEBOOK_LONG`` otherwise.
    block: the block whose temporal-attention residual drives ``adacache`` (None: depth // 2).
    moreg_*: motion regularisation — score m = ((mean over frame strides of the normalised
    frame-to-frame L1 difference) / moreg_scale) ** moreg_power, used within the fraction
    ``moreg_window`` of the schedule (1 outside it); the metric is multiplied by
    m + mograd_mul * |m - m_prev| / steps_between. moreg_scale is the typical motion score, so
    that m is about 1 for typical motion: 0.2 on the shipped moving-digits model (AdaCache uses
    0.385 for Open-Sora); calibrate it for another model.
    """

    policy: str = "adacache"
    reuse: int = 0
    threshold: float = 0.0
    codebook: dict | None = None
    block: int | None = None
    moreg_strides: tuple = (1,)
    moreg_window: tuple = (0.1, 0.9)
    moreg_scale: float = 0.2
    moreg_power: float = 8.0
    mograd_mul: float = 10.0

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"step-cache policy must be one of {', '.join(POLICIES)}; got {self.policy!r}")
        if self.reuse < 0:
            raise ValueError(f"fixed:N needs N >= 0 reused steps, got {self.reuse}")
        if not (self.threshold >= 0):  # also rejects NaN
            raise ValueError(f"first-block:THRESHOLD needs a threshold >= 0, got {self.threshold}")
        if self.codebook is not None:
            check_codebook(self.codebook)
        if any(s < 1 for s in self.moreg_strides):
            raise ValueError(f"moreg_strides must be >= 1, got {self.moreg_strides}")

    @classmethod
    def parse(cls, spec: "str | StepCacheConfig") -> "StepCacheConfig":
        """``adacache`` | ``adacache-moreg`` | ``fixed:N`` | ``first-block:THRESHOLD``."""
        if isinstance(spec, cls):
            return spec
        name, _, arg = str(spec).partition(":")
        if name in ("adacache", "adacache-moreg") and not arg:
            return cls(policy=name)
        try:
            if name == "fixed" and arg:
                return cls(policy="fixed", reuse=int(arg))
            if name == "first-block" and arg:
                return cls(policy="first-block", threshold=float(arg))
        except ValueError as e:
            if "step-cache" in str(e) or "needs" in str(e):
                raise
            raise ValueError(f"bad step-cache argument in {spec!r}: {arg!r} is not a number") from None
        raise ValueError(f"step cache must be adacache, adacache-moreg, fixed:N or first-block:THRESHOLD; got {spec!r}")

    def codebook_for(self, steps: int) -> dict:
        if self.codebook is not None:
            return self.codebook
        return CODEBOOK_SHORT if steps <= SHORT_SCHEDULE_STEPS else CODEBOOK_LONG


def check_codebook(codebook: dict) -> None:
    keys = list(codebook)
    if not keys or keys != sorted(keys) or any(int(v) < 1 for v in codebook.values()):
        raise ValueError(f"a codebook maps ascending thresholds to strides >= 1, got {codebook}")


def stride_from_codebook(metric: float, codebook: dict) -> int:
    """The stride of the first threshold above ``metric`` (the last stride when none is)."""
    for threshold, stride in codebook.items():
        if metric < threshold:
            return int(stride)
    return int(list(codebook.values())[-1])


def relative_l1(new: torch.Tensor, old: torch.Tensor) -> list[float]:
    """Per sample ||new - old||_1 / ||old||_1 over all but the batch dimension."""
    num = (new.float() - old.float()).abs().flatten(1).sum(1)
    den = old.float().abs().flatten(1).sum(1).clamp_min(1e-12)
    return (num / den).tolist()


def motion_score(residual: torch.Tensor, strides=(1,)) -> list[float]:
    """Per sample frame-to-frame change of a residual (B, F, S, D), normalised to [0, 1]:
    mean over strides i of ||r[i:] - r[:-i]||_1 / (||r[i:]||_1 + ||r[:-i]||_1)."""
    r = residual.float()
    scores = torch.zeros(r.shape[0], device=r.device)
    used = 0
    for i in strides:
        if i >= r.shape[1]:
            continue
        a, b = r[:, i:], r[:, :-i]
        scores += (a - b).abs().flatten(1).sum(1) / (a.abs().flatten(1).sum(1) + b.abs().flatten(1).sum(1)).clamp_min(1e-12)
        used += 1
    return (scores / max(used, 1)).tolist()


@dataclass
class _Sample:
    """One batch row's state within a chunk."""

    next_step: int = 0        # the next step at which the block stack must run
    last_step: int = -1       # the last step at which it ran
    prev_moreg: float = 1.0


class StepCache:
    """Per-stream state of a policy: what each batch row keeps and when it computes next.

    config: a ``StepCacheConfig`` or a spec string (``StepCacheConfig.parse``); depth: the model's.
    The generation loop calls ``begin_chunk(steps, batch)`` before each chunk's denoising steps,
    ``begin_step(i)`` before step i, and ``forward`` in place of the model's cached denoising
    forward: it asks ``rows_to_compute()`` (or, for ``first-block``, ``rows_after_first_block``),
    runs the blocks for those rows and keeps their residuals (``keep``). Counters: ``computed`` /
    ``total`` row-steps over the stream, ``chunk_computed`` per chunk.
    """

    def __init__(self, config: "StepCacheConfig | str", depth: int):
        config = StepCacheConfig.parse(config)
        self.config = config
        self.block = depth // 2 if config.block is None else config.block
        if not 0 <= self.block < depth:
            raise ValueError(f"step-cache block must be in [0, {depth}), got {self.block}")
        self.start = 1 if config.policy == "first-block" else 0  # first block of the skippable stack
        self.computed = 0
        self.total = 0
        self.chunk_computed: list[int] = []  # row-steps computed per chunk
        self.steps = 0
        self.step = -1
        self.samples: list[_Sample] = []
        self.residual = None  # (B, F, S, D) what blocks[start:] added on the last computed step
        self.probe = None     # (B, F, S, D) the metric's residual on the last computed step

    @property
    def active(self) -> bool:
        return self.step >= 0

    # -- the step-cached denoising forward ------------------------------------------------------
    def forward(self, model, x, t, cache, cond, x0: bool = False, modulation=None):
        """A denoising step of chunk x (B, C, q, H, W) at times t (B, q) against ``cache``, under
        this policy: ``model.forward_cached(x, t, cache, cond)`` with the block stack skipped for
        the rows that reuse their kept residual. Outside a chunk's steps it is the plain forward.
        ``modulation``: ``model.modulation(t, cond)`` when the caller already has it."""
        if not self.active:
            return model.forward_cached(x, t, cache, cond, x0=x0, modulation=modulation)
        cond = model.check_input(x, t, cond)
        ctx = model.cached_context(cache, x)
        h, (c, mods) = model.tokens(x), model.modulation(t, cond) if modulation is None else modulation
        h = self.run_blocks(model.blocks, h, c, cond, ctx, mods)
        return model.head(h, c, x, t, x0, mods[-1])

    def run_blocks(self, blocks, h, c, cond, ctx, mods=None):
        """The block stack of a denoising step. h (B, F, S, D) embeddings -> (B, F, S, D); ``mods``:
        each block's adaLN output when already computed (``CausalVideoDiT.modulation``).

        Rows the policy marks as due run the (skippable part of the) stack and their residual is
        kept; the other rows add the residual kept on their last computed step.
        """
        B = h.shape[0]
        mods = mods or [None] * len(blocks)
        self.count_step(B)
        if self.start:  # first-block: block 0 always runs, its residual decides
            h0, h = h, blocks[0](h, c, cond, ctx, 0, mods[0])
            rows = self.rows_after_first_block(h - h0)
        else:
            rows = self.rows_to_compute()
        if not rows:
            return h + self.residual.to(h.dtype)
        part = len(rows) < B
        hr, cr = (h[rows], c[rows]) if part else (h, c)
        mr = [None if m is None else m[rows] for m in mods] if part else mods
        ctx_r, cond_r = (ctx.rows(rows), cond.rows(rows)) if part else (ctx, cond)
        ctx_r.tap = -1 if self.tap_block is None else self.tap_block
        out = hr
        for i in range(self.start, len(blocks)):
            out = blocks[i](out, cr, cond_r, ctx_r, i, mr[i])
        self.keep(rows, out - hr, ctx_r.tapped)
        if not part:
            return out
        h = h + self.residual.to(h.dtype)
        h[rows] = out
        return h

    @property
    def tap_block(self) -> int | None:
        """The block whose temporal-attention residual the policy reads (None: none needed)."""
        return self.block if self.config.policy.startswith("adacache") else None

    def begin_chunk(self, steps: int, batch: int) -> None:
        self.steps, self.step = steps, -1
        self.samples = [_Sample() for _ in range(batch)]
        self.residual = self.probe = None
        self.chunk_computed.append(0)

    def begin_step(self, i: int) -> None:
        self.step = i

    def end_chunk(self) -> None:
        self.step = -1
        self.residual = self.probe = None

    def forced(self) -> bool:
        return self.step == 0 or self.step == self.steps - 1

    def rows_to_compute(self) -> list[int]:
        """Rows whose block stack runs at this step (schedule-driven policies)."""
        if self.forced() or self.residual is None:
            return list(range(len(self.samples)))
        return [b for b, s in enumerate(self.samples) if self.step >= s.next_step]

    def rows_after_first_block(self, first: torch.Tensor) -> list[int]:
        """``first-block``: rows whose first-block residual (B, F, S, D) moved more than the
        threshold since their last computed step. Keeps the new residual for those rows."""
        if self.forced() or self.probe is None:
            rows = list(range(len(self.samples)))
        else:
            change = relative_l1(first, self.probe)
            rows = [b for b, c in enumerate(change) if c >= self.config.threshold]
        self._store("probe", rows, first[rows] if len(rows) < first.shape[0] else first)
        return rows

    def keep(self, rows: list[int], residual: torch.Tensor, probe: torch.Tensor | None = None) -> None:
        """Record a computed step for ``rows``: the stack's residual (len(rows), F, S, D) and,
        for adacache, the probe block's temporal-attention residual; schedule the next step."""
        cfg, i = self.config, self.step
        self.computed += len(rows)
        self.chunk_computed[-1] += len(rows)
        if cfg.policy.startswith("adacache") and probe is not None:
            if self.probe is not None:
                old = self.probe[rows]
                change = relative_l1(probe, old)
                moreg = motion_score(probe, cfg.moreg_strides) if cfg.policy == "adacache-moreg" else None
            else:
                change = moreg = None
            codebook = cfg.codebook_for(self.steps)
            for j, b in enumerate(rows):
                s = self.samples[b]
                stride = 1
                if change is not None and s.last_step >= 0:
                    between = i - s.last_step
                    metric = change[j] / between
                    if moreg is not None:
                        metric *= self._moreg(s, moreg[j], between)
                    stride = stride_from_codebook(metric, codebook)
                s.next_step, s.last_step = i + stride, i
            self._store("probe", rows, probe)
        else:
            stride = cfg.reuse + 1 if cfg.policy == "fixed" else 1
            for b in rows:
                s = self.samples[b]
                s.next_step, s.last_step = i + stride, i
        self._store("residual", rows, residual)

    def count_step(self, batch: int) -> None:
        self.total += batch

    def _moreg(self, s: _Sample, score: float, between: int) -> float:
        cfg = self.config
        lo, hi = cfg.moreg_window
        if lo * self.steps <= self.step <= hi * self.steps:
            m = (score / cfg.moreg_scale) ** cfg.moreg_power
        else:
            m = 1.0
        grad = cfg.mograd_mul * (m - s.prev_moreg) / between
        s.prev_moreg = m
        return m + abs(grad)

    def _store(self, name: str, rows: list[int], value: torch.Tensor) -> None:
        """Set the held tensor's ``rows`` (the first step of a chunk computes every row)."""
        if len(rows) == len(self.samples):
            setattr(self, name, value)
        else:
            held = getattr(self, name)
            held[rows] = value.to(held.dtype)

    @property
    def fraction_computed(self) -> float:
        return self.computed / self.total if self.total else math.nan
