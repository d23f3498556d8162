"""DMD for a causal video student (CausVid with the Self-Forcing rollout): the ``DMDProblem`` of a
few-step student, a many-step teacher and a critic of the teacher's kind.

* generate — the self rollout: the student generates the clip chunk by chunk through its own KV
  cache (``StreamSession``, few-step levels). One exit step is drawn per iteration for every chunk;
  the steps before it run without gradient, the exit step with it, and each finished chunk enters
  the cache detached by the clean write pass: gradients never cross chunks.
* real_x0 — the teacher's guided x0 prediction (uncond + w (cond - uncond)) of every noisy chunk with
  the clip's earlier chunks, clean, as context: all chunks in one ``forward_all_chunks``.
* fake_x0 — the critic's conditional x0 prediction in the same layout.
* critic_loss — the critic's ordinary flow loss in that layout (``training.losses.all_chunks_loss``).

Two other settings (CausVid's):

* a bidirectional teacher (``temporal='bidirectional'``, asymmetric distillation): real_x0 and
  fake_x0 see the whole rolled-out clip noised at one level, every frame seeing every other, and the
  critic (a copy of the teacher) learns whole clips (``training.losses.full_clip_loss``);
* diffusion-forcing inputs (``rollout='diffusion-forcing'``) instead of the self rollout: the
  student denoises real clips whose chunks are noised independently to its levels, all chunks in
  one causal forward, and the x0 it predicts is the sample.

With the causal teacher and the self rollout, what is matched is, chunk by chunk, the student's distribution of chunk k given its own
earlier chunks against the teacher's given the same chunks: the objective is the sum over chunks of
per-chunk conditional divergences, and the gradient through the context is dropped (the context
enters detached, as it does in the rollout's cache).
"""

import torch

from ..backbone import Backbone
from ..conditioning import classifier_free_guidance
from ..stream import StreamSession
from ..training.losses import Draws, all_chunks_loss, clip_frames, full_clip_loss
from .dmd import DMDProblem


ROLLOUTS = ("self", "diffusion-forcing")


