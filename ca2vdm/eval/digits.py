"""The moving-digits evaluation: prompt a checkpoint with the captions of held-out clips and measure
its videos against those clips (``metrics.digits.digit_report``, and FVD)."""

import time

import torch

from ..checkpoint import load_checkpoint, read_config, sampling_for
from ..conditioning import Text
from ..data import MovingDigits
from ..generate import generate_clip, generate_video
from ..metrics.digit_classifier import load_classifier
from ..metrics.digits import digit_report
from ..metrics.fvd import add_fvd


def held_out_clips(checkpoint, model, videos: int, frames: int, seed: int) -> list[dict]:
    """``videos`` held-out (split ``val``) moving-digits clips of ``frames`` frames, drawn with the
    settings the checkpoint was trained on (digits per clip, frame size); their captions are the
    prompts of every moving-digits figure."""
    data = dict(read_config(checkpoint).get("data", {}))
    if data.get("dataset", "moving-digits") != "moving-digits" or model.config.conditioning != "text":
        raise ValueError("the moving-digits figures need a text-conditioned model trained on moving-digits")
    kw = {k: data[k] for k in ("min_digits", "max_digits", "speed_range", "digit_size") if k in data}
    clips = MovingDigits(videos, frames, size=model.config.frame_size[0], split="val", seed=seed, **kw)
    return [clips[i] for i in range(videos)]


def evaluate_digits(checkpoint, videos=16, frames=128, steps=None, guidance=None, seed=1000, batch=8,
                    device="cpu", log=print, fvd=True, levels=None, fvd_resize="torch") -> dict:
    """Generate ``videos`` videos from the captions of held-out moving-digits clips and measure them
    against those clips: per-chunk digit accuracy, tracked speed, brightness drift (``digit_report``),
    and FVD (``fvd_report``, frames resized as ``fvd_resize`` says) unless ``fvd=False``. steps /
    levels / guidance default to the checkpoint's recommendation (``sampling_for``). A bidirectional
    model samples whole clips (``generate_clip``), so ``frames`` must be its ``clip_length``."""
    from ..text import get_text_encoder

    sampling = sampling_for(checkpoint, steps, levels, guidance)
    steps, levels, guidance = sampling["steps"], sampling["levels"], sampling["guidance"]
    model = load_checkpoint(checkpoint, device=device)
    clip = model.config.temporal == "bidirectional"
    if clip and (frames != model.config.clip_length or levels is not None):
        raise ValueError(f"{checkpoint} is a bidirectional model: it samples whole clips of "
                         f"{model.config.clip_length} frames with uniform steps (got frames={frames}, levels={levels})")
    items = held_out_clips(checkpoint, model, videos, frames, seed)
    enc = get_text_encoder("cpu")
    out, t0 = [], time.perf_counter()
    for b in range(0, videos, batch):
        part = items[b:b + batch]
        prompt = Text(*enc.encode([it["caption"] for it in part]))
        seeds = [seed + b + i for i in range(len(part))]
        if clip:
            video = generate_clip(model, prompt, steps=steps, guidance=guidance, seed=seeds)
        else:
            video = generate_video(model, frames, prompt=prompt, steps=steps, levels=levels, guidance=guidance,
                                   seed=seeds)
        out.append(video.float().cpu())
        log(f"  generated {b + len(part)}/{videos} videos of {frames} frames ({time.perf_counter() - t0:.0f} s)")
    gen = torch.cat(out).clamp(-1, 1)
    gt_videos = torch.stack([it["video"] for it in items])
    report = digit_report(load_classifier(), gen, [it["digits"] for it in items], gt_videos,
                          chunk_frames=model.config.chunk_frames)
    report["settings"] = dict(checkpoint=str(checkpoint), videos=videos, frames=frames, steps=steps,
                              guidance=guidance, seed=seed, levels=levels)
    return add_fvd(report, gen, gt_videos, model.config.chunk_frames, log, fvd_resize) if fvd else report
