"""Cyclic TPE rows never collide inside an attention set; RoPE angles stay exact far out."""

import torch

from ca2vdm import ChunkLayout
from ca2vdm.positions import CyclicTPE, RoPE, sincos_2d


def test_cyclic_rows_unique_within_every_attention_set():
    lay = ChunkLayout(1, 8, 25)
    tpe = CyclicTPE(33, 16)
    for k in range(1, 40):
        s = lay.chunk_start(k)
        frames = list(lay.window(k)) + list(range(s, s + 8))
        rows = [(n % 33) for n in frames]
        assert len(set(rows)) == len(rows)
        table = tpe(range(frames[0], frames[-1] + 1))
        assert torch.unique(table, dim=0).shape[0] == len(frames)


def test_cyclic_shift_rotates_rows():
    tpe = CyclicTPE(10, 8)
    assert torch.equal(tpe(range(3, 6), shift=4), tpe(range(7, 10)))
    assert torch.equal(tpe(range(12, 13)), tpe(range(2, 3)))


def test_rope_angles_float64_and_relative():
    rope = RoPE(16)
    cos, sin = rope.angles(range(100_000, 100_003), torch.float64)
    ang = torch.tensor([100_000.0], dtype=torch.float64) * rope.inv_freq
    assert torch.allclose(cos[0], torch.cos(ang), atol=1e-12)
    q, k = torch.randn(1, 16, dtype=torch.float64), torch.randn(1, 16, dtype=torch.float64)
    # relative: <R(m) q, R(n) k> depends only on m - n, also 100,000 frames out
    def dot(m, n):
        cm, sm = rope.angles(range(m, m + 1), torch.float64)
        cn, sn = rope.angles(range(n, n + 1), torch.float64)
        return (RoPE.rotate(q, cm, sm) * RoPE.rotate(k, cn, sn)).sum()
    assert abs(dot(7, 3) - dot(100_007, 100_003)) < 1e-9


def test_sincos_2d_shape_and_distinct_rows():
    pe = sincos_2d(4, 4, 32)
    assert pe.shape == (16, 32) and torch.unique(pe, dim=0).shape[0] == 16


def test_rope_angles_stay_float64_when_the_model_is_cast():
    """model.to(float32 / bfloat16) must not cast the RoPE frequencies (float32 angles drift ~1e-3 rad)."""
    from ca2vdm import CausalVideoDiT, ModelConfig

    model = CausalVideoDiT(ModelConfig(frame_size=8, patch=4, hidden=32, heads=2, depth=1, positions="rope"))
    model = model.to(torch.bfloat16).to(torch.float32)
    assert model.rope.inv_freq.dtype == torch.float64
    cos, _ = model.rope.angles(range(100_000, 100_001), torch.float64)
    exact = torch.cos(torch.tensor(100_000.0, dtype=torch.float64) * model.rope.inv_freq)
    assert torch.allclose(cos[0], exact, atol=1e-12)
