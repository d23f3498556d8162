"""Does the critic track the student? A diagnostic of the DMD scores on a fixed probe batch.

``score_diagnostic(problem, config)``: the current generator samples a probe batch x (no gradient)
from a generator seeded by ``config.seed`` alone, so every call sees the same conditioning, noise
and exit step. For each of ``buckets`` equal slices of [level_min, level_max] the probe is noised
with fixed noise at the slice's middle level sigma_b, and with

    real  = the guided real x0 prediction, uncond + w (cond - uncond)  (w: the real score's guidance)
    cond  = the teacher's conditional-only x0 prediction (same call)
    fake  = the critic's x0 prediction
    norm  = mean |x - real| per sample (per sample and chunk with ``chunk_normaliser``): dmd_gradient's

it reports, averaged over the probe's samples:

    ratio_b  = mean |fake - real| / norm           the size of the DMD gradient (dmd_gradient's mean |.|)
    guide_b  = mean |cond - real| / norm           the size the guidance term alone would give it
    cos_b    = cos(fake - real, cond - real)       over all of a sample's values

``cond - real = (1 - w)(cond - uncond)``: the direction in which the real score's guidance moves the
prediction, reversed (for w > 1). A critic that has learned nothing (the teacher's conditional
prediction) has fake = cond: cos 1 and ratio = guide, the whole gradient the guidance term (the
student is pushed to be more guided than the teacher's conditional distribution, however guided it
already is). A critic tracking the student has ratio well below guide, and a cosine that says how
much of what is left is guidance (0: none of it; negative: the student is over-guided). Without
``problem.real_parts`` (no guidance) cos and guide are NaN.
"""

import math

import torch

from ..diffusion import mix_seed
from .dmd import DMDConfig, DMDProblem, _noised, dmd_gradient

PROBE_STREAM = 7  # the probe's seed: mix_seed(config.seed, PROBE_STREAM), no iteration in it


def bucket_levels(config: DMDConfig, buckets: int = 4) -> list[float]:
    """The middle level of each of ``buckets`` equal slices of [level_min, level_max]."""
    w = (config.level_max - config.level_min) / buckets
    return [config.level_min + (k + 0.5) * w for k in range(buckets)]


def diagnostic_columns(config: DMDConfig, buckets: int = 4) -> list[str]:
    return [f"diag_{m}_s{s:.2f}" for s in bucket_levels(config, buckets) for m in ("ratio", "cos", "guide")]


def _per_sample_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


@torch.no_grad()
def score_diagnostic(problem: DMDProblem, config: DMDConfig, buckets: int = 4) -> dict[str, float]:
    """{"diag_ratio_s0.14": ..., "diag_cos_s0.14": ..., "diag_guide_s0.14": ..., ...} (the module
    docstring defines them); the keys are ``diagnostic_columns``."""
    g = torch.Generator().manual_seed(mix_seed(config.seed, PROBE_STREAM))
    x, cond = problem.generate(g, False)
    x = x.detach()
    chunk = problem.chunk_frames if config.chunk_normaliser else None
    out = {}
    for k, s in enumerate(bucket_levels(config, buckets)):
        gk = torch.Generator().manual_seed(mix_seed(config.seed, PROBE_STREAM, k + 1))
        sigma = torch.full((x.shape[0],), s, dtype=torch.float64)
        x_t = _noised(x, sigma, gk)
        if problem.real_parts is not None:
            real, real_cond = problem.real_parts(x_t, sigma, x, cond)
        else:
            real, real_cond = problem.real_x0(x_t, sigma, x, cond), None
        fake = problem.fake_x0(x_t, sigma, x, cond)
        ratio = dmd_gradient(x, real, fake, chunk).abs().flatten(1).mean(1)
        nan = torch.full_like(ratio, math.nan, dtype=torch.float64)
        guide = nan if real_cond is None else dmd_gradient(x, real, real_cond, chunk).abs().flatten(1).mean(1)
        cos = nan if real_cond is None else _per_sample_cos(fake - real, real_cond - real)
        for name, v in (("ratio", ratio), ("cos", cos), ("guide", guide)):
            out[f"diag_{name}_s{s:.2f}"] = v.double().mean().item()
    return out


def read_diagnostic(metrics_csv) -> list[dict]:
    """The rows of a DMD stage's metrics.csv that hold the diagnostic (every ``diagnose_every``)."""
    import csv

    with open(metrics_csv, newline="") as f:
        return [r for r in csv.DictReader(f) if any(k.startswith("diag_ratio_") and r.get(k) for k in r)]


def buckets_of(row: dict) -> list[str]:
    """The noise-level buckets a diagnostic row holds, as in its keys: ["s0.14", "s0.38", ...]."""
    return [k[len("diag_ratio_"):] for k in row if k.startswith("diag_ratio_")]


def plot_diagnostic(metrics_csv, path) -> bool:
    """ratio, guide (left) and cos (right) per bucket against the iteration, from a DMD stage's
    metrics.csv; False (and nothing written) if it holds no diagnostic rows."""
    rows = read_diagnostic(metrics_csv)
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = buckets_of(rows[0])
    it = [int(r["iteration"]) for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for i, s in enumerate(levels):
        c = f"C{i}"
        ax.plot(it, [float(r[f"diag_ratio_{s}"]) for r in rows], color=c, label=f"|fake-real|/norm, sigma {s[1:]}")
        ax.plot(it, [float(r[f"diag_guide_{s}"]) for r in rows], color=c, ls="--", lw=1)
        bx.plot(it, [float(r[f"diag_cos_{s}"]) for r in rows], color=c, label=f"sigma {s[1:]}")
    ax.set(xlabel="iteration", ylabel="over the DMD normaliser", title="DMD gradient size (dashed: guidance term)")
    bx.set(xlabel="iteration", ylabel="cosine", title="cos(fake - real, cond - real)", ylim=(-1.05, 1.05))
    bx.axhline(0, color="grey", lw=0.5)
    ax.legend(fontsize=7)
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
