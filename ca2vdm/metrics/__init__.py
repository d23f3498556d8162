"""Metrics on videos as tensors (no model, no generation): FVD with the Kinetics-400 I3D, PSNR /
SSIM against a reference, and the moving-digits figures with their digit classifier."""

from .common import chunk_slices, finite
from .fidelity import fidelity, per_chunk, psnr, ssim
from .fvd import FVD_CLIP_FRAMES, add_fvd, frechet_distance, fvd, fvd_per_chunk, fvd_report, i3d_features

__all__ = ["chunk_slices", "finite", "fidelity", "per_chunk", "psnr", "ssim", "FVD_CLIP_FRAMES", "add_fvd",
           "frechet_distance", "fvd", "fvd_per_chunk", "fvd_report", "i3d_features"]
