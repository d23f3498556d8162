"""Measuring generated moving-digit videos: are the digits still there, do they move, does it drift?

Generated videos are tensors (B, 3, F, 32, 32) in roughly [-1, 1] from a text-conditioned model
trained on ``MovingDigits(max_digits=2)``. Four measurements, all per chunk of ``chunk_frames``
frames (the model's generation unit) so that degradation over long horizons shows up:

    digit_accuracy    a small CNN (``DigitClassifier``) reads every frame; per chunk the sigmoid
                      probabilities are averaged over the chunk's frames, thresholded at 0.5 and
                      the predicted digit *set* must equal the caption's set exactly
    track_speeds      connected components of bright pixels -> centroids -> Hungarian matching
                      between consecutive frames -> mean displacement in pixels/frame
    brightness_drift  mean pixel value per chunk in [0, 1]; drift = last chunk - first chunk
    digit_report      the published figures: generated vs ground truth, overall and up to each
                      horizon (128, 256, 1000 frames), JSON-serialisable

and, for any videos with a reference of the same shape, ``psnr`` / ``ssim`` per frame and
``fidelity`` per chunk.

The classifier is tiny (~60k parameters, ~250 kB) and ships in ``models/digit_classifier/`` as
``config.json`` + ``model.safetensors`` (nothing is unpickled). Retrain it with
``python -m ca2vdm.evaluate --out models/digit_classifier`` (about three minutes of one CPU core);
it gets 91% per-frame exact-set accuracy on held-out (val split) frames, 94% per 4-frame chunk.
"""

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .data.digits import MovingDigits

NUM_CLASSES = 10
DEFAULT_CLASSIFIER_DIR = Path(__file__).resolve().parent.parent / "models" / "digit_classifier"


