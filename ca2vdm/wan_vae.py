"""Wan's causal video VAE, streamed: decode each generated chunk as soon as it exists.

diffusers' ``AutoencoderKLWan`` already decodes a video one latent frame at a time, carrying the
last frames of every causal convolution in a list (``_feat_map``) and walking it with an index
(``_conv_idx``). But that list lives on the VAE module and ``decode`` clears it at both ends, so it
can only decode a whole latent video at once. Here each stream owns its own list and index and
calls the same ``vae.decoder`` with them, one latent frame per call, exactly as ``_decode`` does:

    vae = load_wan_vae("Wan2.1-T2V-1.3B-Diffusers/vae")
    stream = StreamingWanDecoder(vae)            # one per video; any number share one VAE
    for chunk in chunks:                         # (B, z, f, h, w) latents, as the transformer made them
        frames = stream.decode(chunk)            # (B, 3, F, H, W) in [-1, 1]; F = 1 + 4 (f - 1) first, 4 f later

The concatenated frames equal ``vae.decode`` of the whole latent video bitwise (``tests/
test_wan_vae.py``; one latent frame per decoder call matters: several per call drift by ~1e-6).
Memory is flat over any length: every cache entry holds at most the last two frames of one
convolution's input. ``StreamingWanEncoder`` is the other direction (pixel frames in groups of
1, 4, 4, ... as ``_encode`` takes them -> the posterior's mean), for video-to-video and ``--continue``.

Latent scale: the transformer works on latents normalized by the VAE's ``latents_mean`` /
``latents_std`` (the pipeline applies them, not the VAE). With ``normalized=True`` (the default)
the decoder takes those and un-normalizes as ``WanPipeline`` does (``z / (1 / std) + mean``), and
the encoder returns them as ``WanVideoToVideoPipeline`` does (``(z - mean) * (1 / std)``);
``normalized=False`` speaks the VAE's own latents.

Not supported, refused with an error: spatial tiling (``vae.enable_tiling()``: tiles are decoded
as separate videos, so it is not the same computation), any autoencoder class other than
``AutoencoderKLWan``. Wan 2.2's patched VAE (``patch_size``) is patchified / unpatchified here as
diffusers does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

WAN_VAE_CLASS = "AutoencoderKLWan"


def _is_wan_vae(vae) -> bool:
    try:
        from diffusers import AutoencoderKLWan
    except ImportError:
        raise ImportError("the Wan VAE needs diffusers: pip install diffusers") from None
    return isinstance(vae, AutoencoderKLWan)


def check_wan_vae(vae) -> None:
    """Raise unless ``vae`` is an ``AutoencoderKLWan`` that a stream can drive (tiling off)."""
    if not _is_wan_vae(vae):
        raise TypeError(f"a streaming Wan VAE needs diffusers' {WAN_VAE_CLASS}, got {type(vae).__name__} "
                        f"(other autoencoders have no causal feature cache to stream)")
    if getattr(vae, "use_tiling", False):
        raise ValueError("the Wan VAE has tiling enabled (vae.enable_tiling()); streaming decodes the whole "
                         "frame and cannot match a tiled decode: call vae.disable_tiling()")


def load_wan_vae(folder, device="cpu", dtype=torch.float32):
    """diffusers' ``AutoencoderKLWan`` from a local folder (``save_pretrained`` layout, a pipeline's ``vae/``).

    The folder's config.json must name ``AutoencoderKLWan``; nothing is downloaded.
    """
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no Wan VAE at {folder} (expected a diffusers folder with config.json)")
    name = json.loads(config.read_text()).get("_class_name")
    if name != WAN_VAE_CLASS:
        raise TypeError(f"{folder} holds a {name!r}, not diffusers' {WAN_VAE_CLASS}: the streaming Wan "
                        f"decoder needs Wan's causal VAE (Wan 2.1's or Wan 2.2's)")
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(str(folder), local_files_only=True)
    vae = vae.to(device, dtype).eval().requires_grad_(False)
    check_wan_vae(vae)
    return vae


def _latent_stats(vae, like: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, 1 / std), each (1, z, 1, 1, 1), built exactly as WanPipeline builds them."""
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(like.device, like.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(like.device, like.dtype)
    return mean, inv_std


class _Stream:
    """What one stream owns: the VAE (shared, read only) and its own causal-convolution caches."""

    part = ""  # "decoder" or "encoder"

    def __init__(self, vae, normalized: bool = True):
        check_wan_vae(vae)
        self.vae = vae
        self.normalized = normalized
        # a slot per causal conv of that half (diffusers' count; 1x1 shortcuts leave theirs empty); holds <= 2 frames of that conv's input
        self.cache: list = [None] * vae._cached_conv_counts[self.part]
        self.calls = 0  # latent frames decoded / pixel groups encoded so far

    def nbytes(self) -> int:
        """Bytes held in the feature cache (fixed once the stream has started: memory is flat)."""
        return sum(c.numel() * c.element_size() for c in self.cache if isinstance(c, Tensor))

    def _run(self, half, x: Tensor, **kw) -> Tensor:
        idx = [0]  # the running index the convs advance; restarts at 0 every call, as in diffusers
        out = half(x, feat_cache=self.cache, feat_idx=idx, **kw)
        self.calls += 1
        return out


class StreamingWanDecoder(_Stream):
    """Latent chunks (B, z, f, h, w) -> pixel frames (B, 3, F, H, W) in [-1, 1] in the VAE's dtype.

    Every latent frame is its own decoder call (first_chunk on the stream's very first), as
    diffusers' ``_decode`` runs them; chunks may have any number of frames."""

    part = "decoder"

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        check_wan_vae(self.vae)  # tiling may have been switched on since
        vae = self.vae
        if latents.ndim != 5 or latents.shape[1] != vae.config.z_dim:
            raise ValueError(f"latents must be (B, {vae.config.z_dim}, f, h, w), got {tuple(latents.shape)}")
        param = next(vae.parameters())
        latents = latents.to(param.device, param.dtype)  # as WanPipeline: into the VAE's dtype first
        if self.normalized:
            mean, inv_std = _latent_stats(vae, latents)
            latents = latents / inv_std + mean  # WanPipeline's un-normalization, same ops, same order
        x = vae.post_quant_conv(latents)  # a 1x1x1 conv: frame by frame already
        frames = []
        for i in range(x.shape[2]):
            frames.append(self._run(vae.decoder, x[:, :, i:i + 1], first_chunk=self.calls == 0))
        out = torch.cat(frames, 2)
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=vae.config.patch_size)
        return torch.clamp(out, min=-1.0, max=1.0)

    __call__ = decode


