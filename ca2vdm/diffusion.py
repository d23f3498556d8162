"""Noise schedules, training targets and samplers, with per-frame noise levels.

Two objectives, chosen by the model config's ``objective``:

* ``flow`` — rectified flow / flow matching: x_s = (1 - s) x0 + s eps, the network predicts the
  velocity v = eps - x0, sampling integrates with Euler over a shifted sigma schedule (the same
  sequence as diffusers' ``FlowMatchEulerDiscreteScheduler``).
* ``eps`` — DDPM with a linear beta schedule, epsilon prediction, sampled with deterministic DDIM
  (eta = 0; the same sequence and update as diffusers' ``DDIMScheduler`` with ``clip_sample=False``).

The network's time input is ``1000 * sigma`` (flow) or the integer DDPM timestep (eps). In both
conventions a clean frame (sigma = 0) is told time 0. Every noise level is per frame, shape (B, F),
which is what the Ca2-VDM recipe needs (clean prefix frames beside noisy frames). Sampling schedules
are host-side Python floats: a sampler step never synchronises with the device.
"""

import math

import torch


def mix_seed(*xs: int) -> int:
    """Deterministic 63-bit hash of integers (splitmix64 steps), for per-(seed, sample, chunk) seeds."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def _per_frame(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, F) coefficients -> broadcastable to x (B, C, F, H, W)."""
    return a.to(x.dtype)[:, None, :, None, None]


class Sampler:
    """A sampling schedule: ``timesteps[i]`` is fed to the network at step i, ``step`` updates x."""

    predicts_x0 = False  # ``step`` takes the objective's output (velocity or noise)

    def __init__(self, diffusion, timesteps: list[float], coefs: list[tuple[float, float]]):
        self.diffusion = diffusion
        self.timesteps = timesteps
        self.coefs = coefs  # per step: the two scalars the update needs

    def __len__(self) -> int:
        return len(self.timesteps)

    def step(self, x: torch.Tensor, out: torch.Tensor, i: int) -> torch.Tensor:
        """x at step i and the network output -> x at step i + 1."""
        return self.diffusion.update(x, out, *self.coefs[i])

    def level(self, i: int) -> float:
        """The noise level of step i's input as a share of pure noise: sigma (flow), sqrt(1 - abar) (eps)."""
        return self.diffusion.noise_share(self.coefs[i][0])

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """Clean frames x0 noised to step i's level (where video-to-video enters the schedule)."""
        return self.diffusion.noised(x0, noise, self.coefs[i][0])