# --------------------------------------------------------------------------------------------
# Digit classifier
# --------------------------------------------------------------------------------------------
class DigitClassifier(nn.Module):
    """Which digits are in a frame? (N, C, 32, 32) in [-1, 1] -> (N, 10) logits, one sigmoid per class.

    Four 3x3 conv-BN-ReLU layers (widths w, 2w, 4w, 4w, two 2x max-pools; receptive field 26 px,
    more than a 12 px glyph) and a global max-pool, so a digit counts wherever it is in the frame.
    """

    def __init__(self, width: int = 16, in_channels: int = 3, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.config = {"width": width, "in_channels": in_channels, "num_classes": num_classes}
        w = width

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.features = nn.Sequential(
            *block(in_channels, w), nn.MaxPool2d(2),   # (N, w, 16, 16)
            *block(w, 2 * w), nn.MaxPool2d(2),         # (N, 2w, 8, 8)
            *block(2 * w, 4 * w),                      # (N, 4w, 8, 8)
            *block(4 * w, 4 * w),                      # (N, 4w, 8, 8)
        )
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clamp(-1, 1)                            # generated frames may overshoot [-1, 1]
        h = self.features(x).amax(dim=(2, 3))         # (N, 4w) global max-pool
        return self.head(h)                           # (N, 10) logits


def multi_hot(digits, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """[[3, 7], [1]] -> (B, 10) float 0/1 targets: which classes are present (repeats count once)."""
    target = torch.zeros(len(digits), num_classes)
    for i, ds in enumerate(digits):
        target[i, [int(d) for d in ds]] = 1.0
    return target


def _render_frames(num_clips: int, frames: int, max_digits: int, seed: int, split: str):
    """All frames of ``num_clips`` MovingDigits clips -> (frames (N*F, 3, 32, 32) uint8, targets (N*F, 10))."""
    ds = MovingDigits(num_clips, frames, max_digits=max_digits, seed=seed, split=split)
    video = torch.empty(num_clips, frames, 3, 32, 32, dtype=torch.uint8)   # 4x smaller than float32
    target = torch.empty(num_clips, frames, NUM_CLASSES)
    for i in range(num_clips):
        item = ds[i]
        v = item["video"].permute(1, 0, 2, 3)                              # (F, C, H, W)
        video[i] = ((v + 1) * 127.5).round().to(torch.uint8)
        target[i] = multi_hot([item["digits"]]).expand(frames, -1)
    return video.flatten(0, 1), target.flatten(0, 1)


def _to_float(frames_u8: torch.Tensor) -> torch.Tensor:
    return frames_u8.float() / 127.5 - 1                                   # uint8 -> [-1, 1]


def _augment(x: torch.Tensor, y: torch.Tensor, g: torch.Generator, negatives: float = 0.05):
    """Make the classifier tolerant of what a generator gets slightly wrong, and say "nothing" to junk.

    x (N, 3, H, W) in [-1, 1], y (N, 10). Per frame: contrast scale, background lift, Gaussian
    noise; a ``negatives`` fraction is replaced by empty or noise frames with no digit.
    """
    n = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, 1, 1, 1, generator=g)  # noqa: E731
    x = (x + 1) * u(0.7, 1.1) - 1                                          # dimmer / brighter digits
    x = x + u(0.0, 0.15) * (torch.rand(n, 1, 1, 1, generator=g) < 0.5)     # grey background
    x = x + u(0.0, 0.15) * torch.randn(x.shape, generator=g)               # pixel noise
    junk = torch.rand(n, generator=g) < negatives
    if junk.any():
        k = int(junk.sum())
        amp = 2 * torch.rand(k, 1, 1, 1, generator=g)                      # from blank to full noise
        x[junk] = -1 + amp * torch.rand(k, *x.shape[1:], generator=g)
        y = y.clone()
        y[junk] = 0
    return x.clamp(-1, 1), y


@torch.no_grad()
def frame_accuracy(classifier: DigitClassifier, frames: torch.Tensor, targets: torch.Tensor,
                   batch: int = 512) -> float:
    """Per-frame exact-set accuracy: frames (N, 3, H, W) in [-1, 1], targets (N, 10) multi-hot."""
    classifier.eval()
    device = next(classifier.parameters()).device
    correct = 0
    for s in range(0, len(frames), batch):
        pred = classifier(frames[s:s + batch].to(device)).sigmoid() > 0.5   # (n, 10)
        correct += (pred.cpu() == targets[s:s + batch].bool()).all(-1).sum().item()
    return correct / len(frames)


def val_accuracy(classifier: DigitClassifier, num_clips: int = 512, frames: int = 8, max_digits: int = 2,
                 seed: int = 0) -> float:
    """Held-out per-frame exact-set accuracy on every frame of ``num_clips`` val-split clips."""
    x, y = _render_frames(num_clips, frames, max_digits, seed, "val")
    return frame_accuracy(classifier, _to_float(x), y)


def train_digit_classifier(steps: int = 3000, seed: int = 0, max_digits: int = 2, device: str = "cpu",
                           batch_size: int = 64, lr: float = 3e-3, width: int = 16, pool_clips: int = 6000,
                           frames_per_clip: int = 4, log_every: int = 250) -> DigitClassifier:
    """Train a DigitClassifier on random frames of random MovingDigits train-split clips.

    A pool of ``pool_clips`` clips x ``frames_per_clip`` frames is rendered once (uint8), then each
    step draws ``batch_size`` random frames from it, augments them (``_augment``) and takes an
    AdamW step on the per-class binary cross-entropy (multi-hot of the clip's ``digits``).
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    pool_x, pool_y = _render_frames(pool_clips, frames_per_clip, max_digits, seed, "train")
    print(f"rendered {len(pool_x)} training frames in {time.time() - t0:.1f}s")

    model = DigitClassifier(width=width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(len(pool_x), (batch_size,), generator=g)
        x, y = _augment(_to_float(pool_x[idx]), pool_y[idx], g)
        loss = F.binary_cross_entropy_with_logits(model(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:.0f}s")
    return model.eval()


def save_classifier(model: DigitClassifier, dir, extra: dict | None = None) -> None:
    """Write ``dir/config.json`` (architecture + ``extra`` metadata) and ``dir/model.safetensors``."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(dir / "model.safetensors"))
    (dir / "config.json").write_text(json.dumps({"model": model.config, **(extra or {})}, indent=2) + "\n")


def load_classifier(dir=DEFAULT_CLASSIFIER_DIR, device: str = "cpu") -> DigitClassifier:
    """Load a classifier saved by ``save_classifier`` (default: the shipped one), in eval mode."""
    dir = Path(dir)
    cfg_file, weights = dir / "config.json", dir / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{dir} has no digit classifier (need config.json and model.safetensors)")
    model = DigitClassifier(**json.loads(cfg_file.read_text())["model"])
    model.load_state_dict(load_file(str(weights)))
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------
# Digit accuracy per chunk
# --------------------------------------------------------------------------------------------
def _chunks(frames: int, chunk_frames: int) -> list[slice]:
    """Frame slices of consecutive chunks; a trailing partial chunk counts as a chunk."""
    return [slice(s, min(s + chunk_frames, frames)) for s in range(0, frames, chunk_frames)]


@torch.no_grad()
def digit_probs(classifier: DigitClassifier, videos: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """videos (B, 3, F, H, W) in ~[-1, 1] -> per-frame sigmoid probabilities (B, F, 10), on CPU."""
    classifier.eval()
    device = next(classifier.parameters()).device
    B, C, Fr, H, W = videos.shape
    frames = videos.transpose(1, 2).reshape(B * Fr, C, H, W)                # (B*F, C, H, W)
    out = [classifier(frames[s:s + batch].to(device, torch.float32)).sigmoid().cpu()
           for s in range(0, B * Fr, batch)]
    return torch.cat(out).view(B, Fr, -1)


def _chunk_correct(probs: torch.Tensor, digits, chunk_frames: int) -> torch.Tensor:
    """probs (B, F, 10) -> (B, num_chunks) bool: chunk-averaged prediction set == true set."""
    target = multi_hot(digits).bool()                                       # (B, 10)
    if target.shape[0] != probs.shape[0]:
        raise ValueError(f"{probs.shape[0]} videos but {target.shape[0]} digit lists")
    cols = [((probs[:, s].mean(1) > 0.5) == target).all(-1) for s in _chunks(probs.shape[1], chunk_frames)]
    return torch.stack(cols, dim=1)


def digit_accuracy(classifier: DigitClassifier, videos: torch.Tensor, digits, chunk_frames: int = 4) -> list[float]:
    """Per-chunk exact-set digit accuracy, averaged over videos.

    videos (B, 3, F, 32, 32) in ~[-1, 1]; digits: B lists of the digits each video should show
    (e.g. ``item["digits"]``). For each chunk the classifier's probabilities are averaged over the
    chunk's frames and thresholded at 0.5; the chunk is right if that set equals the true set.
    Returns one float per chunk (ceil(F / chunk_frames) of them).
    """
    correct = _chunk_correct(digit_probs(classifier, videos), digits, chunk_frames)  # (B, n)
    return correct.float().mean(0).tolist()


# --------------------------------------------------------------------------------------------
# Speed tracking
# --------------------------------------------------------------------------------------------
def _centroids(frame: np.ndarray, threshold: float, min_pixels: int) -> np.ndarray:
    """frame (H, W) brightness in [-1, 1] -> (k, 2) intensity-weighted centroids (y, x) of its blobs."""
    from scipy import ndimage

    mask = frame > threshold
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))            # 8-connected components
    if n == 0:
        return np.zeros((0, 2))
    index = np.arange(1, n + 1)
    sizes = ndimage.sum_labels(mask, labels, index)                        # (n,) pixels per blob
    weight = (frame + 1) / 2                                               # brightness in [0, 1]
    cents = np.array(ndimage.center_of_mass(weight, labels, index), dtype=np.float64).reshape(n, 2)
    return cents[sizes >= min_pixels]