class StreamingWanEncoder(_Stream):
    """Pixel frames (B, 3, F, H, W) in [-1, 1] -> float32 latents (B, z, f, h, w): the posterior's mean.

    Frames go through the encoder in groups of 1 (the first frame), then 4, 4, ... as diffusers'
    ``_encode`` takes them. A call may bring any number of frames: the groups completed so far are
    encoded and returned (f may be 0), the rest wait in ``pending`` (< 4 frames) for the next call.
    """

    part = "encoder"

    def __init__(self, vae, normalized: bool = True):
        super().__init__(vae, normalized)
        self.pending: Tensor | None = None  # (B, C, < 4, H, W) frames waiting for their group

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        check_wan_vae(self.vae)
        vae = self.vae
        if video.ndim != 5:
            raise ValueError(f"video must be (B, C, F, H, W), got {tuple(video.shape)}")
        param = next(vae.parameters())
        video = video.to(param.device, param.dtype)  # as WanVideoToVideoPipeline: into the VAE's dtype
        if self.pending is not None:
            video = torch.cat([self.pending, video], 2)
        p = vae.config.patch_size
        outs, start = [], 0
        while video.shape[2] - start >= (size := 1 if self.calls == 0 else 4):
            group = video[:, :, start:start + size]  # (B, C, 1 or 4, H, W)
            if p is not None:
                from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

                group = patchify(group, patch_size=p)  # Wan 2.2: (B, C p p, ., H / p, W / p)
            h = vae.quant_conv(self._run(vae.encoder, group))  # (B, 2 z, 1, h, w)
            outs.append(h[:, :vae.config.z_dim])  # the mean: DiagonalGaussianDistribution's first half
            start += size
        self.pending = video[:, :, start:] if start < video.shape[2] else None
        if not outs:
            B, _, _, H, W = video.shape
            s = vae.spatial_compression_ratio
            return video.new_zeros(B, vae.config.z_dim, 0, H // s, W // s)
        z = torch.cat(outs, 2).float()  # WanVideoToVideoPipeline's latents are float32
        if self.normalized:
            mean, inv_std = _latent_stats(vae, z)
            z = (z - mean) * inv_std  # WanVideoToVideoPipeline's normalization
        return z

    __call__ = encode

