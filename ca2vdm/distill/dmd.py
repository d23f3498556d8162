"""Distribution matching distillation (DMD; CausVid, Self-Forcing): a few-step generator learns to
sample the teacher's distribution, guided by the difference of two scores on its own samples.

One iteration (``DMD.step``), as in the papers' algorithm::

    if iteration % ratio == 0:                         # the generator steps once every `ratio` iterations
        x, c   <- generate()                           # with gradient; c: its conditioning
        sigma  <- warped toward high noise, clamped;   x_t <- (1 - sigma) x + sigma eps
        real   <- teacher's x0 prediction at x_t | c   # the real score (guided), no gradient
        fake   <- critic's x0 prediction at x_t | c    # the fake score, no gradient
        grad   <- (fake - real) / mean|x - real|       # normalised per sample (or per chunk)
        loss_G <- 0.5 || x - stopgrad(x - grad) ||^2   # in float64; d loss_G / dx = grad
    x', c' <- generate() without gradient (or the x, c above, x detached)
    loss_C <- the ordinary flow loss of the critic on x' | c' at an independent sigma'
    (separate Adam optimizers, betas (0, 0.999); gradient clipping; an EMA of the generator)

Settings the references separate are separate keys here (``DMDConfig``): the critic's betas and
weight decay (AdamW when > 0), the generator's weight decay, a critic-only warm-up (no generator
update before iteration ``critic_warmup``), the critic's noise-level law (the teacher's training law
or DMD's), and what the problem reads through ``DMDProblem.configure``: the real score's guidance
and the precision of the real and fake scores. ``diagnostic.score_diagnostic`` measures, on a fixed
probe batch, how far the critic is from the real score and how much of that is the guidance term.

Everything the problem defines is a function handed in (``DMDProblem``): how the generator samples,
the real and fake x0 predictions, the critic's loss. The video problem (a causal student, the
teacher's all-chunks forward) and the 2-D toy of the tests are both such problems. Every random
draw of iteration i comes from generators seeded by (seed, i), so a run resumed at any iteration,
also one that is not a multiple of ``ratio``, continues exactly as if it had not stopped.
"""

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch
import torch.nn as nn
from safetensors.torch import load_file

from ..diffusion import mix_seed
from ..safefile import save_safetensors
from ..training import parallel
from ..training.optim import EMA, init_optimizer_state, load_optimizer, optimizer_tensors
from ..training.parallel import clip_grad_norm


# --------------------------------------------------------------------------------------------
# The DMD gradient
# --------------------------------------------------------------------------------------------
def dmd_levels(batch: int, generator: torch.Generator, shift: float = 5.0, low: float = 0.02,
               high: float = 0.98) -> torch.Tensor:
    """(batch,) float64 noise levels: uniform, warped toward high noise by the timestep shift,
    clamped away from both ends (a level of 0 or 1 carries no score difference)."""
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    return (shift * u / (1 + (shift - 1) * u)).clamp(low, high)