def step_displacements(videos: torch.Tensor, threshold: float = -0.5, min_pixels: int = 4,
                       max_step: float = 8.0, counts=None, min_share: float = 0.15):
    """Matched blob displacements between consecutive frames.

    videos (B, C, F, H, W) in ~[-1, 1] -> (total (B, F-1), count (B, F-1)) float64 numpy arrays:
    for the step t -> t+1 of video b, the summed displacement (px) of its matched blob pairs and
    how many pairs there were. A step counts only if both frames show the video's usual number of
    blobs: ``counts[b]`` if given, else the largest blob count seen in at least ``min_share`` of
    the video's non-empty frames. That drops the steps where two digits touch and merge into one
    blob (whose centroid moves like neither), where a glyph breaks up or a speck of noise appears.
    Blobs are matched by the Hungarian algorithm on centroid distance; pairs further apart than
    ``max_step`` px are dropped.
    """
    from scipy.optimize import linear_sum_assignment

    bright = videos.detach().float().amax(dim=1).cpu().numpy()            # (B, F, H, W) max over channels
    B, Fr = bright.shape[:2]
    total, count = np.zeros((B, max(Fr - 1, 0))), np.zeros((B, max(Fr - 1, 0)))
    for b in range(B):
        cents = [_centroids(bright[b, t], threshold, min_pixels) for t in range(Fr)]   # F x (k_t, 2)
        k = np.array([len(c) for c in cents])
        if counts is not None:
            usual = int(counts[b])
        elif (k > 0).any():
            freq = np.bincount(k)[1:] / (k > 0).sum()                      # (max k,) share of non-empty frames
            usual = int(np.nonzero(freq >= min_share)[0].max()) + 1 if (freq >= min_share).any() \
                else int(freq.argmax()) + 1
        else:
            continue
        for t in range(1, Fr):
            if k[t - 1] == k[t] == usual:
                dist = np.linalg.norm(cents[t - 1][:, None] - cents[t][None], axis=-1)   # (k, k)
                rows, cols = linear_sum_assignment(dist)
                d = dist[rows, cols]
                d = d[d <= max_step]
                total[b, t - 1], count[b, t - 1] = d.sum(), len(d)
    return total, count


