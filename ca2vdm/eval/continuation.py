"""The continuation evaluation: continue the first frame(s) of real videos and compare with what
really followed (PSNR / SSIM per chunk, the given frames excluded, and FVD)."""

import time

import torch

from ..checkpoint import load_checkpoint, sampling_for
from ..conditioning import Text
from ..data import build_dataset
from ..generate import generate_video
from ..metrics.fidelity import fidelity
from ..metrics.fvd import add_fvd


def evaluate_continuations(checkpoint, data: dict, frames=65, steps=None, guidance=None, seed=0, videos=None,
                           device="cpu", log=print, fvd=True, levels=None) -> dict:
    """Continue the first frame(s) of every video of a folder dataset (a run config's ``data``
    section) and compare the continuation with the real video: PSNR / SSIM per chunk, and FVD."""
    sampling = sampling_for(checkpoint, steps, levels, guidance)
    steps, levels, guidance = sampling["steps"], sampling["levels"], sampling["guidance"]
    model = load_checkpoint(checkpoint, device=device)
    cfg = model.config
    if cfg.prefix_frames == 0 or cfg.in_channels != 3:
        raise ValueError("continuations need a pixel-space model that starts from given frames (prefix_frames > 0)")
    data = dict(data, cache=True)
    data.pop("clips_per_video", None)
    ds = build_dataset(data, frames, "train")
    n = len(ds.videos) if videos is None else min(videos, len(ds.videos))
    if n == 0:
        raise ValueError(f"no video in {data.get('root')} has {frames} frames")
    real = [ds.opening(v) for v in range(n)]
    gt = torch.stack([r["video"] for r in real])  # (n, 3, frames, H, W)
    p = cfg.prefix_frames
    kw = dict(first_frames=gt[:, :, :p].to(device), steps=steps, levels=levels,
              seed=[seed + i for i in range(n)])
    if cfg.conditioning == "text":
        from ..text import get_text_encoder

        kw["prompt"], kw["guidance"] = Text(*get_text_encoder("cpu").encode([r["caption"] for r in real])), guidance
    t0 = time.perf_counter()
    gen = generate_video(model, frames, **kw).float().cpu().clamp(-1, 1)
    log(f"  generated {n} continuations of {frames} frames ({time.perf_counter() - t0:.0f} s)")
    report = fidelity(gen[:, :, p:], gt[:, :, p:], cfg.chunk_frames)
    report.update(videos=[r["path"] for r in real], captions=[r["caption"] for r in real], frames=frames,
                  given_frames=p, chunk_frames=cfg.chunk_frames,
                  settings=dict(checkpoint=str(checkpoint), steps=steps, guidance=guidance, seed=seed, levels=levels))
    return add_fvd(report, gen[:, :, p:], gt[:, :, p:], cfg.chunk_frames, log) if fvd else report
