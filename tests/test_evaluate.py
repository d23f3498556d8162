"""Evaluation metrics: the shipped digit classifier, per-chunk digit accuracy, speed tracking, drift, report."""

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("scipy")

from ca2vdm.data import MovingDigits  # noqa: E402
from ca2vdm.metrics.digit_classifier import (DEFAULT_CLASSIFIER_DIR, DigitClassifier, frame_accuracy,  # noqa: E402
                                             load_classifier, multi_hot, save_classifier)
from ca2vdm.metrics.digits import brightness_drift, colour_drift, digit_accuracy, digit_report, track_speeds  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def gt():
    """16 val-split clips of 24 frames with 1-2 digits: (videos (16, 3, 24, 32, 32), items)."""
    ds = MovingDigits(16, 24, max_digits=2, split="val", seed=1)
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it["video"] for it in items]), items


def test_classifier_shapes_and_roundtrip(tmp_path):
    model = DigitClassifier(width=8).eval()
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    assert model(x).shape == (5, 10)
    assert multi_hot([[3, 7, 3], [0]]).sum(1).tolist() == [2, 1]
    save_classifier(model, tmp_path / "clf", {"note": "test"})
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_classifier(tmp_path / "clf")
    assert not loaded.training
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "missing")


def test_shipped_classifier_is_small_and_accurate(classifier):
    size = sum(p.stat().st_size for p in DEFAULT_CLASSIFIER_DIR.iterdir())
    assert size < 2 * 2**20
    ds = MovingDigits(64, 4, max_digits=2, split="val")  # held-out glyphs; frame i % 4 of clip i
    items = [ds[i] for i in range(len(ds))]
    frames = torch.stack([it["video"][:, i % 4] for i, it in enumerate(items)])  # (64, 3, 32, 32)
    acc = frame_accuracy(classifier, frames, multi_hot([it["digits"] for it in items]))
    assert acc >= 0.9, acc