def _speeds(total: np.ndarray, count: np.ndarray, steps: int | None = None) -> np.ndarray:
    """Mean displacement per matched pair over the first ``steps`` steps -> (B,), NaN if none matched."""
    t, c = total[:, :steps].sum(1), count[:, :steps].sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(c > 0, t / np.maximum(c, 1), np.nan)


def track_speeds(videos: torch.Tensor, threshold: float = -0.5, min_pixels: int = 4,
                 max_step: float = 8.0, counts=None, min_share: float = 0.15) -> torch.Tensor:
    """Mean tracked digit speed in pixels/frame per video: (B, C, F, H, W) -> (B,) float64.

    Blobs are 8-connected components of pixels whose max over channels exceeds ``threshold``
    (-0.5, i.e. 25% brightness), at least ``min_pixels`` in size; see ``step_displacements``.
    Each matched blob-step counts once. NaN for a video in which no step could be matched (e.g. an
    empty or all-noise video). On ground-truth clips this matches the mean per-frame displacement
    of ``positions`` (median ratio 1.00, 5-95% 0.96-1.02 on 32-frame val clips), so bounces,
    which shorten a step, are measured as they happen.
    """
    total, count = step_displacements(videos, threshold, min_pixels, max_step, counts, min_share)
    return torch.from_numpy(_speeds(total, count))


# --------------------------------------------------------------------------------------------
# Brightness drift
# --------------------------------------------------------------------------------------------
def brightness_drift(videos: torch.Tensor, chunk_frames: int = 4) -> dict:
    """Mean pixel value per chunk in [0, 1] (over videos, channels, frames, pixels) and its drift.

    videos (B, C, F, H, W) in ~[-1, 1] -> {"chunk_means": [float] * num_chunks,
    "drift": last chunk mean - first chunk mean}. Not clamped: overshoot shows up as drift.
    """
    per_frame = ((videos.detach().float() + 1) / 2).mean(dim=(0, 1, 3, 4)).cpu()   # (F,)
    means = [per_frame[s].mean().item() for s in _chunks(len(per_frame), chunk_frames)]
    return {"chunk_means": means, "drift": means[-1] - means[0]}


