"""Helpers every metric shares: JSON-safe numbers and the chunk slices figures are reported over."""

import math


def finite(x):
    """float, or None for NaN/inf (strict JSON has no NaN)."""
    x = float(x)
    return x if math.isfinite(x) else None


def chunk_slices(frames: int, chunk_frames: int) -> list[slice]:
    """Frame slices of consecutive chunks; a trailing partial chunk counts as a chunk."""
    return [slice(s, min(s + chunk_frames, frames)) for s in range(0, frames, chunk_frames)]