def test_digit_accuracy_gt_high_and_noise_low(classifier, gt):
    videos, items = gt
    digits = [it["digits"] for it in items]
    acc = digit_accuracy(classifier, videos, digits, chunk_frames=4)
    assert len(acc) == 6 and all(0 <= a <= 1 for a in acc)
    assert np.mean(acc) >= 0.85, acc
    noise = torch.rand(videos.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert np.mean(digit_accuracy(classifier, noise, digits)) <= 0.2
    blank = torch.full_like(videos, -1.0)
    assert max(digit_accuracy(classifier, blank, digits)) == 0.0  # the empty set is never right
    # a partial last chunk counts as a chunk
    assert len(digit_accuracy(classifier, videos[:, :, :10], digits, chunk_frames=4)) == 3


def test_track_speeds_matches_ground_truth(gt):
    videos, items = gt
    speeds = track_speeds(videos).numpy()  # (16,)
    true = np.array([it["positions"].diff(dim=0).norm(dim=-1).mean().item() for it in items])
    ratio = speeds / true
    assert np.isfinite(ratio).all()
    assert 0.95 <= np.median(ratio) <= 1.05, ratio
    assert np.mean((ratio >= 0.8) & (ratio <= 1.25)) >= 0.85, ratio

    # single digits that never touch a wall: the tracked speed is |velocity| (sub-pixel exact)
    ds = MovingDigits(24, 12, min_digits=1, max_digits=1, split="val", seed=2)
    items = [ds[i] for i in range(len(ds))]
    steps = [it["positions"].diff(dim=0).norm(dim=-1)[:, 0] for it in items]
    no_bounce = [i for i, (it, s) in enumerate(zip(items, steps))
                 if torch.allclose(s, it["velocities"].norm(dim=-1).expand_as(s), atol=1e-4)]
    assert len(no_bounce) >= 4
    speeds = track_speeds(torch.stack([items[i]["video"] for i in no_bounce])).numpy()
    true = np.array([items[i]["velocities"].norm().item() for i in no_bounce])
    np.testing.assert_allclose(speeds / true, 1.0, atol=0.1)

    # frozen frames move at 0; an empty video has no speed
    frozen = videos[:2, :, :1].expand(-1, -1, 8, -1, -1)
    assert track_speeds(frozen).tolist() == [0.0, 0.0]
    assert math.isnan(track_speeds(torch.full((1, 3, 5, 32, 32), -1.0)).item())


def test_brightness_drift():
    const = torch.full((2, 3, 12, 32, 32), 0.3)
    out = brightness_drift(const, chunk_frames=4)
    assert out["drift"] == 0.0
    np.testing.assert_allclose(out["chunk_means"], [0.65] * 3, atol=1e-6)
    ramp = torch.linspace(-1, 1, 8).view(1, 1, 8, 1, 1).expand(1, 3, 8, 4, 4)  # 0 -> 1 in [0, 1] scale
    out = brightness_drift(ramp, chunk_frames=4)
    assert len(out["chunk_means"]) == 2 and out["drift"] == pytest.approx(4 / 7, abs=1e-6)


def test_colour_drift_sees_a_tint_the_brightness_misses():
    """Red rises as blue falls: the brightness stays put, the colour drifts by sqrt(2) x 4/7."""
    ramp = torch.linspace(-1, 1, 8).view(1, 1, 8, 1, 1).expand(2, 1, 8, 4, 4)
    video = torch.cat([ramp, torch.zeros_like(ramp), -ramp], dim=1)  # (2, 3, 8, 4, 4)
    assert brightness_drift(video)["drift"] == pytest.approx(0.0, abs=1e-6)
    out = colour_drift(video, chunk_frames=4)
    np.testing.assert_allclose(out["drift"], [4 / 7, 0.0, -4 / 7], atol=1e-6)
    assert out["drift_norm"] == pytest.approx(math.sqrt(2) * 4 / 7, abs=1e-6)
    np.testing.assert_allclose(out["chunk_means"][0], [3 / 14, 0.5, 11 / 14], atol=1e-6)


def test_digit_report_gt_vs_itself(classifier, gt):
    videos, items = gt
    digits = [it["digits"] for it in items]
    report = digit_report(classifier, videos, digits, videos, chunk_frames=4, horizons=(8, 16, 1000))
    json.dumps(report, allow_nan=False)  # plain JSON
    for key in ("acc", "acc_gt", "acc_ratio", "min_acc_ratio_128", "speed", "speed_gt", "speed_ratio",
                "speed_ratio_paired", "brightness", "brightness_gt", "brightness_drift", "brightness_drift_gt",
                "colour", "colour_gt", "colour_drift", "colour_drift_gt", "overall", "horizons", "frames",
                "chunk_frames"):
        assert key in report, key
    assert report["frames"] == 24 and len(report["acc"]) == 6
    assert sorted(report["horizons"]) == ["16", "8"]  # 1000 is beyond the videos
    assert all(r == 1.0 for r in report["acc_ratio"])
    assert report["min_acc_ratio_128"] == 1.0
    assert report["speed_ratio"] == 1.0 and report["speed_ratio_paired"] == 1.0
    assert report["brightness_drift"] == report["brightness_drift_gt"]
    assert report["colour_drift"] == report["colour_drift_gt"] and report["overall"]["colour_drift"] >= 0
    assert report["overall"]["acc_worst_chunk"] == report["overall"]["acc_gt_worst_chunk"] == min(report["acc"])
    for h, s in report["horizons"].items():
        assert s["frames"] == int(h)
        assert s["acc_ratio"] == 1.0 and s["min_acc_ratio"] == 1.0 and s["speed_ratio"] == 1.0

    # a generator that freezes its first frame: digits stay right, motion is gone
    frozen = videos[:, :, :1].expand(-1, -1, 24, -1, -1)
    report = digit_report(classifier, frozen, digits, videos, chunk_frames=4, horizons=(16,))
    assert report["speed_ratio"] == 0.0 and report["brightness_drift"] == 0.0
    # one that fades to black: accuracy collapses in the late chunks, brightness drifts down
    fade = (videos + 1) * torch.linspace(1, 0, 24).view(1, 1, 24, 1, 1) - 1
    report = digit_report(classifier, fade, digits, videos, chunk_frames=4, horizons=(16,))
    assert report["acc"][-1] == 0.0 and report["acc_ratio"][-1] == 0.0
    assert report["brightness_drift"] < 0


def test_psnr_and_ssim_by_hand():
    from ca2vdm.metrics import fidelity, psnr, ssim

    a = torch.zeros(1, 3, 2, 16, 16)
    b = a.clone()
    b[:, :, 1] += 0.1  # MSE 0.01 on frame 1 over a range of width 2: 10 log10(4 / 0.01)
    p = psnr(a, b)
    assert p[0, 0] == float("inf") and p[0, 1].item() == pytest.approx(10 * math.log10(400.0))
    # constant frames: the variance terms vanish, SSIM = (2 m1 m2 + c1) / (m1^2 + m2^2 + c1)
    x = torch.full((1, 1, 1, 12, 12), 0.3, dtype=torch.float64)
    y = torch.full((1, 1, 1, 12, 12), -0.2, dtype=torch.float64)
    c1 = (0.01 * 2) ** 2
    assert ssim(x, y).item() == pytest.approx((2 * 0.3 * -0.2 + c1) / (0.09 + 0.04 + c1), rel=1e-9)
    g = torch.Generator().manual_seed(0)
    v = torch.rand(2, 3, 4, 32, 32, generator=g) * 2 - 1
    assert torch.allclose(ssim(v, v), torch.ones(2, 4, dtype=torch.float64))
    noisy = [v + s * torch.randn(v.shape, generator=g) for s in (0.05, 0.2, 0.5)]
    ss = [ssim(v, n).mean().item() for n in noisy]
    ps = [psnr(v, n).mean().item() for n in noisy]
    assert ss[0] > ss[1] > ss[2] and ps[0] > ps[1] > ps[2]
    f = fidelity(noisy[0], v, chunk_frames=2)
    assert len(f["psnr_per_chunk"]) == 2 and f["ssim"] == pytest.approx(ss[0])
    with pytest.raises(ValueError, match="differ in shape"):
        fidelity(v[:, :, :2], v, 2)


def test_position_error_is_the_shift_of_the_digit():
    clips = MovingDigits(4, 8, size=32, split="val", seed=3, max_digits=1, digit_size=12)
    video = torch.stack([clips[i]["video"] for i in range(4)])  # (4, 3, 8, 32, 32)
    from ca2vdm.metrics.digits import position_error

    assert position_error(video, video) == pytest.approx(0.0, abs=1e-6)
    padded = torch.nn.functional.pad(video, (8, 8, 8, 8), value=-1)  # room to shift without wrapping
    shifted = torch.roll(padded, shifts=(3, 4), dims=(-2, -1))
    assert position_error(shifted, padded) == pytest.approx(5.0, abs=1e-4)  # a (3, 4) px shift
    assert position_error(torch.full_like(video, -1), video) is None  # nothing bright: no figure


def test_a_switched_caption_names_another_digit():
    from ca2vdm.eval.steering import other_digit

    seen = set()
    for i in range(9):
        caption, d = other_digit("a 3 moving down and right", 3, i)
        assert d != 3 and caption == f"a {d} moving down and right"
        seen.add(d)
    assert len(seen) == 9  # consecutive videos switch to every other digit