# --------------------------------------------------------------------------------------------
# The published report
# --------------------------------------------------------------------------------------------
def _num(x):
    """float, or None for NaN/inf (strict JSON has no NaN)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _ratio(a, b):
    return _num(a / b) if b not in (0, None) and a is not None else None


def _nanmedian(x: np.ndarray):
    return _num(np.nanmedian(x)) if np.isfinite(x).any() else None


def _summary(correct, correct_gt, disp, disp_gt, videos, gt_videos, frames: int, chunk_frames: int) -> dict:
    """The report's figures restricted to the first ``frames`` frames."""
    n = math.ceil(frames / chunk_frames)
    acc = correct[:, :n].float().mean(0)                                    # (n,)
    acc_gt = correct_gt[:, :n].float().mean(0)
    ratios = [_ratio(a, b) for a, b in zip(acc.tolist(), acc_gt.tolist())]
    speed, speed_gt = _speeds(*disp, frames - 1), _speeds(*disp_gt, frames - 1)   # (B,), (B_gt,)
    med, med_gt = _nanmedian(speed), _nanmedian(speed_gt)
    paired = None
    if len(speed) == len(speed_gt):
        with np.errstate(invalid="ignore", divide="ignore"):
            paired = _nanmedian(np.where(speed_gt > 0, speed / speed_gt, np.nan))
    drift = brightness_drift(videos[:, :, :frames], chunk_frames)["drift"]
    drift_gt = brightness_drift(gt_videos[:, :, :frames], chunk_frames)["drift"]
    valid = [r for r in ratios if r is not None]
    return {
        "frames": frames,
        "acc_mean": _num(acc.mean()), "acc_gt_mean": _num(acc_gt.mean()),
        "acc_ratio": _ratio(acc.mean().item(), acc_gt.mean().item()),
        "min_acc_ratio": min(valid) if valid else None,
        "acc_last_chunk": _num(acc[-1]), "acc_gt_last_chunk": _num(acc_gt[-1]),
        "speed": med, "speed_gt": med_gt, "speed_ratio": _ratio(med, med_gt), "speed_ratio_paired": paired,
        "brightness_drift": _num(drift), "brightness_drift_gt": _num(drift_gt),
    }


