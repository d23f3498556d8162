"""Latent space: a local diffusers AutoencoderKL, pre-encoded latents, training and generation on them."""

import json
import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ca2vdm.autoencoder import KLAutoencoder, LatentDataset, PixelSpace, load_autoencoder  # noqa: E402


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny random AutoencoderKL (downsampling 2, 4 latent channels) saved like a real one."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4,
                                  sample_size=16, scaling_factor=0.5, shift_factor=0.1)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(str(path))
    return path


def ca2vdm(*args):
    return subprocess.run([sys.executable, "-m", "ca2vdm.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_kl_autoencoder_framewise_scaled(vae_dir):
    ae = load_autoencoder(str(vae_dir))
    assert isinstance(ae, KLAutoencoder) and (ae.channels, ae.downsample) == (4, 2)
    video = torch.rand(2, 3, 3, 16, 16) * 2 - 1
    z = ae.encode(video)
    assert z.shape == (2, 4, 3, 8, 8)
    with torch.no_grad():  # frame (b=1, f=2) by hand
        ref = ae.vae.encode(video[1:2, :, 2]).latent_dist.mode()
    assert torch.allclose(z[1, :, 2], ((ref - 0.1) * 0.5)[0], atol=1e-4)  # batched vs one-frame convolutions: float32 rounding
    x = ae.decode(z)
    with torch.no_grad():
        ref = ae.vae.decode(z[0:1, :, 1] / 0.5 + 0.1).sample
    assert x.shape == (2, 3, 3, 16, 16) and torch.allclose(x[0, :, 1], ref[0], atol=1e-4)
    assert isinstance(load_autoencoder("pixel"), PixelSpace)
    with pytest.raises(FileNotFoundError, match="no AutoencoderKL"):
        load_autoencoder(str(vae_dir.parent / "missing"))
    with pytest.raises(ValueError, match="latents must be"):
        ae.decode(torch.zeros(1, 3, 1, 8, 8))


def test_encode_train_generate_in_latent_space(vae_dir, tmp_path):
    cfg = tmp_path / "latent.yaml"
    cfg.write_text(f"""
out_dir: {tmp_path / 'run'}
model: {{in_channels: 4, frame_size: 8, patch: 2, hidden: 32, depth: 1, heads: 2, chunk_frames: 2,
         prefix_frames: 1, max_context_frames: 3, conditioning: class, num_classes: 10}}
data: {{dataset: moving-digits, num_clips: 6, size: 16, digit_size: 8, val_clips: 2}}
train: {{steps: 2, batch_size: 2, eval_every: 0, save_every: 1, log_every: 1, sample_videos: 0}}
""")
    latents = tmp_path / "latents"
    r = ca2vdm("encode", cfg, "--autoencoder", vae_dir, "--out", latents)
    assert r.returncode == 0, r.stderr
    ds = LatentDataset(latents)
    assert len(ds) == 6 and ds[0]["video"].shape == (4, 5, 8, 8) and ds.autoencoder == str(vae_dir)
    r = ca2vdm("encode", cfg, "--autoencoder", vae_dir, "--out", latents)
    assert r.returncode == 1 and "exists" in r.stderr  # never overwritten
    r = ca2vdm("train", cfg, "--set", f"data={{dataset: latents, path: {latents}}}")
    assert r.returncode == 0, r.stderr
    ckpt = tmp_path / "run" / "checkpoint"
    assert json.loads((ckpt / "config.json").read_text())["autoencoder"] == str(vae_dir)
    out, lat = tmp_path / "v.mp4", tmp_path / "z.safetensors"
    first = tmp_path / "first.png"
    from PIL import Image
    Image.new("RGB", (40, 40), (200, 30, 30)).save(first)
    r = ca2vdm("generate", "--checkpoint", ckpt, "--frames", 5, "--label", 3, "--steps", 2, "--scale", 1,
               "--first-frame", first, "--out", out, "--save-latents", lat)
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    from ca2vdm.video import read_video
    assert load_file(str(lat))["latents"].shape == (1, 4, 5, 8, 8)  # the model's latents ...
    assert read_video(out).shape == (3, 5, 16, 16)                    # ... decoded to pixels
