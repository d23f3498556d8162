"""Fidelity against a reference video of the same shape: PSNR and SSIM, per frame and per chunk."""

import torch
import torch.nn.functional as F

from .common import chunk_slices, finite


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-frame PSNR in dB of videos (B, C, F, H, W) in a range of width ``data_range``
    ([-1, 1] by default) -> (B, F). Identical frames give +inf."""
    mse = (a.double() - b.double()).pow(2).mean(dim=(1, 3, 4))
    return 10 * torch.log10(data_range ** 2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (size, size)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-frame SSIM (Wang et al. 2004: Gaussian window 11 / 1.5, K1 = 0.01, K2 = 0.03, local
    statistics over the valid region, averaged over pixels and channels) of videos (B, C, F, H, W)
    -> (B, F). The window shrinks to the frame for frames smaller than it."""
    B, C, Fr, H, W = a.shape
    size = min(window, H, W)
    w = _gaussian_window(size, sigma).to(a.device)[None, None].expand(C, 1, size, size)
    x = a.double().permute(0, 2, 1, 3, 4).reshape(B * Fr, C, H, W)
    y = b.double().permute(0, 2, 1, 3, 4).reshape(B * Fr, C, H, W)
    filt = lambda z: F.conv2d(z, w, groups=C)  # noqa: E731
    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).reshape(B, Fr)


def per_chunk(values: torch.Tensor, chunk_frames: int) -> list[float]:
    """(B, F) per-frame values -> the mean over videos and frames of each chunk (infinite PSNR of
    identical frames is capped at 100 dB so that means stay finite)."""
    v = values.clamp(max=100.0)
    return [finite(v[:, s].mean()) for s in chunk_slices(v.shape[1], chunk_frames)]


def fidelity(videos: torch.Tensor, reference: torch.Tensor, chunk_frames: int) -> dict:
    """PSNR / SSIM of videos against reference videos of the same shape, overall and per chunk."""
    if videos.shape != reference.shape:
        raise ValueError(f"videos {tuple(videos.shape)} and reference {tuple(reference.shape)} differ in shape")
    p, s = psnr(videos, reference), ssim(videos, reference)
    return {"psnr": finite(p.clamp(max=100.0).mean()), "ssim": finite(s.mean()),
            "psnr_per_chunk": per_chunk(p, chunk_frames), "ssim_per_chunk": per_chunk(s, chunk_frames)}
