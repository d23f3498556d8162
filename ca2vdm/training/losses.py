"""The training objectives: the Ca2-VDM recipe and its all-chunks (teacher-forcing) variant.

One step of the recipe (``ca2vdm_loss``):

1. Choose one prefix length for the batch from whole chunks: {p, p + l, p + 2l, ...} <= P_max
   (with ``prefix_frames`` = 0 that includes 0: clips with no prefix teach a prompt to start a video).
2. Cut every clip to prefix + l frames. Prefix frames stay clean (sigma = 0, told time 0),
   optionally noise-augmented (``context_noise``) exactly as ``generate(context_noise=...)`` does.
3. Noise the last l frames at one random level per clip, run the masked full-sequence forward (the
   same attention sets as cached inference), and take the loss on the noisy frames only.
4. When the prefix is a full window (P_max frames), shift the cyclic TPE rows at random, so every
   rotation that inference meets once its window slides is seen (``random_tpe_shift``); shorter
   prefixes only occur at the start of a video, where inference uses the rows unshifted.

``all_chunks_loss`` noises every chunk of a clip at its own level and denoises all of them in one
``forward_all_chunks`` pass against the clean ground-truth clip (teacher forcing). ``full_clip_loss``
is the ordinary video DiT's, for a bidirectional model (a distillation teacher). All randomness
comes from ``Draws``: one generator for what the batch shares, one per sample for the rest.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbone import Backbone
from ..conditioning import Text
from ..config import ModelConfig


def prefix_choices(cfg: ModelConfig) -> list[int]:
    """Prefix lengths for the recipe: whole chunks p, p + l, ... <= P_max, and P_max itself.

    When P_max - p is not a multiple of l, inference windows hold P_max frames that begin mid-chunk
    once the window slides; the extra choice P_max trains exactly that (see ``prefix_start``).
    """
    out, n = [], cfg.prefix_frames
    while n <= cfg.max_context_frames:
        out.append(n)
        n += cfg.chunk_frames
    if out[-1] != cfg.max_context_frames:
        out.append(cfg.max_context_frames)
    return out


def prefix_start(cfg: ModelConfig, n_prefix: int) -> int:
    """Absolute index of a training clip's first frame, so that its noisy chunk starts a chunk."""
    lay, k = cfg.layout, 1
    while lay.chunk_start(k) < n_prefix:
        k += 1
    return lay.chunk_start(k) - n_prefix


def clip_frames(cfg: ModelConfig) -> int:
    """Frames a training clip needs: up to a chunk whose window is full (P_max frames), plus that
    chunk; a bidirectional model's ``clip_length``."""
    if cfg.temporal == "bidirectional":
        return cfg.clip_length
    lay, k = cfg.layout, 1
    while lay.chunk_start(k) < cfg.max_context_frames:
        k += 1
    return lay.chunk_start(k) + cfg.chunk_frames


class Draws:
    """The random numbers of one training batch.

    ``batch`` draws what the whole batch shares (the prefix length, the TPE shift); ``samples``
    holds one generator per sample for its dataset index, caption dropout, noise and noise level,
    so a sample's randomness does not depend on the batch position, rank or micro-batch it lands
    in (the key to DDP == one process). With ``samples=None`` every draw comes from ``batch``;
    ``rows`` (``parallel.Rows``) then says which rows of a global batch this rank holds: each draw
    is made for the whole batch and cut to them, so the ranks draw what one process would.
    """

    def __init__(self, batch: torch.Generator, samples: list | None = None, rows=None):
        self.batch, self.samples, self.rows = batch, samples, rows

    @classmethod
    def of(cls, gen: "torch.Generator | Draws", rows=None) -> "Draws":
        return gen if isinstance(gen, cls) else cls(gen, rows=rows)

    def _whole(self, batch: int) -> int:
        return batch if self.rows is None else self.rows.total

    def _take(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.rows is None else self.rows.take(t)

    def randn(self, shape) -> torch.Tensor:  # (B, ...) float32 on the CPU
        if self.samples is None:
            return self._take(torch.randn((self._whole(shape[0]), *tuple(shape)[1:]), generator=self.batch))
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in self.samples])

    def rand(self, batch: int) -> torch.Tensor:  # (B,)
        if self.samples is None:
            return self._take(torch.rand(self._whole(batch), generator=self.batch))
        return torch.cat([torch.rand(1, generator=g) for g in self.samples])

    def levels(self, diffusion, batch: int, n: int) -> torch.Tensor:  # (B, n) training noise levels
        if self.samples is None:
            return self._take(diffusion.sample_levels((self._whole(batch), n), generator=self.batch))
        return torch.cat([diffusion.sample_levels((1, n), generator=g) for g in self.samples])

    def choice(self, n: int) -> int:  # one integer in [0, n) for the whole batch
        return int(torch.randint(0, n, (1,), generator=self.batch))


