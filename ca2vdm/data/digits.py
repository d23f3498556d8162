"""Moving digits: a procedural, captioned toy video dataset (Moving-MNIST style, in colour).

Glyphs are scikit-learn's bundled 8x8 handwritten digits (``sklearn.datasets.load_digits``, 1797
images, no download), upscaled bilinearly to ``digit_size`` pixels. Each clip has 1-3 digits,
each with its own colour, moving at constant speed and bouncing off the frame edges:

    video     (C, F, H, W) float32 in [-1, 1]   black background -1, overlapping digits combine by max
    caption   "a 3 moving left and a 7 moving up and right"
    label     class of the first digit
    digits    class of every digit, in caption order
    positions (F, n, 2) float32 glyph centres (y, x) in pixel-index coordinates, per frame
    velocities (n, 2)   float32 initial velocity (vy, vx) in pixels/frame (y grows downwards)

Clip i is a pure function of (seed, split, i): it is drawn from ``numpy.random.default_rng([seed,
split_id, i])``, so any clip can be regenerated anywhere, in any order, by any worker. "train" and
"val" use disjoint glyph instances (even / odd sklearn indices) and different random streams.

Positions are exact: a glyph is drawn at sub-pixel offsets by bilinear splatting, which moves its
intensity centroid by exactly the offset, so tracked centroids reproduce ``positions``.
"""

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

SPLITS = {"train": 0, "val": 1}
DIRECTIONS = ["right", "up and right", "up", "up and left", "left", "down and left", "down", "down and right"]


