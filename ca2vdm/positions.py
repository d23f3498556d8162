"""Positions: 2-D spatial sin-cos, cyclic temporal position embedding (TPE) and temporal RoPE.

Ca2-VDM idea 4. A video of unbounded length must never run out of positions:

* ``CyclicTPE`` — a sin-cos table of length L = P_max + l; frame n gets row ``(n + shift) mod L``.
  Any window of P_max cached frames plus the l frames being denoised spans at most L frames, so
  no two frames that can see each other share a row. Training shifts the rows at random so every
  rotation that inference meets has been seen.
* ``RoPE`` — relative rotary positions on temporal attention. Keys are rotated at their absolute
  frame index when they are written to the cache. Angles are computed in float64 (float32 angles
  drift by ~1e-3 rad at frame 100,000) and positions are never taken modulo anything.
"""

import math

import torch


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Sin-cos embedding of (N,) positions -> (N, dim), computed in float64."""
    assert dim % 2 == 0, "sin-cos embedding needs an even dimension"
    pos = positions.to(torch.float64)
    freq = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = pos[:, None] * freq[None, :]  # (N, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(height: int, width: int, dim: int) -> torch.Tensor:
    """2-D sin-cos embedding of a height x width token grid -> (height*width, dim), row-major."""
    assert dim % 4 == 0, "2-D sin-cos embedding needs a dimension divisible by 4"
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.cat([sincos_1d(ys.flatten(), dim // 2), sincos_1d(xs.flatten(), dim // 2)], dim=1)


class CyclicTPE(torch.nn.Module):
    """Cyclic temporal position embedding: frame n -> row (n + shift) mod length of a sin-cos table.

    The table is stored twice over (2L rows), so the rows of any run of at most L consecutive frames
    are one contiguous slice: a cached step reads its positions as a view, with no index built,
    no kernel and no host-to-device copy."""

    def __init__(self, length: int, dim: int):
        super().__init__()
        self.length = length
        self.register_buffer("table", sincos_1d(torch.arange(length), dim).float(), persistent=False)
        self.register_buffer("doubled", torch.cat([self.table, self.table]), persistent=False)

    def forward(self, frames, shift: int = 0) -> torch.Tensor:
        """Rows for absolute frame indices ``frames`` (a range, or any sequence) -> (F, dim).
        ``shift`` is a host integer."""
        if isinstance(frames, range) and frames.step == 1 and len(frames) <= self.length:
            s = (frames.start + shift) % self.length
            return self.doubled[s:s + len(frames)]
        rows = torch.as_tensor([(n + shift) % self.length for n in frames], device=self.table.device)
        return self.table.index_select(0, rows)


class RoPE(torch.nn.Module):
    """Rotary position embedding over absolute frame indices, angles in float64."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        assert head_dim % 2 == 0
        self.head_dim, self.base = head_dim, base
        # A buffer would be cast by model.to(dtype); the frequencies stay float64, one copy per device.
        self.inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self._on_device = {}

    def angles(self, frames, dtype: torch.dtype, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (F, head_dim/2), for absolute frame indices; float64 math, then cast.
        A range of frames (every cached step) is made on the device itself: no host-to-device copy."""
        device = torch.device("cpu") if device is None else torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = self.inv_freq.to(device)
        if isinstance(frames, range):
            pos = torch.arange(frames.start, frames.stop, frames.step, dtype=torch.float64, device=device)
        else:
            pos = torch.tensor(list(frames), dtype=torch.float64, device=device)
        ang = pos[:, None] * self._on_device[device][None, :]  # (F, d/2), float64
        return torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x (..., F, d) by per-frame angles (F, d/2): half-split pairs (x_i, x_{i+d/2})."""
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