def random_tpe_shift(cfg: ModelConfig, draws: Draws) -> int:
    """A rotation of the cyclic TPE table drawn uniformly from all L = ``cyclic_length`` rows (0 for
    RoPE). Inference frame n uses row n mod L, so a sliding window meets every rotation, also
    when L is longer than the P_max + l frames a training clip holds."""
    return draws.choice(cfg.cyclic_length) if cfg.positions == "cyclic" else 0


def ca2vdm_loss(model: Backbone, video: torch.Tensor, cond, n_prefix: int, gen: "torch.Generator | Draws",
                context_noise: float = 0.0) -> torch.Tensor:
    """The recipe's loss for one batch. video (B, C, >= n_prefix + l, H, W), clean, in model units.
    gen: a generator, or ``Draws`` with one generator per sample."""
    cfg, diff, draws = model.config, model.diffusion, Draws.of(gen)
    l = cfg.chunk_frames
    x0 = video[:, :, :n_prefix + l]
    B, dev = x0.shape[0], x0.device
    noise = draws.randn(x0.shape).to(dev, x0.dtype)
    level = draws.levels(diff, B, 1).expand(B, l).to(dev)  # one level per clip
    noisy = diff.add_noise(x0[:, :, n_prefix:], noise[:, :, n_prefix:], level)
    prefix = x0[:, :, :n_prefix]
    if context_noise and n_prefix:
        aug = draws.randn(prefix.shape).to(dev, x0.dtype)
        lv = torch.full((B, n_prefix), context_noise, dtype=torch.float64, device=dev)
        prefix = diff.add_noise(prefix, aug, lv)
    xt = torch.cat([prefix, noisy], dim=2)
    t = torch.cat([torch.zeros(B, n_prefix, dtype=torch.float64, device=dev), diff.model_time(level)], dim=1)
    shift = random_tpe_shift(cfg, draws) if n_prefix >= cfg.max_context_frames else 0
    pred = model(xt, t, cond, start=prefix_start(cfg, n_prefix), tpe_shift=shift)[:, :, n_prefix:]
    target = model.target(x0[:, :, n_prefix:], noise[:, :, n_prefix:], level)
    return F.mse_loss(pred.float(), target.float())


def all_chunks_loss(model: Backbone, video: torch.Tensor, cond, gen: "torch.Generator | Draws",
                    context_noise: float = 0.0) -> torch.Tensor:
    """The all-chunks-at-once variant (docs/CONCEPTS.md §6, Self-Forcing's teacher forcing): one pass
    over a clean clip and noisy copies of all its generated chunks, one noise level per (clip, chunk),
    loss on every noisy frame. Each noisy chunk sees exactly what cached inference shows it."""
    cfg, diff, draws = model.config, model.diffusion, Draws.of(gen)
    Fr = clip_frames(cfg)
    x0 = video[:, :, :Fr]
    B, dev, p = x0.shape[0], x0.device, cfg.prefix_frames
    n_chunks = (Fr - p) // cfg.chunk_frames
    noise = draws.randn(x0[:, :, p:].shape).to(dev, x0.dtype)
    level = draws.levels(diff, B, n_chunks).repeat_interleave(cfg.chunk_frames, dim=1).to(dev)
    noisy = diff.add_noise(x0[:, :, p:], noise, level)
    clean = x0
    if context_noise:
        aug = draws.randn(x0.shape).to(dev, x0.dtype)
        clean = diff.add_noise(x0, aug, torch.full((B, Fr), context_noise, dtype=torch.float64, device=dev))
    shift = random_tpe_shift(cfg, draws)  # the clip's last chunk has a full window
    pred = model.forward_all_chunks(clean, noisy, diff.model_time(level), cond, tpe_shift=shift)
    target = model.target(x0[:, :, p:], noise, level)
    return F.mse_loss(pred.float(), target.float())


