"""Moving digits: determinism, shapes, bouncing, exact positions, captions and split disjointness."""

import math
import re

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from ca2vdm.data import MovingDigits, caption_for, collate, load_glyphs, render_clip  # noqa: E402
from ca2vdm.data.digits import splat  # noqa: E402

PHRASE = re.compile(r"an? (\d) moving ((?:up|down)(?: and (?:left|right))?|left|right)")


def test_deterministic():
    a, b = MovingDigits(8, 9, seed=3), MovingDigits(8, 9, seed=3)
    b[7], b[2]  # access order must not matter
    for i in range(8):
        x, y = a[i], b[i]
        assert torch.equal(x["video"], y["video"]) and torch.equal(x["positions"], y["positions"])
        assert torch.equal(x["velocities"], y["velocities"]) and x["caption"] == y["caption"]
        assert x["digits"] == y["digits"]
    assert not torch.equal(a[0]["video"], a[1]["video"])
    assert not torch.equal(a[0]["video"], MovingDigits(8, 9, seed=4)[0]["video"])
    assert torch.equal(a[-1]["video"], a[7]["video"])
    with pytest.raises(IndexError):
        a[8]


@pytest.mark.parametrize("frames", [1, 7, 40])
@pytest.mark.parametrize("size,channels", [(32, 3), (24, 1)])
def test_shapes_range_dtype(frames, size, channels):
    ds = MovingDigits(4, frames, size=size, channels=channels)
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"video", "caption", "label", "digits", "positions", "velocities"}
        v, n = item["video"], len(item["digits"])
        assert v.shape == (channels, frames, size, size) and v.dtype == torch.float32
        assert v.min() >= -1 and v.max() <= 1 and v.max() > 0  # digits are bright
        assert (v == -1).float().mean() > 0.3  # mostly black background
        assert item["positions"].shape == (frames, n, 2) and item["positions"].dtype == torch.float32
        assert item["velocities"].shape == (n, 2) and item["velocities"].dtype == torch.float32
        assert 1 <= n <= 3 and isinstance(item["caption"], str) and isinstance(item["label"], int)


def test_label_is_first_digit():
    ds = MovingDigits(30, 2, min_digits=2, max_digits=3)
    labels = set()
    for i in range(len(ds)):
        item = ds[i]
        assert item["label"] == item["digits"][0] and all(0 <= d <= 9 for d in item["digits"])
        assert 2 <= len(item["digits"]) <= 3
        labels.add(item["label"])
    assert len(labels) >= 5


def test_bounce_keeps_digits_inside():
    size, d, frames = 32, 12, 200
    lo, hi = (d - 1) / 2, size - 1 - (d - 1) / 2
    ds = MovingDigits(6, frames, size=size, digit_size=d, speed_range=(1.5, 2.5))
    for i in range(len(ds)):
        item = ds[i]
        pos, vel = item["positions"].double(), item["velocities"].double()  # (F, n, 2), (n, 2)
        assert pos.min() >= lo - 1e-6 and pos.max() <= hi + 1e-6
        # an independent step-by-step simulation: move, reflect off a wall, flip that component
        p, v, sim = pos[0].clone(), vel.clone(), [pos[0].clone()]
        for _ in range(frames - 1):
            p = p + v
            low, high = p < lo, p > hi
            p = torch.where(low, 2 * lo - p, torch.where(high, 2 * hi - p, p))
            v = torch.where(low | high, -v, v)
            sim.append(p.clone())
        assert torch.allclose(torch.stack(sim), pos, atol=1e-3)
        step = pos[1:] - pos[:-1]  # (F-1, n, 2)
        assert (step.sign() != vel.sign()).any()  # it did bounce
        # nothing is drawn outside the union of the glyph boxes
        video = item["video"]
        mask = torch.zeros(frames, size, size, dtype=torch.bool)
        for f in range(frames):
            for y, x in pos[f]:
                t, l = math.floor(y - lo), math.floor(x - lo)
                mask[f, t:t + d + 1, l:l + d + 1] = True
        assert (video[:, ~mask] == -1).all()


