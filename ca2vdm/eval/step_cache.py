"""Step caching, measured: quality against speed of every policy on the same prompts and seeds.

Uncached generation and every step-cache policy run in this process on the captions of held-out
moving-digits clips; each is measured against the uncached videos (PSNR / SSIM per chunk) and with
the moving-digits figures; the equal-compute baseline is uncached generation with fewer steps.
"""

import time

import torch

from ..bench import device_name
from ..checkpoint import guidance_for, load_checkpoint
from ..conditioning import Text
from ..generate import GenerationStats, generate
from ..metrics.digit_classifier import load_classifier
from ..metrics.digits import digit_report
from ..metrics.fidelity import fidelity
from .digits import held_out_clips


STEP_CACHE_POLICIES = ("adacache", "adacache-moreg", "fixed:1", "fixed:2", "first-block:0.12")


def _timed_generation(model, frames, prompts, steps, guidance, seeds, batch, step_cache=None):
    """Generate every video (in batches) with an optional step-cache policy; returns the videos
    (B, C, F, H, W) on the CPU in float32, wall seconds and the fraction of steps computed."""
    out, computed, total, seconds = [], 0, 0, 0.0
    for b in range(0, len(prompts), batch):
        stats = GenerationStats()
        t0 = time.perf_counter()
        video = torch.cat(list(generate(model, frames, prompt=Text.cat(prompts[b:b + batch]), steps=steps,
                                        guidance=guidance, seed=seeds[b:b + batch], step_cache=step_cache,
                                        stats=stats)), dim=2)
        seconds += time.perf_counter() - t0
        out.append(video.float().cpu())
        computed, total = computed + stats.steps_computed, total + stats.steps_total
    return torch.cat(out).clamp(-1, 1), seconds, computed / total


def step_cache_report(checkpoint, videos: int = 8, frames: int = 64, steps: int = 20, guidance: float | None = None,
                      seed: int = 2000, policies=STEP_CACHE_POLICIES, batch: int = 8, log=print) -> dict:
    """Run uncached generation and every step-cache policy on the same prompts and seeds, in this
    process, and measure each against the uncached videos.

    Prompts are the captions of held-out moving-digits clips (split ``val``, seeds from ``seed``).
    Per run: wall seconds, speedup over uncached, fraction of denoising steps computed, PSNR/SSIM
    against the uncached output per chunk, and the moving-digits figures (``digit_report``). The
    equal-compute baseline runs uncached with fewer sampling steps: round(steps x fraction) for
    every distinct fraction a policy reached.
    """
    from ..text import get_text_encoder

    guidance = guidance_for(checkpoint, guidance)
    model = load_checkpoint(checkpoint)
    cfg = model.config
    items = held_out_clips(checkpoint, model, videos, frames, seed)
    enc = get_text_encoder("cpu")
    prompts = [Text(*enc.encode([it["caption"]])) for it in items]
    seeds = [seed + i for i in range(videos)]
    classifier = load_classifier()
    gt = torch.stack([it["video"] for it in items])
    digits = [it["digits"] for it in items]
    l = cfg.chunk_frames

    log("  warm-up ...")
    _timed_generation(model, cfg.prefix_frames + 2 * l, prompts[:1], 2, guidance, seeds[:1], 1)

    def measure(name, video, seconds, fraction, run_steps, reference, ref_seconds):
        row = dict(name=name, steps=run_steps, seconds=seconds, fraction_computed=fraction,
                   speedup=ref_seconds / seconds if ref_seconds else 1.0)
        row.update(fidelity(video, reference, l))
        rep = digit_report(classifier, video, digits, gt, chunk_frames=l, horizons=())
        row["digits"] = {k: rep["overall"][k] for k in ("acc_mean", "acc_gt_mean", "acc_ratio", "speed_ratio",
                                                         "brightness_drift", "brightness_drift_gt")}
        log(f"  {name:<22} {fraction:6.1%} computed  {row['speedup']:5.2f}x  PSNR {row['psnr']:6.2f} dB  "
            f"SSIM {row['ssim']:.4f}  digit acc {row['digits']['acc_mean']:.3f}")
        return row

    log(f"  uncached, {steps} steps ...")
    reference, ref_seconds, _ = _timed_generation(model, frames, prompts, steps, guidance, seeds, batch)
    runs = [measure("uncached", reference, ref_seconds, 1.0, steps, reference, ref_seconds)]
    for policy in policies:
        video, seconds, fraction = _timed_generation(model, frames, prompts, steps, guidance, seeds, batch, policy)
        runs.append(dict(measure(policy, video, seconds, fraction, steps, reference, ref_seconds), policy=policy))
    fewer = sorted({max(1, round(steps * r["fraction_computed"])) for r in runs[1:]} - {steps}, reverse=True)
    baselines = []
    for n in fewer:
        video, seconds, fraction = _timed_generation(model, frames, prompts, n, guidance, seeds, batch)
        baselines.append(measure(f"uncached, {n} steps", video, seconds, n / steps, n, reference, ref_seconds))
    return dict(device=device_name("cpu"), checkpoint=str(checkpoint), videos=videos, frames=frames, steps=steps,
                guidance=guidance, seed=seed, chunk_frames=l, runs=runs, fewer_steps=baselines)


