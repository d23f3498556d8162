"""Autoencoders: the space the diffusion model works in.

* ``PixelSpace`` — the default: the model sees RGB frames in [-1, 1] directly.
* ``KLAutoencoder`` — a diffusers ``AutoencoderKL`` loaded from a local directory (never from a
  hub): frames are encoded one by one (in batches) to the latent distribution's mean, shifted
  and multiplied by the VAE's scaling factor; decoding inverts that.

Both map videos (B, 3, F, H, W) in [-1, 1] <-> latents (B, c, F, H / s, W / s). Latents can be
computed on the fly (``EncodedDataset``) or once, to disk (``encode_dataset`` then
``LatentDataset``), so training never runs the encoder again.
"""

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class PixelSpace:
    """Identity autoencoder: latents are the RGB frames."""

    channels, downsample = 3, 1
    spec = "pixel"

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return video

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


class KLAutoencoder:
    """A diffusers ``AutoencoderKL`` from a local directory (``save_pretrained`` layout), frame-wise."""

    def __init__(self, path, device="cpu", dtype=torch.float32, batch: int = 16):
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no AutoencoderKL at {path} (expected a diffusers directory with config.json)")
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise ImportError("an AutoencoderKL needs diffusers: pip install diffusers") from None
        self.vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True).to(device, dtype).eval()
        cfg = self.vae.config
        self.spec = str(path)
        self.scale = float(cfg.scaling_factor)
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.batch = batch

    def _framewise(self, x: torch.Tensor, fn) -> torch.Tensor:
        B, C, Fr, H, W = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(B * Fr, C, H, W)
        p = next(self.vae.parameters())
        out = torch.cat([fn(frames[i:i + self.batch].to(p.device, p.dtype)).float()
                         for i in range(0, B * Fr, self.batch)])
        return out.reshape(B, Fr, *out.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> (B, c, F, H / s, W / s): (mean - shift) * scale."""
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be (B, 3, F, H, W), got {tuple(video.shape)}")
        z = self._framewise(video, lambda f: self.vae.encode(f).latent_dist.mode())
        return (z - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, c, F, h, w) -> (B, 3, F, h * s, w * s), roughly in [-1, 1]."""
        if latents.dim() != 5 or latents.shape[1] != self.channels:
            raise ValueError(f"latents must be (B, {self.channels}, F, h, w), got {tuple(latents.shape)}")
        return self._framewise(latents / self.scale + self.shift, lambda z: self.vae.decode(z).sample)


def load_autoencoder(spec: str | None = "pixel", device="cpu", dtype=torch.float32):
    """``"pixel"`` (or None) -> ``PixelSpace``; a directory -> ``KLAutoencoder``."""
    if spec in (None, "", "pixel"):
        return PixelSpace()
    return KLAutoencoder(spec, device, dtype)


class EncodedDataset:
    """Items of ``dataset`` with their ``video`` replaced by its latents (encoded on every access)."""

    def __init__(self, dataset, autoencoder):
        self.dataset, self.autoencoder = dataset, autoencoder

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = dict(self.dataset[i])
        item["video"] = self.autoencoder.encode(item["video"][None])[0]
        return item


def encode_dataset(dataset, autoencoder, out_dir, batch: int = 8, log=print) -> Path:
    """Encode every item of ``dataset`` once and write ``latents.safetensors`` (key ``latents``,
    (N, c, F, h, w) float16; ``labels`` (N,)) and ``items.json`` (captions, the autoencoder) to
    ``out_dir``, atomically. Read back with ``LatentDataset``."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; remove it or choose another output directory")
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset to encode is empty")
    latents, captions, labels = [], [], []
    for start in range(0, n, batch):
        items = [dataset[i] for i in range(start, min(n, start + batch))]
        latents.append(autoencoder.encode(torch.stack([it["video"] for it in items])).half().cpu())
        captions += [it.get("caption", "") for it in items]
        labels += [int(it.get("label", 0)) for it in items]
        log(f"  encoded {min(n, start + batch)}/{n} clips")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    save_file({"latents": torch.cat(latents).contiguous(), "labels": torch.tensor(labels)}, str(tmp / "latents.safetensors"))
    (tmp / "items.json").write_text(json.dumps({"autoencoder": autoencoder.spec, "captions": captions}))
    os.chmod(tmp, 0o755)
    os.replace(tmp, out_dir)  # the directory appears complete or not at all
    return out_dir


class LatentDataset:
    """Pre-encoded clips written by ``encode_dataset``: items {"video": (c, F, h, w) float32, "caption", "label"}."""

    def __init__(self, path, frames: int | None = None):
        path = Path(path)
        if not (path / "latents.safetensors").is_file() or not (path / "items.json").is_file():
            raise FileNotFoundError(f"no pre-encoded latents at {path} (run `ca2vdm encode` first)")
        tensors = load_file(str(path / "latents.safetensors"))
        meta = json.loads((path / "items.json").read_text())
        self.latents, self.labels = tensors["latents"], tensors["labels"]
        self.captions, self.autoencoder = meta["captions"], meta.get("autoencoder", "pixel")
        if len(self.captions) != len(self.latents):
            raise ValueError(f"{path}: {len(self.latents)} latents but {len(self.captions)} captions")
        if frames is not None and self.latents.shape[2] < frames:
            raise ValueError(f"{path}: clips have {self.latents.shape[2]} frames, training needs {frames}")
        self.frames = frames or self.latents.shape[2]

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        return {"video": self.latents[i, :, :self.frames].float(), "caption": self.captions[i],
                "label": int(self.labels[i])}