def dmd_gradient(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor,
                 chunk_frames: int | None = None) -> torch.Tensor:
    """(fake - real) / mean|x - real|, the normaliser per sample over every dimension but the batch,
    or, for videos (B, C, F, H, W) with ``chunk_frames``, per sample and chunk of frames (the
    per-chunk normaliser a causal teacher suggests: each chunk's divergence has its own scale).
    NaN and inf become 0 (a degenerate sample contributes nothing)."""
    diff = (x - real_x0).abs()
    if chunk_frames is None:
        norm = diff.flatten(1).mean(1).view(-1, *([1] * (x.dim() - 1)))
    else:
        B, C, Fr = x.shape[:3]
        if Fr % chunk_frames:
            raise ValueError(f"{Fr} frames do not split into chunks of {chunk_frames}")
        per = diff.view(B, C, Fr // chunk_frames, chunk_frames, *x.shape[3:]).mean(dim=(1, 3, 4, 5))  # (B, n)
        norm = per.repeat_interleave(chunk_frames, dim=1)[:, None, :, None, None]
    return torch.nan_to_num((fake_x0 - real_x0) / norm, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 || x - stopgrad(x - grad) ||^2 (mean), in float64: its gradient with respect to x is
    grad / x.numel(), so the optimizer sees the score difference and nothing else."""
    x64 = x.double()
    return 0.5 * torch.nn.functional.mse_loss(x64, (x64 - grad.double()).detach())


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
CRITIC_LEVELS = ("teacher", "dmd")
SCORE_PRECISIONS = ("autocast", "float32")


@dataclass
class DMDConfig:
    """Settings of a DMD run (defaults from CausVid and Self-Forcing where they apply)."""

    ratio: int = 5                  # critic steps per generator step
    generator_lr: float = 2e-6
    critic_lr: float | None = None  # default generator_lr / 5
    betas: tuple = (0.0, 0.999)
    grad_clip: float = 10.0
    ema_decay: float = 0.99
    level_shift: float = 5.0        # warp of the DMD noise levels toward high noise
    level_min: float = 0.02
    level_max: float = 0.98
    chunk_normaliser: bool = False  # normalise the gradient per chunk (videos) instead of per sample
    decay_iterations: int = 0       # > 0: both learning rates follow a cosine to min_lr_ratio over these
    min_lr_ratio: float = 0.1
    seed: int = 0
    # -- settings the references separate (issue 26); the defaults keep the behaviour before them
    critic_betas: tuple | None = None   # default betas
    critic_weight_decay: float = 0.0    # > 0: AdamW (decoupled decay; Self-Forcing 0.01)
    generator_weight_decay: float = 0.0  # > 0: AdamW
    critic_warmup: int = 0              # critic-only iterations before the first generator update
    critic_levels: str = "teacher"      # the critic loss's noise levels: "teacher" (its training law) or
                                        # "dmd" (dmd_levels with level_shift / level_min / level_max)
    real_guidance: float | None = None  # guidance of the real score (the problem's; None: the ODE pairs')
    score_precision: str = "autocast"   # real and fake x0 predictions: "autocast" (the run's) or "float32"

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.critic_betas is None:
            self.critic_betas = self.betas
        self.critic_betas = tuple(self.critic_betas)
        for name in ("betas", "critic_betas"):
            b = getattr(self, name)
            if len(b) != 2 or not all(0 <= v < 1 for v in b):
                raise ValueError(f"DMDConfig.{name}={b}: two numbers in [0, 1)")
        for name in ("critic_weight_decay", "generator_weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"DMDConfig.{name}={getattr(self, name)}: must be 0 (Adam) or more (AdamW)")
        if self.critic_warmup < 0:
            raise ValueError(f"DMDConfig.critic_warmup={self.critic_warmup}: must be 0 or more iterations")
        if self.critic_levels not in CRITIC_LEVELS:
            raise ValueError(f"DMDConfig.critic_levels={self.critic_levels!r}: must be one of {', '.join(CRITIC_LEVELS)}")
        if self.real_guidance is not None and not (0 <= self.real_guidance < math.inf):
            raise ValueError(f"DMDConfig.real_guidance={self.real_guidance}: a guidance scale >= 0 (1: none), "
                             "or null for the ODE pairs' teacher_guidance")
        if self.score_precision not in SCORE_PRECISIONS:
            raise ValueError(f"DMDConfig.score_precision={self.score_precision!r}: must be one of "
                             f"{', '.join(SCORE_PRECISIONS)}")
        if self.ratio < 1:
            raise ValueError(f"DMDConfig.ratio={self.ratio}: must be at least 1")
        if self.critic_lr is None:
            self.critic_lr = self.generator_lr / 5
        if self.decay_iterations < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("DMDConfig: decay_iterations must be >= 0 and min_lr_ratio in [0, 1]")
        if not 0 < self.level_min < self.level_max < 1:
            raise ValueError(f"DMDConfig: need 0 < level_min < level_max < 1, got {self.level_min}, {self.level_max}")


@dataclass
class DMDProblem:
    """What DMD is run on. Each function receives the iteration's ``torch.Generator`` where it draws.

    generate(g, grad) -> (x, cond)          the generator's samples (differentiable when grad is True)
                                            and what they were conditioned on (anything; None if nothing)
    real_x0(x_t, sigma, x, cond) -> x0      the teacher's (guided) clean prediction at x_t; sigma (B,)
                                            float64; x the clean samples, detached (a causal model's
                                            context in the all-chunks layout)
    fake_x0(x_t, sigma, x, cond) -> x0      the critic's clean prediction, the same inputs
    critic_loss(x, cond, g) -> loss         the critic's ordinary diffusion loss on detached samples x;
                                            with ``critic_levels: dmd`` called as critic_loss(x, cond, g,
                                            levels=law), law(n, g) -> (n,) float64 levels to noise at
    chunk_frames                            frames per chunk, for the per-chunk normaliser (videos)
    real_parts(x_t, sigma, x, cond)         optional: (real, real_cond), the guided real x0 prediction and
        -> (real, real_cond)                the teacher's conditional-only one from the same call (for the
                                            diagnostic's guidance direction; None: no guidance to measure)
    configure(config)                       optional: reads the ``DMDConfig`` settings the problem
                                            implements (real_guidance, score_precision); called when the
                                            run is built and when ``DMD.load`` adopts a saved config
    rows                                    optional (``parallel.Rows``): generate returns only this rank's
                                            rows of the batch; DMD's own draws (levels, noise) are then made
                                            for the whole batch and cut to them, and the losses logged and
                                            checked are the means over the ranks
    """

    generate: Callable
    real_x0: Callable
    fake_x0: Callable
    critic_loss: Callable
    chunk_frames: int | None = None
    real_parts: Callable | None = None
    configure: Callable | None = None
    rows: object | None = None


def _optimizer(module: nn.Module, lr: float, betas: tuple, weight_decay: float) -> torch.optim.Optimizer:
    if weight_decay > 0:
        return torch.optim.AdamW(module.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    return torch.optim.Adam(module.parameters(), lr=lr, betas=betas)


def _noised(x, sigma, g, rows=None):
    """x_t = (1 - sigma) x + sigma eps, sigma (B,) per sample (eps drawn on the CPU, for the whole
    batch of ``rows`` and cut to this rank's, then moved to x's device)."""
    s = sigma.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
    if rows is None:
        eps = torch.randn(x.shape, generator=g, dtype=torch.float32)
    else:
        eps = rows.take(torch.randn(rows.whole(x.shape), generator=g, dtype=torch.float32))
    return (1 - s) * x + s * eps.to(x.device, x.dtype)


class DMD:
    """A DMD run: generator, critic, their optimizers, the generator's EMA and the iteration count."""

    def __init__(self, generator: nn.Module, critic: nn.Module, problem: DMDProblem, config: DMDConfig):
        self.generator, self.critic, self.problem, self.config = generator, critic, problem, config
        self._adopt(config)
        self.ema = EMA(generator, config.ema_decay)
        self.iteration = 0
        self.cpu_minutes = 0.0  # CPU time the iterations took (all threads), kept across resumes: a budget

    def _adopt(self, config: DMDConfig) -> None:
        """Take ``config``: new optimizers (Adam, or AdamW with weight decay) and the problem's settings."""
        self.config = config
        self.opt_g = _optimizer(self.generator, config.generator_lr, config.betas, config.generator_weight_decay)
        self.opt_c = _optimizer(self.critic, config.critic_lr, config.critic_betas, config.critic_weight_decay)
        if self.problem.configure is not None:
            self.problem.configure(config)

    def generator_due(self) -> bool:
        """Whether this iteration updates the generator: after ``critic_warmup`` critic-only
        iterations, every ``ratio`` iterations from the first (a function of the iteration alone)."""
        cfg = self.config
        return self.iteration >= cfg.critic_warmup and (self.iteration - cfg.critic_warmup) % cfg.ratio == 0

    def _rng(self, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(mix_seed(self.config.seed, self.iteration, stream))

    def generator_step(self) -> dict:
        """One DMD update of the generator (the real and fake scores only read)."""
        cfg, prob = self.config, self.problem
        g = self._rng(0)
        x, cond = prob.generate(g, True)
        rows = prob.rows
        with torch.no_grad():
            sigma = dmd_levels(x.shape[0] if rows is None else rows.total, g, cfg.level_shift, cfg.level_min,
                               cfg.level_max)
            sigma = sigma if rows is None else rows.take(sigma)
            clean = x.detach()
            x_t = _noised(clean, sigma, g, rows)
            real, fake = prob.real_x0(x_t, sigma, clean, cond), prob.fake_x0(x_t, sigma, clean, cond)
            grad = dmd_gradient(clean, real, fake, prob.chunk_frames if cfg.chunk_normaliser else None)
        loss = dmd_loss(x, grad)
        mean = parallel.mean_over_ranks(loss)  # the global batch's (equal shares); NaN on one rank: on all
        if not torch.isfinite(mean):
            raise FloatingPointError(f"generator loss is {mean.item()} at iteration {self.iteration}")
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        parallel.average_gradients(self.generator)  # ddp ranks (FSDP has reduced them in backward)
        norm = clip_grad_norm(self.generator.parameters(), cfg.grad_clip)  # over every rank's shards (FSDP)
        self.opt_g.step()
        self.ema.update(self.generator, (self.iteration - cfg.critic_warmup) // cfg.ratio)
        return {"generator_loss": mean.item(), "generator_grad_norm": norm, "sample": (clean, cond)}

    def critic_step(self, sample: tuple | None = None) -> dict:
        """One update of the critic by its diffusion loss on (detached) generator samples
        (``sample`` = (x, cond) of this iteration's generator update, else newly drawn)."""
        g = self._rng(1)
        if sample is None:
            with torch.no_grad():
                sample = self.problem.generate(g, False)
        x, cond = sample
        cfg = self.config
        if cfg.critic_levels == "dmd":
            law = lambda n, gen: dmd_levels(n, gen, cfg.level_shift, cfg.level_min, cfg.level_max)  # noqa: E731
            loss = self.problem.critic_loss(x.detach(), cond, g, levels=law)
        else:
            loss = self.problem.critic_loss(x.detach(), cond, g)
        mean = parallel.mean_over_ranks(loss)
        if not torch.isfinite(mean):
            raise FloatingPointError(f"critic loss is {mean.item()} at iteration {self.iteration}")
        self.opt_c.zero_grad(set_to_none=True)
        loss.backward()
        parallel.average_gradients(self.critic)
        norm = clip_grad_norm(self.critic.parameters(), self.config.grad_clip)
        self.opt_c.step()
        return {"critic_loss": mean.item(), "critic_grad_norm": norm}

    def lr_factor(self) -> float:
        """The learning-rate multiplier at this iteration (1 without decay): a function of the
        iteration alone, so a resumed run follows the same schedule."""
        cfg = self.config
        if not cfg.decay_iterations:
            return 1.0
        progress = min(1.0, self.iteration / cfg.decay_iterations)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def step(self) -> dict:
        """One iteration: a generator update when due (``generator_due``: every ``ratio`` iterations
        after the critic-only warm-up), then a critic update (on that update's samples, detached, when
        there was one)."""
        f = self.lr_factor()
        for opt, lr in ((self.opt_g, self.config.generator_lr), (self.opt_c, self.config.critic_lr)):
            for group in opt.param_groups:
                group["lr"] = lr * f
        row, sample = {"iteration": self.iteration + 1, "lr_factor": f}, None
        if self.generator_due():
            out = self.generator_step()
            sample = out.pop("sample")
            row.update(out)
        row.update(self.critic_step(sample))
        self.iteration += 1
        return row

    # -- resuming ------------------------------------------------------------------------------
    def live_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor a resume needs, the live ones (loading into them restores the run): both
        networks, the EMA, both optimizers' states (an optimizer that has not stepped yet, the
        generator's in a critic-only warm-up, has none). Under FSDP they are this rank's DTensor shards."""
        out = {f"generator.{k}": v for k, v in self.generator.state_dict().items()}
        out |= {f"critic.{k}": v for k, v in self.critic.state_dict().items()}
        out |= {f"ema.{k}": v for k, v in self.ema.shadow.items()}
        out |= optimizer_tensors(self.opt_g, self.generator, "opt_g")
        return out | optimizer_tensors(self.opt_c, self.critic, "opt_c")

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """``live_tensors`` as whole CPU tensors (one process)."""
        return {k: v.detach().contiguous().cpu() for k, v in self.live_tensors().items()}

    def state_meta(self) -> dict[str, str]:
        return {"iteration": str(self.iteration), "config": json.dumps(asdict(self.config)),
                "cpu_minutes": repr(self.cpu_minutes)}

    def save(self, path) -> None:
        """Write the run to one safetensors file (config and iteration in its metadata), atomically."""
        save_safetensors(self.state_tensors(), path, self.state_meta())

    def save_sharded(self, path, meta: dict, export: dict | None = None) -> None:
        """Every rank's shards of the run to the sharded checkpoint ``path`` (``parallel.save_sharded``:
        atomic, pickle-free, readable at any number of ranks), ``state_meta`` under ``meta["dmd"]``,
        ``export`` (whole tensors: the student ``generate`` loads) beside them. Every rank calls this."""
        stepped = [name for name in ("opt_g", "opt_c") if getattr(self, name).state]
        parallel.save_sharded(path, self.live_tensors(), dict(meta, dmd=dict(self.state_meta(), stepped=stepped)),
                              export)

    def load(self, path) -> list[str]:
        """Resume from ``save``'s file or ``save_sharded``'s directory (saved at any number of ranks):
        weights, EMA, optimizer moments, the iteration and the run's own settings (the ``DMDConfig``
        saved with it, which wins over this object's: a resumed run continues the run that was saved).
        Returns the names of the settings that differed."""
        from safetensors import safe_open

        tensors = None
        if parallel.is_sharded_checkpoint(path):
            from ..checkpoint import read_config

            meta = read_config(path).get("dmd", {})
        elif parallel.is_sharded(self.generator):
            raise ValueError(f"{path} is a one-file DMD state: the sharded run (parallel: fsdp) resumes from a "
                             "sharded checkpoint; resume this one with parallel: ddp")
        else:
            try:
                with safe_open(str(path), "pt") as f:
                    meta = f.metadata() or {}
                tensors = load_file(str(path))
            except Exception as e:  # a truncated or foreign file
                raise ValueError(f"cannot read the DMD state {path}: {e}") from e
        if "iteration" not in meta:
            raise ValueError(f"{path} is not a DMD state (no iteration in its metadata)")
        try:  # a file from before a setting existed lacks its key: the default (the behaviour then)
            saved = DMDConfig(**json.loads(meta["config"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: the DMD settings saved with it cannot be read ({e})") from e
        changed = [f.name for f in fields(DMDConfig) if getattr(saved, f.name) != getattr(self.config, f.name)]
        self._adopt(saved)  # the optimizers of the saved settings (Adam or AdamW, betas) before their state
        if tensors is None:  # the shards, read into the live tensors (any number of ranks)
            for name in meta.get("stepped", []):  # moments to read into (their values are the saved ones)
                init_optimizer_state(getattr(self, name))
            parallel.load_sharded(path, self.live_tensors())
            self.iteration = int(meta["iteration"])
            self.cpu_minutes = float(meta.get("cpu_minutes", 0.0))
            return changed
        pick = lambda p: {k[len(p) + 1:]: v for k, v in tensors.items() if k.startswith(p + ".")}  # noqa: E731
        self.generator.load_state_dict(pick("generator"))
        self.critic.load_state_dict(pick("critic"))
        device = next(iter(self.ema.shadow.values())).device  # the generator's
        self.ema.shadow = {k: v.to(device, torch.float32, copy=True) for k, v in pick("ema").items()}
        load_optimizer(self.opt_g, self.generator, tensors, "opt_g", path)
        load_optimizer(self.opt_c, self.critic, tensors, "opt_c", path)
        self.iteration = int(meta["iteration"])
        self.cpu_minutes = float(meta.get("cpu_minutes", 0.0))
        return changed