@torch.no_grad()
def held_context_report(checkpoint, videos: int = 8, frames: int = 64, steps: int = 20, guidance: float | None = None,
                        seed: int = 2000, policies=STEP_CACHE_POLICIES, fewer_steps=None, batch: int = 8,
                        log=print) -> dict:
    """Step-cache error with the context held identical: each policy (and each uncached run with
    fewer steps) denoises chunk k against the cache of the uncached ``steps``-step run
    (``StreamSession.draft_chunk``, then ``extend`` with the reference chunk), so a chunk's error is
    that chunk's own and never the trajectory's divergence. Rows: fraction of block-stack steps
    computed, PSNR / SSIM per chunk and overall against the reference chunks. ``fewer_steps``
    defaults to 80%, 55%, 50% and 40% of ``steps`` (the shares the policies reach on the shipped model)."""
    from ..stream import StreamSession
    from ..text import get_text_encoder

    guidance = guidance_for(checkpoint, guidance)
    model = load_checkpoint(checkpoint)
    cfg = model.config
    if cfg.prefix_frames:
        raise ValueError("held_context_report expects a model that starts from a prompt alone")
    items = held_out_clips(checkpoint, model, videos, frames, seed)
    enc = get_text_encoder("cpu")
    if fewer_steps is None:
        fewer_steps = sorted({max(1, round(steps * f)) for f in (0.8, 0.55, 0.5, 0.4)} - {steps}, reverse=True)
    candidates = [(p, dict(steps=steps, step_cache=p)) for p in policies]
    candidates += [(f"uncached, {n} steps", dict(steps=n)) for n in fewer_steps]
    drafts, refs, counts = {name: [] for name, _ in candidates}, [], {name: [0, 0] for name, _ in candidates}
    n_chunks = frames // cfg.chunk_frames
    for b in range(0, videos, batch):
        part = items[b:b + batch]
        kw = dict(prompt=Text(*enc.encode([it["caption"] for it in part])), guidance=guidance,
                  seed=[seed + b + i for i in range(len(part))])
        ref = StreamSession(model, steps=steps, **kw)
        others = {name: StreamSession(model, **kw, **c) for name, c in candidates}
        ref_chunks, got = [], {name: [] for name in others}
        for _ in range(n_chunks):
            for name, s in others.items():
                got[name].append(s.draft_chunk())
            ref_chunks.append(ref.next_chunk())
            for s in others.values():
                s.extend(ref_chunks[-1])
        refs.append(torch.cat(ref_chunks, dim=2).float().cpu())
        for name, s in others.items():
            drafts[name].append(torch.cat(got[name], dim=2).float().cpu())
            c = counts[name]
            c[0] += s.stats.steps_computed
            c[1] += s.stats.steps_total
        log(f"  {b + len(part)}/{videos} videos")
    reference = torch.cat(refs).clamp(-1, 1)
    rows = []
    for name, c in candidates:
        fraction = counts[name][0] / counts[name][1] * (c["steps"] / steps)
        row = dict(name=name, fraction_computed=fraction)
        row.update(fidelity(torch.cat(drafts[name]).clamp(-1, 1), reference, cfg.chunk_frames))
        rows.append(row)
        log(f"  {name:<22} {fraction:6.1%} computed  PSNR {row['psnr']:6.2f} dB  SSIM {row['ssim']:.4f}")
    return dict(device=device_name("cpu"), checkpoint=str(checkpoint), videos=videos, frames=frames, steps=steps,
                guidance=guidance, seed=seed, chunk_frames=cfg.chunk_frames, rows=rows)