# --------------------------------------------------------------------------------------------
# Glyphs
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def load_glyphs(split: str = "train", digit_size: int = 12):
    """The split's glyphs -> (glyphs (N, d, d) float32 in [0, 1], labels (N,), sklearn indices (N,))."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    data = load_digits()
    index = np.arange(len(data.images))[SPLITS[split]::2]  # train: even, val: odd
    small = torch.from_numpy(data.images[index] / 16.0).float()[:, None]  # (N, 1, 8, 8)
    big = F.interpolate(small, size=(digit_size, digit_size), mode="bilinear", align_corners=False)
    glyphs = big[:, 0].clamp(0, 1).numpy()  # (N, d, d)
    for a in (glyphs, index):
        a.flags.writeable = False  # cached and shared: never modify in place
    labels = data.target[index].astype(np.int64)
    labels.flags.writeable = False
    return glyphs, labels, index


# --------------------------------------------------------------------------------------------
# Motion, rendering and captions
# --------------------------------------------------------------------------------------------
def bounce(start: np.ndarray, velocity: np.ndarray, frames: int, lo: float, hi: float) -> np.ndarray:
    """Constant-speed motion reflected off the walls [lo, hi]: (n, 2), (n, 2) -> (frames, n, 2).

    Closed form: the unfolded path start + v*t folded into [lo, hi] by a triangle wave of period
    2(hi - lo), which is the same as reflecting the velocity component at every wall hit.
    """
    t = np.arange(frames, dtype=np.float64)[:, None, None]  # (F, 1, 1)
    length = hi - lo
    if length <= 0:
        return np.full((frames,) + start.shape, lo, dtype=np.float64)
    x = (start - lo) + velocity * t  # (F, n, 2) unfolded offset from the wall
    return np.clip(lo + length - np.abs(np.mod(x, 2 * length) - length), lo, hi)  # clip: rounding only


def splat(canvas: np.ndarray, glyph: np.ndarray, top: float, left: float) -> None:
    """Max-composite a (d, d) glyph into a (H+1, W+1) canvas at a sub-pixel top-left, bilinearly."""
    d = glyph.shape[0]
    y0, x0 = math.floor(top), math.floor(left)
    fy, fx = top - y0, left - x0
    patch = np.zeros((d + 1, d + 1), dtype=np.float32)  # the glyph shifted by (fy, fx) in [0, 1)
    patch[:d, :d] += (1 - fy) * (1 - fx) * glyph
    patch[1:, :d] += fy * (1 - fx) * glyph
    patch[:d, 1:] += (1 - fy) * fx * glyph
    patch[1:, 1:] += fy * fx * glyph
    region = canvas[y0:y0 + d + 1, x0:x0 + d + 1]
    np.maximum(region, patch, out=region)


def render_clip(rng: np.random.Generator, frames: int, size: int = 32, channels: int = 3,
                glyphs=None, labels=None, min_digits: int = 1, max_digits: int = 3,
                speed_range=(0.5, 2.5), digit_size: int = 12) -> dict:
    """Draw one clip from ``rng``. Returns video (C, F, H, W) in [-1, 1] plus its ground truth.

    ``glyphs``/``labels`` default to the train split's. The dict also has ``glyph_ids`` (rows of
    ``glyphs``) and ``colours`` (n, C), which ``MovingDigits`` leaves out of its items.
    """
    if glyphs is None:
        glyphs, labels, _ = load_glyphs("train", digit_size)
    d = glyphs.shape[-1]
    if frames < 1 or size < d:
        raise ValueError(f"need frames >= 1 and size >= digit size, got frames={frames}, size={size}, d={d}")

    n = int(rng.integers(min_digits, max_digits + 1))
    glyph_ids = rng.integers(len(glyphs), size=n)  # (n,)
    colours = rng.uniform(0.5, 1.0, size=(n, channels)).astype(np.float32)  # (n, C)
    lo, hi = (d - 1) / 2, size - 1 - (d - 1) / 2  # centre range that keeps the glyph inside
    start = rng.uniform(lo, hi, size=(n, 2))  # (n, 2) centres (y, x)
    speed = rng.uniform(*speed_range, size=n)  # (n,) pixels/frame
    angle = rng.uniform(0, 2 * math.pi, size=n)
    velocity = np.stack([-np.sin(angle), np.cos(angle)], axis=1) * speed[:, None]  # (n, 2), y down
    centres = bounce(start, velocity, frames, lo, hi)  # (F, n, 2)

    canvas = np.zeros((frames, channels, size + 1, size + 1), dtype=np.float32)  # +1: splat spill
    for k in range(n):
        layer = np.zeros((size + 1, size + 1), dtype=np.float32)
        for f in range(frames):
            layer[:] = 0
            top, left = centres[f, k] - (d - 1) / 2
            splat(layer, glyphs[glyph_ids[k]], top, left)
            np.maximum(canvas[f], colours[k][:, None, None] * layer, out=canvas[f])
    video = torch.from_numpy(canvas[:, :, :size, :size]).permute(1, 0, 2, 3) * 2 - 1  # (C, F, H, W)

    return {
        "video": video.contiguous(),
        "digits": [int(labels[g]) for g in glyph_ids],
        "positions": torch.from_numpy(centres).float(),  # (F, n, 2)
        "velocities": torch.from_numpy(velocity).float(),  # (n, 2)
        "glyph_ids": [int(g) for g in glyph_ids],
        "colours": torch.from_numpy(colours),  # (n, C)
    }


def direction(velocity) -> str:
    """(vy, vx) -> one of 8 compass words (y grows downwards), the nearest 45-degree direction."""
    vy, vx = float(velocity[0]), float(velocity[1])
    if math.hypot(vy, vx) < 1e-6:
        return "nowhere"
    octant = round(math.atan2(-vy, vx) / (math.pi / 4)) % 8
    return DIRECTIONS[octant]


def caption_for(digits, velocities) -> str:
    """[3, 7], [(0, -1), (-1, 0)] -> "a 3 moving left and a 7 moving up" ("a 1 ..., a 2 ... and a 3 ...")."""
    parts = [f"{'an' if d == 8 else 'a'} {d} moving {direction(v)}" for d, v in zip(digits, velocities)]
    return " and ".join(filter(None, [", ".join(parts[:-1])] + parts[-1:]))


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------
class MovingDigits(torch.utils.data.Dataset):
    """``num_clips`` deterministic clips of ``frames`` frames; ``ds[i]`` depends only on (seed, split, i)."""

    keys = ("video", "caption", "label", "digits", "positions", "velocities")

    def __init__(self, num_clips: int, frames: int, size: int = 32, channels: int = 3,
                 min_digits: int = 1, max_digits: int = 3, speed_range=(0.5, 2.5), seed: int = 0,
                 digit_size: int = 12, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
        if frames < 1 or size < digit_size:
            raise ValueError(f"need frames >= 1 and size >= digit_size, got {frames}, {size}, {digit_size}")
        self.num_clips, self.frames, self.size, self.channels = num_clips, frames, size, channels
        self.min_digits, self.max_digits, self.speed_range = min_digits, max_digits, tuple(speed_range)
        self.seed, self.digit_size, self.split = seed, digit_size, split

    def __len__(self) -> int:
        return self.num_clips

    def sample(self, i: int) -> dict:
        """Everything about clip i: the item's keys plus ``glyph_ids`` and ``colours``."""
        if not 0 <= i < self.num_clips:
            raise IndexError(f"clip {i} out of range for {self.num_clips} clips")
        glyphs, labels, _ = load_glyphs(self.split, self.digit_size)
        rng = np.random.default_rng([self.seed, SPLITS[self.split], i])
        clip = render_clip(rng, self.frames, self.size, self.channels, glyphs, labels, self.min_digits,
                           self.max_digits, self.speed_range, self.digit_size)
        clip["caption"] = caption_for(clip["digits"], clip["velocities"])
        clip["label"] = clip["digits"][0]
        return clip

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if i < 0:
            i += self.num_clips
        clip = self.sample(i)
        return {k: clip[k] for k in self.keys}


def collate(batch: list) -> dict:
    """DataLoader collate_fn: stack video (B, C, F, H, W) and label (B,); ragged fields stay lists."""
    return {
        "video": torch.stack([b["video"] for b in batch]),
        "caption": [b["caption"] for b in batch],
        "label": torch.tensor([b["label"] for b in batch], dtype=torch.long),
        "digits": [b["digits"] for b in batch],
        "positions": [b["positions"] for b in batch],
        "velocities": [b["velocities"] for b in batch],
    }