class FewStepSampler:
    """Few-step sampling (CausVid, Self-Forcing): at level sigma_i the network's clean-frame (x0)
    prediction is taken as it is and re-noised to sigma_{i+1} with fresh noise; the last level's
    x0 is the output. ``step`` takes that noise, drawn by the caller per (seed, sample, chunk, step)."""

    predicts_x0 = True

    def __init__(self, diffusion, levels):
        levels = [float(s) for s in levels]
        if not levels:
            raise ValueError("few-step sampling needs at least one noise level")
        if levels[0] != 1.0 or any(not 0 < b < a for a, b in zip(levels, levels[1:])) or levels[-1] <= 0:
            raise ValueError(f"noise levels must start at 1 (pure noise) and decrease strictly within (0, 1], "
                             f"got {levels}")
        self.diffusion, self.levels = diffusion, levels
        self.timesteps = [s * diffusion.num_train_timesteps for s in levels]

    def __len__(self) -> int:
        return len(self.levels)

    def step(self, x: torch.Tensor, x0: torch.Tensor, i: int, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x0 predicted at level i -> x at level i + 1: (1 - s) x0 + s noise; the last step returns x0."""
        if i == len(self.levels) - 1:
            return x0
        s = self.levels[i + 1]
        return (1 - s) * x0 + s * noise

    def level(self, i: int) -> float:
        """The noise level sigma_i of step i's input."""
        return self.levels[i]

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """Clean frames x0 noised to level sigma_i."""
        s = self.levels[i]
        return (1 - s) * x0 + s * noise


class FlowMatching:
    """Rectified flow with velocity prediction and an Euler sampler on a shifted schedule."""

    objective = "flow"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        self.num_train_timesteps = num_train_timesteps
        self.shift = shift

    def shifted(self, sigma: float) -> float:
        return self.shift * sigma / (1 + (self.shift - 1) * sigma)

    # -- sampling ----------------------------------------------------------------------------
    def sampler(self, steps: int) -> Sampler:
        """Sigmas as diffusers computes them: linspace between the (shifted) training extremes, shifted."""
        n = self.num_train_timesteps
        s_max, s_min = self.shifted(1.0), self.shifted(1.0 / n)
        ts = [s_max * n + (s_min * n - s_max * n) * i / (steps - 1) for i in range(steps)] if steps > 1 else [s_max * n]
        sigmas = [self.shifted(t / n) for t in ts] + [0.0]
        coefs = [(sigmas[i], sigmas[i + 1]) for i in range(steps)]
        return Sampler(self, [s * n for s in sigmas[:-1]], coefs)

    @staticmethod
    def update(x, v, sigma: float, sigma_next: float):
        """Euler step of dx/dsigma = v."""
        return x + (sigma_next - sigma) * v

    @staticmethod
    def noise_share(sigma: float) -> float:
        return sigma

    @staticmethod
    def noised(x0, noise, sigma: float):
        """x_sigma = (1 - sigma) x0 + sigma noise for a host float sigma."""
        return (1 - sigma) * x0 + sigma * noise

    def few_step_sampler(self, levels) -> "FewStepSampler":
        """A sampler over an explicit list of noise levels sigma_1 = 1 > ... > sigma_K > 0."""
        return FewStepSampler(self, levels)

    def warped_levels(self, steps: int, shift: float | None = None) -> list[float]:
        """``steps`` levels evenly spaced in (0, 1] from 1 down, then shifted toward high noise:
        [1, s(1 - 1/K), ..., s(1/K)] with s the timestep shift (``shift`` or the schedule's)."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        k = self.shift if shift is None else shift
        return [k * u / (1 + (k - 1) * u) for u in (1 - i / steps for i in range(steps))]

    def x0_from(self, x, v, t):
        """The clean frames a velocity v implies for x at network time t (B, F): x - sigma v."""
        sigma = (t / self.num_train_timesteps).to(x.dtype)[:, None, :, None, None]
        return x - sigma * v

    # -- training ----------------------------------------------------------------------------
    def sample_levels(self, shape, generator=None, device=None) -> torch.Tensor:
        """Random training noise levels sigma in (0, 1], shifted like the sampling schedule."""
        u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
        u = u.clamp_min(1.0 / self.num_train_timesteps)
        return self.shift * u / (1 + (self.shift - 1) * u)

    def model_time(self, level: torch.Tensor) -> torch.Tensor:
        return level * self.num_train_timesteps

    def add_noise(self, x0, noise, level):
        """x_sigma for per-frame sigma (B, F); sigma = 0 leaves a frame clean."""
        s = _per_frame(level, x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0, noise, level):
        return noise - x0


class DDPM:
    """Epsilon-prediction DDPM (linear betas) with a deterministic DDIM sampler."""

    objective = "eps"

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02, spacing: str = "trailing"):
        if spacing not in ("leading", "trailing"):
            raise ValueError(f"timestep spacing must be 'leading' or 'trailing', got {spacing!r}")
        self.num_train_timesteps = num_train_timesteps
        self.spacing = spacing
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)  # (N,) float64, host
        self._abar = self.alphas_cumprod.tolist()

    # -- sampling ----------------------------------------------------------------------------
    def sampler(self, steps: int) -> Sampler:
        n = self.num_train_timesteps
        if self.spacing == "leading":  # diffusers' default
            ratio = n // steps
            ts = [i * ratio for i in range(steps)][::-1]
        else:  # "trailing": the first step starts from (almost) pure noise
            ratio = n / steps
            ts = [round(n - i * ratio) - 1 for i in range(steps)]
        coefs = []
        for t in ts:
            prev = t - n // steps
            a_prev = self._abar[prev] if prev >= 0 else 1.0
            coefs.append((self._abar[t], a_prev))
        return Sampler(self, [float(t) for t in ts], coefs)

    def x0_from(self, x, eps, t):
        """The clean frames a noise prediction implies for x at integer timestep t (B, F)."""
        a = self.alphas_cumprod.to(x.device)[t.long()]  # (B, F)
        return (x - _per_frame((1 - a).sqrt(), x) * eps) / _per_frame(a.sqrt(), x)

    def few_step_sampler(self, levels):
        raise ValueError("few-step levels are defined for objective='flow' (re-noising x0 to sigma)")

    @staticmethod
    def noise_share(abar: float) -> float:
        return math.sqrt(1 - abar)

    @staticmethod
    def noised(x0, noise, abar: float):
        """x_t = sqrt(abar) x0 + sqrt(1 - abar) noise for a host float abar."""
        return math.sqrt(abar) * x0 + math.sqrt(1 - abar) * noise

    @staticmethod
    def update(x, eps, a_t: float, a_prev: float):
        """DDIM (eta = 0): predict x0, then move to the previous noise level along eps."""
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps

    # -- training ----------------------------------------------------------------------------
    def sample_levels(self, shape, generator=None, device=None) -> torch.Tensor:
        """Random integer training timesteps in [0, N)."""
        return torch.randint(0, self.num_train_timesteps, shape, generator=generator, device=device)

    def model_time(self, level: torch.Tensor) -> torch.Tensor:
        return level.to(torch.float64)

    def add_noise(self, x0, noise, level):
        a = self.alphas_cumprod.to(x0.device)[level.long()]  # (B, F)
        return _per_frame(a.sqrt(), x0) * x0 + _per_frame((1 - a).sqrt(), x0) * noise

    def target(self, x0, noise, level):
        return noise


def make_diffusion(objective: str, num_train_timesteps: int = 1000, shift: float = 1.0,
                   beta_start: float = 1e-4, beta_end: float = 0.02, spacing: str = "trailing"):
    """The schedule for a model config's ``objective`` ('flow' or 'eps')."""
    if objective == "flow":
        return FlowMatching(num_train_timesteps, shift)
    if objective == "eps":
        return DDPM(num_train_timesteps, beta_start, beta_end, spacing)
    raise ValueError(f"objective must be 'flow' or 'eps', got {objective!r}")