def full_clip_loss(model: Backbone, video: torch.Tensor, cond, gen: "torch.Generator | Draws") -> torch.Tensor:
    """The ordinary video DiT's loss (``full-clip`` layout, a bidirectional model): a clip of
    ``clip_length`` frames noised at one level per clip, every frame seeing every other, the cyclic
    TPE rows shifted uniformly over the table (so every row is trained), loss on every frame."""
    cfg, diff, draws = model.config, model.diffusion, Draws.of(gen)
    x0 = video[:, :, :cfg.clip_length]
    B, Fr, dev = x0.shape[0], x0.shape[2], x0.device
    noise = draws.randn(x0.shape).to(dev, x0.dtype)
    level = draws.levels(diff, B, 1).expand(B, Fr).to(dev)  # one level per clip
    pred = model(diff.add_noise(x0, noise, level), diff.model_time(level), cond, tpe_shift=random_tpe_shift(cfg, draws))
    return F.mse_loss(pred.float(), model.target(x0, noise, level).float())


LAYOUTS = ("prefix", "all-chunks", "full-clip")


def check_layout(cfg: ModelConfig, layout: str) -> None:
    """A training layout that contradicts the model's attention set is an error naming both."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if (layout == "full-clip") != (cfg.temporal == "bidirectional"):
        raise ValueError(f"TrainConfig.layout={layout!r} contradicts ModelConfig.temporal={cfg.temporal!r}: "
                         "a bidirectional model trains with 'full-clip', a causal one with 'prefix' or 'all-chunks'")


def drop_captions(model: Backbone, text: Text, drop: torch.Tensor) -> Text:
    """Replace the prompts where ``drop`` (B,) is True by the learned null prompt."""
    null = F.pad(model.null_text.to(text.states.dtype), (0, 0, 0, text.states.shape[1] - 1))  # (N, Dt)
    null_mask = torch.zeros_like(text.mask[0])
    null_mask[0] = True
    d = drop.to(text.states.device)
    return Text(torch.where(d[:, None, None], null[None], text.states), torch.where(d[:, None], null_mask[None], text.mask))


class Objective(nn.Module):
    """The training loss of one (micro-)batch as a module over the model, so that
    ``DistributedDataParallel`` can wrap it: conditioning, noising and the loss all run inside
    ``forward``, whichever layout (``prefix`` or ``all-chunks``) is trained."""

    def __init__(self, model: Backbone, layout: str = "prefix", context_noise: float = 0.0):
        super().__init__()
        check_layout(model.config, layout)
        self.model, self.layout, self.context_noise = model, layout, context_noise

    def forward(self, video, draws: Draws, text: Text | None = None, labels=None, drop=None, n_prefix: int = 0):
        # video (B, C, F, H, W); drop (B,) bool: captions / labels replaced by the null condition
        model, B = self.model, video.shape[0]
        cond = None
        if text is not None:
            cond = model.condition(B, drop_captions(model, text, drop))
        elif labels is not None:
            cond = model.condition(B, labels=torch.where(drop.to(labels.device), model.config.num_classes, labels))
        if self.layout == "full-clip":
            return full_clip_loss(model, video, cond, draws)
        if self.layout == "all-chunks":
            return all_chunks_loss(model, video, cond, draws, self.context_noise)
        return ca2vdm_loss(model, video, cond, n_prefix, draws, self.context_noise)