def test_positions_match_rendered_centroid():
    ds = MovingDigits(5, 30, min_digits=1, max_digits=1)
    for i in range(len(ds)):
        item = ds[i]
        img = (item["video"].double() + 1).sum(0) / 2  # (F, H, W) intensity
        ys, xs = torch.arange(32.0, dtype=torch.float64), torch.arange(32.0, dtype=torch.float64)
        mass = img.sum((1, 2))
        centroid = torch.stack([(img.sum(2) * ys).sum(1) / mass, (img.sum(1) * xs).sum(1) / mass], 1)
        moved = centroid - centroid[0]
        assert torch.allclose(moved, item["positions"][:, 0].double() - item["positions"][0, 0], atol=1e-3)


def test_caption_matches_digits_and_velocities():
    ds = MovingDigits(40, 1)
    sin_22 = math.sin(math.pi / 8)
    for i in range(len(ds)):
        item = ds[i]
        found = PHRASE.findall(item["caption"])
        assert [int(d) for d, _ in found] == item["digits"]
        assert item["caption"] == caption_for(item["digits"], item["velocities"])
        for (_, words), (vy, vx) in zip(found, item["velocities"].tolist()):
            words, speed = set(words.split()), math.hypot(vy, vx)
            for word, ok in [("left", vx < 0), ("right", vx > 0), ("up", vy < 0), ("down", vy > 0)]:
                assert ok or word not in words
            if not words & {"left", "right"}:
                assert abs(vx) <= sin_22 * speed + 1e-6
            if not words & {"up", "down"}:
                assert abs(vy) <= sin_22 * speed + 1e-6
    assert caption_for([3, 7], [(0.0, -1.0), (-1.0, 0.0)]) == "a 3 moving left and a 7 moving up"
    assert caption_for([8], [(1.0, 1.0)]) == "an 8 moving down and right"
    assert caption_for([1, 2, 3], [(0, 1), (0, 1), (-1, -1)]) == \
        "a 1 moving right, a 2 moving right and a 3 moving up and left"


def test_train_val_disjoint():
    _, _, train = load_glyphs("train", 12)
    _, _, val = load_glyphs("val", 12)
    assert not set(train.tolist()) & set(val.tolist())
    assert len(train) + len(val) == 1797
    tr, va = MovingDigits(10, 2, split="train"), MovingDigits(10, 2, split="val")
    for i in range(10):
        assert all(train[g] % 2 == 0 for g in tr.sample(i)["glyph_ids"])
        assert all(val[g] % 2 == 1 for g in va.sample(i)["glyph_ids"])
    assert not torch.equal(tr[0]["positions"][0], va[0]["positions"][0])  # different streams too
    with pytest.raises(ValueError):
        MovingDigits(1, 1, split="test")


def test_colours_and_max_compositing():
    # each digit has its own colour, so RGB channels differ
    clip = MovingDigits(1, 1, min_digits=3, max_digits=3).sample(0)
    assert (clip["colours"] >= 0.5).all() and (clip["colours"] <= 1).all()
    assert not torch.equal(clip["video"][0], clip["video"][1])
    # splatting is max, not sum; an integer offset places the glyph exactly
    glyph = load_glyphs("train", 12)[0][0]
    canvas = np.zeros((33, 33), dtype=np.float32)
    splat(canvas, glyph, 5.0, 9.0)
    splat(canvas, glyph, 5.0, 9.0)
    assert np.array_equal(canvas[5:17, 9:21], glyph) and canvas.sum() == pytest.approx(glyph.sum())


def test_render_clip_and_collate():
    a = render_clip(np.random.default_rng(0), 5, size=20, digit_size=10)
    b = render_clip(np.random.default_rng(0), 5, size=20, digit_size=10)
    assert torch.equal(a["video"], b["video"]) and a["video"].shape == (3, 5, 20, 20)
    loader = torch.utils.data.DataLoader(MovingDigits(6, 4), batch_size=3, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["video"].shape == (3, 3, 4, 32, 32) and batch["label"].shape == (3,)
    assert len(batch["caption"]) == len(batch["positions"]) == 3
