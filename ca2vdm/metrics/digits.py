"""Measuring generated moving-digit videos: are the digits still there, do they move, does it drift?

Generated videos are tensors (B, 3, F, 32, 32) in roughly [-1, 1] from a text-conditioned model
trained on ``MovingDigits``. Five measurements, all per chunk of ``chunk_frames`` frames (the
model's generation unit) so that degradation over long horizons shows up:

    digit_accuracy    the digit classifier (``digit_classifier.DigitClassifier``) reads every frame;
                      per chunk the sigmoid probabilities are averaged over the chunk's frames,
                      thresholded at 0.5 and the predicted digit *set* must equal the caption's set
    track_speeds      connected components of bright pixels -> centroids -> Hungarian matching
                      between consecutive frames -> mean displacement in pixels/frame
    brightness_drift  mean pixel value per chunk in [0, 1]; drift = last chunk - first chunk
    colour_drift      the same per colour channel: a tint creeping in over the video
    digit_report      the published figures: generated vs ground truth, overall and up to each
                      horizon (128, 256, 1000 frames), JSON-serialisable
"""

import math

import numpy as np
import torch

from .common import chunk_slices, finite
from .digit_classifier import DigitClassifier, multi_hot


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


def chunk_correct(classifier: DigitClassifier, videos: torch.Tensor, digits, chunk_frames: int = 4) -> torch.Tensor:
    """(B, num_chunks) bool: whether each chunk of each video is read as exactly its digits."""
    return _chunk_correct(digit_probs(classifier, videos), digits, chunk_frames)


def _chunk_correct(probs: torch.Tensor, digits, chunk_frames: int) -> torch.Tensor:
    """probs (B, F, 10) -> (B, num_chunks) bool: chunk-averaged prediction set == true set."""
    target = multi_hot(digits).bool()                                       # (B, 10)
    if target.shape[0] != probs.shape[0]:
        raise ValueError(f"{probs.shape[0]} videos but {target.shape[0]} digit lists")
    cols = [((probs[:, s].mean(1) > 0.5) == target).all(-1) for s in chunk_slices(probs.shape[1], chunk_frames)]
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


def position_error(videos: torch.Tensor, reference: torch.Tensor, threshold: float = -0.5) -> float | None:
    """Mean distance (px) between the brightness-weighted centroid of the bright pixels (above
    ``threshold``, max over channels) of each frame of ``videos`` and of the same frame of ``reference``
    (B, C, F, H, W) each: where a one-digit video puts its digit against where the reference has it.
    Frames where either is empty are skipped; None if all are."""
    def centroids(v):  # (B, F, 2) y, x and (B, F) whether any pixel is bright
        bright = v.detach().float().amax(dim=1)                               # (B, F, H, W)
        w = ((bright + 1) / 2) * (bright > threshold)
        H, W = bright.shape[-2:]
        ys = torch.arange(H, dtype=torch.float32)[:, None].expand(H, W)
        xs = torch.arange(W, dtype=torch.float32)[None, :].expand(H, W)
        total = w.sum((-1, -2))
        c = torch.stack([(w * ys).sum((-1, -2)), (w * xs).sum((-1, -2))], -1) / total.clamp_min(1e-9)[..., None]
        return c, total > 0

    a, ok_a = centroids(videos.cpu())
    b, ok_b = centroids(reference.cpu())
    ok = ok_a & ok_b
    return finite((a - b).norm(dim=-1)[ok].mean()) if bool(ok.any()) else None


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
    means = [per_frame[s].mean().item() for s in chunk_slices(len(per_frame), chunk_frames)]
    return {"chunk_means": means, "drift": means[-1] - means[0]}


def colour_drift(videos: torch.Tensor, chunk_frames: int = 4) -> dict:
    """Mean colour per chunk in [0, 1] (per channel, over videos, frames, pixels) and its drift.

    videos (B, C, F, H, W) in ~[-1, 1] -> {"chunk_means": [[float] * C] * num_chunks, "drift":
    [last - first] * C, "drift_norm": the Euclidean length of that vector}: a tint that creeps in
    shows here even when the brightness (the mean over channels) stays put.
    """
    per_frame = ((videos.detach().float() + 1) / 2).mean(dim=(0, 3, 4)).cpu()   # (C, F)
    means = [per_frame[:, s].mean(1).tolist() for s in chunk_slices(per_frame.shape[1], chunk_frames)]
    drift = [b - a for a, b in zip(means[0], means[-1])]
    return {"chunk_means": means, "drift": drift, "drift_norm": math.sqrt(sum(d * d for d in drift))}


# --------------------------------------------------------------------------------------------
# The published report
# --------------------------------------------------------------------------------------------
def _ratio(a, b):
    return finite(a / b) if b not in (0, None) and a is not None else None


def _nanmedian(x: np.ndarray):
    return finite(np.nanmedian(x)) if np.isfinite(x).any() else None


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
    colour = colour_drift(videos[:, :, :frames], chunk_frames)["drift_norm"]
    colour_gt = colour_drift(gt_videos[:, :, :frames], chunk_frames)["drift_norm"]
    valid = [r for r in ratios if r is not None]
    return {
        "frames": frames,
        "acc_mean": finite(acc.mean()), "acc_gt_mean": finite(acc_gt.mean()),
        "acc_ratio": _ratio(acc.mean().item(), acc_gt.mean().item()),
        "min_acc_ratio": min(valid) if valid else None,
        "acc_worst_chunk": finite(acc.min()), "acc_gt_worst_chunk": finite(acc_gt.min()),
        "acc_last_chunk": finite(acc[-1]), "acc_gt_last_chunk": finite(acc_gt[-1]),
        "speed": med, "speed_gt": med_gt, "speed_ratio": _ratio(med, med_gt), "speed_ratio_paired": paired,
        "brightness_drift": finite(drift), "brightness_drift_gt": finite(drift_gt),
        "colour_drift": finite(colour), "colour_drift_gt": finite(colour_gt),
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
        colour*, colour_drift*           the same per channel (``colour_drift``); the summaries
                                         give the drift's length (``colour_drift``)
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
    colour, colour_gt = colour_drift(videos, chunk_frames), colour_drift(gt_videos, chunk_frames)
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
        "brightness_drift": finite(bright["drift"]), "brightness_drift_gt": finite(bright_gt["drift"]),
        "colour": colour["chunk_means"], "colour_gt": colour_gt["chunk_means"],
        "colour_drift": colour["drift"], "colour_drift_gt": colour_gt["drift"],
        "overall": overall,
        "horizons": {str(h): summary(h) for h in horizons if h <= frames},
    }