def digit_report(classifier: DigitClassifier, videos: torch.Tensor, digits, gt_videos: torch.Tensor,
                 chunk_frames: int = 4, horizons=(128, 256, 1000), gt_digits=None) -> dict:
    """Everything we publish about generated digit videos, against ground truth, as plain JSON types.

    videos (B, 3, F, 32, 32) generated, ``digits`` their B true digit lists; gt_videos (B', 3, F',
    32, 32) real MovingDigits clips with digit lists ``gt_digits`` (default: ``digits``, i.e. the
    clips whose captions prompted the generation). Compared over the first min(F, F') frames:

        acc, acc_gt          per-chunk exact-set digit accuracy (``digit_accuracy``)
        acc_ratio            per chunk acc / acc_gt (None where acc_gt is 0)
        min_acc_ratio_128    the smallest per-chunk ratio within the first 128 frames
        speed, speed_gt      median over videos of the tracked speed (px/frame, ``track_speeds``)
        speed_ratio          speed / speed_gt (ratio of medians: valid even when unpaired)
        speed_ratio_paired   median over videos of speed_i / speed_gt_i (only when B == B')
        brightness*, brightness_drift*   per-chunk means and last-minus-first drift, both sets
        overall              the summary figures over all frames (see ``_summary``)
        horizons             {"128": summary up to frame 128, ...} for each horizon both reach
    """
    gt_digits = digits if gt_digits is None else gt_digits
    frames = min(videos.shape[2], gt_videos.shape[2])
    videos, gt_videos = videos[:, :, :frames], gt_videos[:, :, :frames]
    correct = _chunk_correct(digit_probs(classifier, videos), digits, chunk_frames)           # (B, n)
    correct_gt = _chunk_correct(digit_probs(classifier, gt_videos), gt_digits, chunk_frames)  # (B', n)
    disp, disp_gt = step_displacements(videos), step_displacements(gt_videos)
    acc, acc_gt = correct.float().mean(0).tolist(), correct_gt.float().mean(0).tolist()
    ratios = [_ratio(a, b) for a, b in zip(acc, acc_gt)]
    early = [r for r in ratios[:math.ceil(min(128, frames) / chunk_frames)] if r is not None]
    bright, bright_gt = brightness_drift(videos, chunk_frames), brightness_drift(gt_videos, chunk_frames)
    summary = lambda f: _summary(correct, correct_gt, disp, disp_gt, videos, gt_videos, f, chunk_frames)  # noqa: E731
    overall = summary(frames)
    return {
        "num_videos": videos.shape[0], "num_gt_videos": gt_videos.shape[0],
        "frames": frames, "chunk_frames": chunk_frames,
        "acc": acc, "acc_gt": acc_gt, "acc_ratio": ratios,
        "min_acc_ratio_128": min(early) if early else None,
        "speed": overall["speed"], "speed_gt": overall["speed_gt"],
        "speed_ratio": overall["speed_ratio"], "speed_ratio_paired": overall["speed_ratio_paired"],
        "brightness": bright["chunk_means"], "brightness_gt": bright_gt["chunk_means"],
        "brightness_drift": _num(bright["drift"]), "brightness_drift_gt": _num(bright_gt["drift"]),
        "overall": overall,
        "horizons": {str(h): summary(h) for h in horizons if h <= frames},
    }


# --------------------------------------------------------------------------------------------
# Fidelity against a reference video: PSNR and SSIM, per frame and per chunk
# --------------------------------------------------------------------------------------------
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
    return [_num(v[:, s].mean()) for s in _chunks(v.shape[1], chunk_frames)]


def fidelity(videos: torch.Tensor, reference: torch.Tensor, chunk_frames: int) -> dict:
    """PSNR / SSIM of videos against reference videos of the same shape, overall and per chunk."""
    if videos.shape != reference.shape:
        raise ValueError(f"videos {tuple(videos.shape)} and reference {tuple(reference.shape)} differ in shape")
    p, s = psnr(videos, reference), ssim(videos, reference)
    return {"psnr": _num(p.clamp(max=100.0).mean()), "ssim": _num(s.mean()),
            "psnr_per_chunk": per_chunk(p, chunk_frames), "ssim_per_chunk": per_chunk(s, chunk_frames)}


# --------------------------------------------------------------------------------------------
# Frechet Video Distance (FVD) with the Kinetics-400 I3D (``ca2vdm.i3d``)
# --------------------------------------------------------------------------------------------
FVD_CLIP_FRAMES = 16
I3D_SIZE = 224


@torch.no_grad()
def i3d_features(model, videos: torch.Tensor, batch: int = 8, clip_frames: int = FVD_CLIP_FRAMES) -> np.ndarray:
    """I3D logits of every clip: videos (N, 3, F, H, W) in [-1, 1] -> (N * (F // clip_frames), 400) float64.

    Each video is cut into consecutive ``clip_frames``-frame clips (frames [0, 16), [16, 32), ...);
    trailing frames that do not fill a clip are dropped, and F < ``clip_frames`` is an error. Rows
    are video-major: video 0's clips in order, then video 1's. Frames are clamped to [-1, 1] and
    resized to 224 x 224 (bilinear, half-pixel centres, no antialiasing) before the network.
    """
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
            frames = F.interpolate(frames, size=(I3D_SIZE, I3D_SIZE), mode="bilinear", align_corners=False)
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


