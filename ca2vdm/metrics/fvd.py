"""Frechet Video Distance (FVD, Unterthiner et al. 2018) with the Kinetics-400 I3D (``metrics.i3d``).

Every consecutive 16-frame clip of a video is one sample; frames are resized to 224 x 224 before
the network. ``fvd`` compares two sets of videos; ``fvd_report`` also gives FVD per 16-frame
window over time (the Ca2-VDM paper's long-video table); ``add_fvd`` adds that report to an
evaluation's when the videos are long enough. The reference set's features are kept on disk
(``reference_features``): every row of a comparison measures against the same real clips, and I3D
over them runs once.
"""

import time

import numpy as np
import torch
import torch.nn.functional as F

from .common import finite


FVD_CLIP_FRAMES = 16
I3D_SIZE = 224


RESIZES = ("torch", "tf1")


def resize_tf1_bilinear(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TensorFlow 1's ``tf.image.resize_bilinear`` (align_corners=False, half_pixel_centers=False),
    the resize of the reference FVD implementation: output pixel y reads source coordinate
    y * H / h (no half-pixel offset), clamped at the last row. frames (N, C, H, W) -> (N, C, h, w).
    Upsampling 32 -> 224 it differs from PyTorch's ``align_corners=False`` (half-pixel centres), which
    also reads coordinate (y + 0.5) H / h - 0.5."""
    def axis(n_in: int, n_out: int):
        src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
        i0 = src.floor().long().clamp(max=n_in - 1)
        return i0.to(frames.device), (i0 + 1).clamp(max=n_in - 1).to(frames.device), (src - i0).to(frames.device, frames.dtype)

    y0, y1, dy = axis(frames.shape[-2], size[0])
    x0, x1, dx = axis(frames.shape[-1], size[1])
    rows = frames[..., y0, :] * (1 - dy)[:, None] + frames[..., y1, :] * dy[:, None]  # (N, C, h, W)
    return rows[..., x0] * (1 - dx) + rows[..., x1] * dx


def resize_frames(frames: torch.Tensor, size: tuple[int, int], resize: str = "torch") -> torch.Tensor:
    """(N, C, H, W) -> (N, C, h, w): ``"torch"`` bilinear with half-pixel centres, no antialiasing (what
    every FVD in this repository so far used), or ``"tf1"``, the reference implementation's resize."""
    if resize == "tf1":
        return resize_tf1_bilinear(frames, size)
    if resize != "torch":
        raise ValueError(f"resize must be one of {', '.join(RESIZES)}, got {resize!r}")
    return F.interpolate(frames, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def i3d_features(model, videos: torch.Tensor, batch: int = 8, clip_frames: int = FVD_CLIP_FRAMES,
                 resize: str = "torch") -> np.ndarray:
    """I3D logits of every clip: videos (N, 3, F, H, W) in [-1, 1] -> (N * (F // clip_frames), 400) float64.

    Each video is cut into consecutive ``clip_frames``-frame clips (frames [0, 16), [16, 32), ...);
    trailing frames that do not fill a clip are dropped, and F < ``clip_frames`` is an error. Rows
    are video-major: video 0's clips in order, then video 1's. Frames are clamped to [-1, 1] and
    resized to 224 x 224 (``resize_frames``: by default bilinear with half-pixel centres, no
    antialiasing; ``resize="tf1"``: the reference FVD's TensorFlow 1 resize) before the network.
    """
    if resize not in RESIZES:
        raise ValueError(f"resize must be one of {', '.join(RESIZES)}, got {resize!r}")
    videos = torch.as_tensor(videos)
    N, C, Fr, H, W = videos.shape
    if C != 3:
        raise ValueError(f"I3D needs RGB videos (N, 3, F, H, W), got {tuple(videos.shape)}")
    if Fr < clip_frames:
        raise ValueError(f"videos have {Fr} frames, fewer than one {clip_frames}-frame clip")
    model.eval()
    device = next(model.parameters()).device
    starts = [(n, t) for n in range(N) for t in range(0, Fr - clip_frames + 1, clip_frames)]
    out = []
    for s in range(0, len(starts), batch):
        clips = torch.stack([videos[n, :, t:t + clip_frames] for n, t in starts[s:s + batch]])  # (b, 3, T, H, W)
        clips = clips.to(device, torch.float32).clamp(-1, 1)
        if (H, W) != (I3D_SIZE, I3D_SIZE):
            b = clips.shape[0]
            frames = clips.transpose(1, 2).reshape(b * clip_frames, C, H, W)                # (b*T, 3, H, W)
            frames = resize_frames(frames, (I3D_SIZE, I3D_SIZE), resize)
            clips = frames.reshape(b, clip_frames, C, I3D_SIZE, I3D_SIZE).transpose(1, 2)   # (b, 3, T, 224, 224)
        out.append(model(clips).double().cpu())                                             # (b, 400)
    return torch.cat(out).numpy()


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D) and (M, D), N, M >= 2:

        |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))

    Means, covariances (unbiased) and the matrix square root (``scipy.linalg.sqrtm``) in float64.
    The product of two covariances is similar to a PSD matrix, so its square root is real up to
    rounding: the imaginary part is dropped. If the root is not finite (a singular product), it is
    taken again with 1e-6 added to both diagonals. With fewer samples than dimensions (400 for I3D)
    the covariances are singular and the root is accurate to ~1e-7 .. 1e-6 of tr(S) only, so a set
    against itself gives about that much (of either sign) instead of 0.
    """
    from scipy import linalg

    a, b = (f.detach().double().cpu().numpy() if torch.is_tensor(f) else np.asarray(f, np.float64)
            for f in (feats_a, feats_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need feature matrices (N, D) and (M, D), got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a covariance needs at least 2 samples per set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)                         # (D, D)
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():
        eps = 1e-6 * np.eye(a.shape[1])
        root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root).real)


def reference_features(model, videos: torch.Tensor, batch: int = 8, clip_frames: int = FVD_CLIP_FRAMES,
                       resize: str = "torch") -> np.ndarray:
    """``i3d_features`` of a reference set, cached in ``<cache dir>/fvd_reference/`` under the
    SHA-256 of the videos' float32 bytes (and the clip length): the same real clips are embedded
    once, whichever run asks next. Only for the default I3D (a model passed in is not cached)."""
    import hashlib

    from safetensors.torch import load_file

    from ..safefile import save_safetensors
    from .i3d import CACHE_NAME, cache_dir

    data = videos.detach().float().contiguous().cpu()
    tag = f"{tuple(data.shape)}|{clip_frames}|{CACHE_NAME}" + ("" if resize == "torch" else f"|{resize}")
    key = hashlib.sha256(data.numpy().tobytes() + tag.encode()).hexdigest()
    path = cache_dir() / "fvd_reference" / f"{key}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["features"].numpy()
        except Exception:  # a damaged cache entry is recomputed
            pass
    feats = i3d_features(model, videos, batch, clip_frames, resize)
    save_safetensors({"features": torch.from_numpy(np.ascontiguousarray(feats))}, path)
    return feats


def _default_i3d(model, device):
    from .i3d import load_i3d

    if model is not None:
        return model
    return load_i3d(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def fvd(videos_a: torch.Tensor, videos_b: torch.Tensor, model=None, batch: int = 8,
        clip_frames: int = FVD_CLIP_FRAMES, device=None, resize: str = "torch") -> dict:
    """FVD between two sets of videos (N, 3, F, H, W) and (M, 3, F', H', W') in [-1, 1].

    Every consecutive 16-frame clip of every video is one sample (``i3d_features``); returns
    {"fvd": float, "clips_a": number of clips of set a, "clips_b": ... of set b}. FVD depends on
    the number of clips (it is biased upwards for small sets), so report them with it. ``model``:
    a loaded I3D (``ca2vdm.metrics.i3d.load_i3d``); by default one is loaded on ``device`` (CUDA if any).
    """
    model = _default_i3d(model, device)
    fa = i3d_features(model, videos_a, batch, clip_frames, resize)
    fb = i3d_features(model, videos_b, batch, clip_frames, resize)
    return {"fvd": finite(frechet_distance(fa, fb)), "clips_a": len(fa), "clips_b": len(fb)}


def fvd_report(generated: torch.Tensor, reference: torch.Tensor, chunk_frames: int,
               clip_frames: int = FVD_CLIP_FRAMES, model=None, batch: int = 8, device=None,
               resize: str = "torch") -> dict:
    """FVD overall and over time, from one pass of I3D over both sets.

    generated (N, 3, F, H, W) and reference (M, 3, F', H', W') in [-1, 1], cut to their first
    min(F, F') frames and into 16-frame windows (a partial last window is dropped). Overall: every
    window of every video is a sample {"fvd", "clips_a", "clips_b"}. ``per_window``, as in the
    Ca2-VDM paper's SkyTimelapse table: window i covers frames [16 i, 16 i + 16), its N generated
    clips against the M reference clips of the same frames, with the generation chunks of
    ``chunk_frames`` frames it overlaps.
    """
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be positive, got {chunk_frames}")
    cache = model is None
    model = _default_i3d(model, device)
    frames = min(generated.shape[2], reference.shape[2])
    windows = frames // clip_frames
    if windows == 0:
        raise ValueError(f"videos have {frames} frames, fewer than one {clip_frames}-frame window")
    used = windows * clip_frames
    fg = i3d_features(model, generated[:, :, :used], batch, clip_frames, resize).reshape(len(generated), windows, -1)
    embed = reference_features if cache else i3d_features
    fr = embed(model, reference[:, :, :used], batch, clip_frames, resize).reshape(len(reference), windows, -1)
    rows = []
    for i in range(windows):
        start, end = i * clip_frames, (i + 1) * clip_frames
        rows.append({"frames": [start, end], "chunks": [start // chunk_frames, (end - 1) // chunk_frames],
                     "fvd": finite(frechet_distance(fg[:, i], fr[:, i])), "clips_a": fg.shape[0], "clips_b": fr.shape[0]})
    overall = frechet_distance(fg.reshape(-1, fg.shape[-1]), fr.reshape(-1, fr.shape[-1]))
    return {"fvd": finite(overall), "clips_a": fg.shape[0] * windows, "clips_b": fr.shape[0] * windows,
            "per_window": rows, "resize": resize}


def fvd_per_chunk(generated: torch.Tensor, reference: torch.Tensor, chunk_frames: int,
                  clip_frames: int = FVD_CLIP_FRAMES, model=None, batch: int = 8, device=None) -> list[dict]:
    """The per-window rows of ``fvd_report``: {"frames": [start, end), "chunks": [first, last],
    "fvd", "clips_a" (generated), "clips_b"} per 16-frame window."""
    return fvd_report(generated, reference, chunk_frames, clip_frames, model, batch, device)["per_window"]


def add_fvd(report: dict, generated: torch.Tensor, reference: torch.Tensor, chunk_frames: int, log=print,
            resize: str = "torch") -> dict:
    """``report["fvd"] = fvd_report(...)`` when both sets have at least one 16-frame clip (else
    the report is returned as it is, and the skip is logged)."""
    if min(generated.shape[2], reference.shape[2]) < FVD_CLIP_FRAMES:
        log(f"  FVD skipped: fewer than {FVD_CLIP_FRAMES} frames")
        return report
    t0 = time.perf_counter()
    report["fvd"] = fvd_report(generated, reference, chunk_frames, resize=resize)
    log(f"  FVD {report['fvd']['fvd']:.1f} ({report['fvd']['clips_a']} generated vs {report['fvd']['clips_b']} real "
        f"16-frame clips; I3D took {time.perf_counter() - t0:.0f} s)")
    return report