class VideoDMD:
    """The video problem. ``items(i)`` gives conditioning item i ({"caption"?, "video"?}) of a pool
    of ``pool`` items; ``encode(captions) -> Text`` for text models. Clips of ``frames`` frames,
    ``batch`` per iteration; the teacher guided at ``guidance``; ``autocast`` for every network call."""

    def __init__(self, student: Backbone, teacher: Backbone, critic: Backbone,
                 levels: list[float], frames: int, batch: int, items, pool: int, encode=None,
                 guidance: float = 4.0, autocast: torch.dtype | None = None, exit_step: str = "random",
                 rollout: str = "self", rows=None):
        cfg = student.config
        student.require_causal("the student")
        if critic.config != teacher.config:
            raise ValueError("the critic's model config differs from the teacher's (it starts as a copy of it)")
        self.bidirectional = teacher.config.temporal == "bidirectional"
        if self.bidirectional:  # the real and fake scores see the whole rolled-out clip at once
            t = teacher.config
            same = ("in_channels", "frame_size", "conditioning", "num_classes", "text_dim", "objective")
            if any(getattr(t, k) != getattr(cfg, k) for k in same):
                raise ValueError(f"the bidirectional teacher and the student differ in one of {', '.join(same)}")
            if cfg.prefix_frames or frames > t.clip_length or frames % cfg.chunk_frames:
                raise ValueError(f"frames={frames}: with a bidirectional teacher the DMD clip is whole chunks of "
                                 f"{cfg.chunk_frames}, at most its clip_length {t.clip_length}, from a prompt alone")
        else:
            if frames != clip_frames(cfg):
                raise ValueError(f"frames={frames}: the DMD clip is the training clip of this model, "
                                 f"{clip_frames(cfg)} frames (the critic learns in that layout)")
            if teacher.config != cfg:
                raise ValueError("the teacher's model config differs from the student's")
        if exit_step not in ("random", "last"):
            raise ValueError(f"exit_step must be 'random' or 'last', got {exit_step!r}")
        if rollout not in ROLLOUTS:
            raise ValueError(f"rollout must be one of {', '.join(ROLLOUTS)}, got {rollout!r}")
        self.student, self.teacher, self.critic = student, teacher, critic
        self.levels, self.frames, self.batch = [float(s) for s in levels], frames, batch
        self.items, self.pool, self.encode = items, pool, encode
        self.guidance, self.autocast, self.exit_step, self.rollout = guidance, autocast, exit_step, rollout
        self.real_guidance, self.score_precision = guidance, "autocast"  # until ``configure``
        # several ranks: each generates and scores only its rows of the batch (``parallel.Rows``), every
        # draw made for the whole batch and cut, so together they compute one process's iteration
        if rows is not None and rows.total != batch:
            raise ValueError(f"rows of a batch of {rows.total} for a DMD batch of {batch}")
        self.rows = rows

    def configure(self, config) -> None:
        """The DMD settings this problem implements: the real score's guidance (``real_guidance``;
        None: ``guidance``, the ODE pairs') and the precision of the real and fake x0 predictions."""
        self.real_guidance = self.guidance if config.real_guidance is None else float(config.real_guidance)
        self.score_precision = config.score_precision

    def problem(self) -> DMDProblem:
        cfg = self.student.config
        return DMDProblem(self.generate, self.real_x0, self.fake_x0, self.critic_loss,
                          chunk_frames=cfg.chunk_frames if not cfg.prefix_frames else None,
                          real_parts=self.real_parts, configure=self.configure, rows=self.rows)

    def _amp(self, precision: str = "autocast"):
        """The run's autocast, or none (``precision='float32'``: the scores in the models' dtype)."""
        dev = self.student.device.type
        if self.autocast and precision == "autocast":
            return torch.autocast(dev, dtype=self.autocast)
        return torch.autocast(dev, enabled=False)

    def generate(self, g: torch.Generator, grad: bool):
        """(x, cond): the rollout's generated frames (B, C, F - p, H, W) and what they are conditioned
        on, {"prompt", "labels", "first"} (raw: each network prepares its own ``Condition``)."""
        cfg, model = self.student.config, self.student
        idx = self._take(torch.randint(self.pool, (self.batch,), generator=g).tolist())
        seeds = self._take(torch.randint(2**31 - 1, (self.batch,), generator=g).tolist())
        exit_step = (len(self.levels) - 1 if self.exit_step == "last"
                     else int(torch.randint(len(self.levels), (1,), generator=g)))
        rows = [self.items(i) for i in idx]
        kw = dict(levels=self.levels, seed=seeds, autocast=self.autocast, batch=len(idx))
        prompt = self.encode([r.get("caption", "") for r in rows]) if cfg.conditioning == "text" else None
        labels = torch.tensor([r["label"] for r in rows]) if cfg.conditioning == "class" else None
        first = None
        if cfg.prefix_frames:
            first = torch.stack([r["video"][:, :cfg.prefix_frames] for r in rows]).to(model.device, model.dtype)
        cond = {"prompt": prompt, "labels": labels, "first": first}
        if self.rollout == "diffusion-forcing":
            clips = torch.stack([r["video"][:, :self.frames] for r in rows]).to(model.device, model.dtype)
            return self._diffusion_forcing(clips, prompt, labels, g, grad), cond
        session = StreamSession(model, first_frames=first, prompt=prompt, labels=labels, **kw)
        if first is not None:
            session.next_chunk()
        n = (self.frames - cfg.prefix_frames) // cfg.chunk_frames
        chunks = [session.next_chunk(last=k == n - 1, exit_step=exit_step, grad=grad) for k in range(n)]
        return torch.cat(chunks, dim=2), cond

    def _diffusion_forcing(self, clips, prompt, labels, g, grad):
        """CausVid's rollout: real clips (B, C, F, H, W), every chunk noised on its own to one of the
        student's levels, denoised in one causal forward (each chunk sees the noisy chunks before it);
        the x0 prediction of the generated frames (B, C, F - p, H, W)."""
        model, cfg = self.student, self.student.config
        B, p, l = clips.shape[0], cfg.prefix_frames, cfg.chunk_frames
        n = (self.frames - p) // l
        j = self._take(torch.randint(len(self.levels), (self.batch, n), generator=g)).repeat_interleave(l, dim=1)
        sigma = torch.tensor(self.levels, dtype=torch.float64)[j].to(model.device)  # (B, F - p)
        noise = self._take(torch.randn((self.batch, *clips.shape[1:2], clips.shape[2] - p, *clips.shape[3:]),
                                       generator=g, dtype=torch.float32)).to(model.device, model.dtype)
        x_t = model.diffusion.add_noise(clips[:, :, p:], noise, sigma)
        x_in = torch.cat([clips[:, :, :p], x_t], dim=2)
        t = torch.cat([torch.zeros(B, p, dtype=torch.float64, device=model.device), model.diffusion.model_time(sigma)], 1)
        with torch.set_grad_enabled(grad), self._amp():
            c = model.condition(B, prompt, labels)
            return model(x_in, t, c, x0=True)[:, :, p:].to(model.dtype)

    def _take(self, whole):
        """This rank's rows of a draw made for the whole batch (all of it without ``rows``)."""
        return whole if self.rows is None else self.rows.take(whole)

    def _context(self, x, first):
        return x if first is None else torch.cat([first.to(x.dtype), x], dim=2)

    def _x0(self, model, x_t, sigma, x, cond, guidance=1.0, parts=False):
        """model's x0 prediction for noisy frames x_t (B, C, F - p, H, W) at sigma (B,), context x;
        with ``parts``, (guided, conditional-only) from the one guided call. Under the run's autocast,
        or in float32 (the models' dtype) with ``score_precision='float32'``."""
        ctx = self._context(x, cond["first"])
        t = model.diffusion.model_time(sigma.to(x.device))[:, None].expand(x.shape[0], x.shape[2])
        if self.bidirectional:  # the whole noisy clip at one level, no clean context
            run = lambda xt, tt, c: model(xt, tt, c, x0=True)  # noqa: E731
        else:
            run = lambda xt, tt, c: model.forward_all_chunks(torch.cat([ctx] * (xt.shape[0] // ctx.shape[0])),  # noqa: E731
                                                             xt, tt, c, x0=True)
        with torch.no_grad(), self._amp(self.score_precision):
            if guidance == 1.0 and not parts:
                return run(x_t, t, model.condition(x.shape[0], cond["prompt"], cond["labels"])).to(x.dtype)
            both = model.guided_condition(x.shape[0], cond["prompt"], cond["labels"])
            pred = run(torch.cat([x_t, x_t]), torch.cat([t, t]), both).to(x.dtype)
        guided = classifier_free_guidance(pred, guidance)
        return (guided, pred.chunk(2)[0]) if parts else guided

    def real_x0(self, x_t, sigma, x, cond):
        return self._x0(self.teacher, x_t, sigma, x, cond, self.real_guidance)

    def real_parts(self, x_t, sigma, x, cond):
        """(the guided real x0, the teacher's conditional-only x0), one guided call: the diagnostic's."""
        return self._x0(self.teacher, x_t, sigma, x, cond, self.real_guidance, parts=True)

    def fake_x0(self, x_t, sigma, x, cond):
        return self._x0(self.critic, x_t, sigma, x, cond)

    def critic_loss(self, x, cond, g, levels=None):
        """The critic's flow loss; its noise levels from the teacher's training law, or from
        ``levels(n, g)`` (DMD's law, ``critic_levels: dmd``)."""
        draws = Draws.of(g, self.rows) if levels is None else _LawDraws(g, levels, self.rows)
        with self._amp():
            c = self.critic.condition(x.shape[0], cond["prompt"], cond["labels"])
            if self.bidirectional:
                return full_clip_loss(self.critic, x, c, draws)
            return all_chunks_loss(self.critic, self._context(x, cond["first"]), c, draws)


class _LawDraws(Draws):
    """The training draws with the noise levels from another law: ``law(n, g) -> (n,) float64``."""

    def __init__(self, g: torch.Generator, law, rows=None):
        super().__init__(g, rows=rows)
        self.law = law

    def levels(self, diffusion, batch: int, n: int) -> torch.Tensor:
        whole = self._whole(batch)
        return self._take(self.law(whole * n, self.batch).view(whole, n))