def _default_i3d(model, device):
    from .i3d import load_i3d

    if model is not None:
        return model
    return load_i3d(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def fvd(videos_a: torch.Tensor, videos_b: torch.Tensor, model=None, batch: int = 8,
        clip_frames: int = FVD_CLIP_FRAMES, device=None) -> dict:
    """FVD between two sets of videos (N, 3, F, H, W) and (M, 3, F', H', W') in [-1, 1].

    Every consecutive 16-frame clip of every video is one sample (``i3d_features``); returns
    {"fvd": float, "clips_a": number of clips of set a, "clips_b": ... of set b}. FVD depends on
    the number of clips (it is biased upwards for small sets), so report them with it. ``model``:
    a loaded I3D (``ca2vdm.i3d.load_i3d``); by default one is loaded on ``device`` (CUDA if any).
    """
    model = _default_i3d(model, device)
    fa = i3d_features(model, videos_a, batch, clip_frames)
    fb = i3d_features(model, videos_b, batch, clip_frames)
    return {"fvd": _num(frechet_distance(fa, fb)), "clips_a": len(fa), "clips_b": len(fb)}


def fvd_report(generated: torch.Tensor, reference: torch.Tensor, chunk_frames: int,
               clip_frames: int = FVD_CLIP_FRAMES, model=None, batch: int = 8, device=None) -> dict:
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
    model = _default_i3d(model, device)
    frames = min(generated.shape[2], reference.shape[2])
    windows = frames // clip_frames
    if windows == 0:
        raise ValueError(f"videos have {frames} frames, fewer than one {clip_frames}-frame window")
    used = windows * clip_frames
    fg = i3d_features(model, generated[:, :, :used], batch, clip_frames).reshape(len(generated), windows, -1)
    fr = i3d_features(model, reference[:, :, :used], batch, clip_frames).reshape(len(reference), windows, -1)
    rows = []
    for i in range(windows):
        start, end = i * clip_frames, (i + 1) * clip_frames
        rows.append({"frames": [start, end], "chunks": [start // chunk_frames, (end - 1) // chunk_frames],
                     "fvd": _num(frechet_distance(fg[:, i], fr[:, i])), "clips_a": fg.shape[0], "clips_b": fr.shape[0]})
    overall = frechet_distance(fg.reshape(-1, fg.shape[-1]), fr.reshape(-1, fr.shape[-1]))
    return {"fvd": _num(overall), "clips_a": fg.shape[0] * windows, "clips_b": fr.shape[0] * windows,
            "per_window": rows}


def fvd_per_chunk(generated: torch.Tensor, reference: torch.Tensor, chunk_frames: int,
                  clip_frames: int = FVD_CLIP_FRAMES, model=None, batch: int = 8, device=None) -> list[dict]:
    """The per-window rows of ``fvd_report``: {"frames": [start, end), "chunks": [first, last],
    "fvd", "clips_a" (generated), "clips_b"} per 16-frame window."""
    return fvd_report(generated, reference, chunk_frames, clip_frames, model, batch, device)["per_window"]


# --------------------------------------------------------------------------------------------
# Training the shipped classifier: python -m ca2vdm.evaluate --out models/digit_classifier
# --------------------------------------------------------------------------------------------
def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="Train and save the moving-digits DigitClassifier.")
    p.add_argument("--out", default=str(DEFAULT_CLASSIFIER_DIR))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-digits", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = train_digit_classifier(args.steps, args.seed, args.max_digits, args.device)
    seconds = time.time() - t0
    acc = val_accuracy(model, max_digits=args.max_digits, seed=args.seed)
    print(f"val exact-set accuracy per frame: {acc:.4f}  (trained in {seconds:.0f}s)")
    save_classifier(model, args.out, {
        "train": {"command": "python -m ca2vdm.evaluate --out models/digit_classifier", "steps": args.steps,
                  "batch_size": 64, "lr": 3e-3, "seed": args.seed, "max_digits": args.max_digits,
                  "pool_clips": 6000, "frames_per_clip": 4, "split": "train", "cpu_seconds": round(seconds)},
        "val_exact_set_accuracy": acc,
        "val": {"split": "val", "clips": 512, "frames": 8, "max_digits": args.max_digits, "seed": args.seed},
    })


if __name__ == "__main__":
    main()