def format_held_context_table(report: dict) -> str:
    lines = [f"context held identical: every chunk denoised against the uncached {report['steps']}-step run's cache",
             f"{'run':<24}{'computed':>9}{'PSNR dB':>9}{'SSIM':>8}{'worst chunk PSNR':>18}"]
    for r in report["rows"]:
        lines.append(f"{r['name']:<24}{r['fraction_computed']:>9.1%}{r['psnr']:>9.2f}{r['ssim']:>8.4f}"
                     f"{min(r['psnr_per_chunk']):>18.2f}")
    return "\n".join(lines)


def format_step_cache_table(report: dict) -> str:
    lines = [f"device: {report['device']}   {report['videos']} videos x {report['frames']} frames   "
             f"{report['steps']} steps   guidance {report['guidance']}",
             f"{'run':<24}{'computed':>9}{'speedup':>9}{'PSNR dB':>9}{'SSIM':>8}{'digit acc':>11}"
             f"{'last-chunk PSNR':>17}"]
    for r in report["runs"] + report["fewer_steps"]:
        psnr = "inf" if r["psnr"] is None else f"{r['psnr']:.2f}"
        lines.append(f"{r['name']:<24}{r['fraction_computed']:>9.1%}{r['speedup']:>9.2f}{psnr:>9}"
                     f"{r['ssim']:>8.4f}{r['digits']['acc_mean']:>11.3f}{r['psnr_per_chunk'][-1]:>17.2f}")
    lines.append("PSNR / SSIM are against the uncached videos with the same seeds (100 dB = identical).")
    return "\n".join(lines)


def plot_step_cache(report: dict, path: str) -> None:
    """Quality (PSNR vs uncached) against speedup; per-chunk PSNR over time for every policy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in report["runs"][1:]:
        ax.scatter(r["speedup"], r["psnr"], s=40)
        ax.annotate(r["name"], (r["speedup"], r["psnr"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        bx.plot(range(1, len(r["psnr_per_chunk"]) + 1), r["psnr_per_chunk"], marker=".", label=r["name"])
    base = sorted(report["fewer_steps"], key=lambda r: r["speedup"])
    if base:
        ax.plot([r["speedup"] for r in base], [r["psnr"] for r in base], "k--", marker="s", ms=4,
                label="fewer sampling steps (uncached)")
        for r in base:
            ax.annotate(f"{r['steps']} steps", (r["speedup"], r["psnr"]), textcoords="offset points",
                        xytext=(5, -10), fontsize=7)
        ax.legend(fontsize=8)
    ax.set_xlabel("wall-time speedup over uncached")
    ax.set_ylabel("PSNR vs uncached (dB)")
    ax.set_title(f"{report['videos']} videos x {report['frames']} frames, {report['steps']} steps")
    ax.grid(alpha=0.3)
    bx.set_xlabel("chunk")
    bx.set_ylabel("PSNR vs uncached (dB)")
    bx.set_title("drift over the video")
    bx.legend(fontsize=7)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
