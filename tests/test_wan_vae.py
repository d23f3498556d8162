"""The streaming Wan VAE (ca2vdm/wan_vae.py) against diffusers' AutoencoderKLWan, bitwise.

Tiny random VAEs: Wan 2.1's layout and Wan 2.2's (residual blocks, patch size 2), both with two
temporal downsamplings, so the first latent frame decodes to 1 frame and each later one to 4 as
in the real models. Each test names the break it was checked to fail on.
"""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, AutoencoderKLWan  # noqa: E402

from ca2vdm.wan_vae import StreamingWanDecoder, StreamingWanEncoder, load_wan_vae  # noqa: E402

MEAN, STD = [0.1, -0.2, 0.3, 0.0], [1.5, 0.7, 2.0, 1.1]


def tiny_vae(version: str) -> AutoencoderKLWan:
    torch.manual_seed(0)
    common = dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[True, True],
                  latents_mean=MEAN, latents_std=STD)
    if version == "2.1":
        return AutoencoderKLWan(**common, scale_factor_spatial=4).eval()
    # Wan 2.2's VAE: residual down/up blocks, a wider decoder, 12 = 3 x 2 x 2 patched channels
    return AutoencoderKLWan(**common, decoder_base_dim=12, is_residual=True, in_channels=12, out_channels=12,
                            patch_size=2, scale_factor_spatial=8).eval()


def latent_video(vae, frames: int, seed: int, batch: int = 2) -> torch.Tensor:
    s = 16 // vae.config.scale_factor_spatial
    return torch.randn(batch, 4, frames, s, s, generator=torch.Generator().manual_seed(seed))


def pipeline_decode(vae, z):
    """WanPipeline's last step: un-normalize the transformer's latents, then decode the whole video."""
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1).to(z.device, z.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1).to(z.device, z.dtype)
    with torch.no_grad():
        return vae.decode(z / inv_std + mean, return_dict=False)[0]


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_five_streamed_chunks_equal_the_whole_decode(version):
    """5 chunks of 3 latent frames, decoded as they come, concatenate to WanPipeline's decode of the
    15-frame latent video bitwise (1 + 4 x 14 = 57 frames; 1 then 4 per latent frame); the cache's
    size is the same after chunk 2 as after chunk 5 (memory flat). Breaks tried: the whole chunk
    in one decoder call (close, not equal); first_chunk on every call instead of the first (2.2
    fails; 2.1's decoder ignores first_chunk); normalized latents passed to the VAE without
    un-normalizing; no unpatchify (2.2)."""
    vae = tiny_vae(version)
    z = latent_video(vae, 15, seed=1)
    stream = StreamingWanDecoder(vae)
    chunks, sizes = [], []
    for k in range(5):
        chunks.append(stream.decode(z[:, :, 3 * k:3 * k + 3]))
        sizes.append(stream.nbytes())
    assert [c.shape[2] for c in chunks] == [9, 12, 12, 12, 12]
    out = torch.cat(chunks, 2)
    ref = pipeline_decode(vae, z)
    assert out.shape == ref.shape == (2, 3, 57, 16, 16)
    assert torch.equal(out, ref), (out - ref).abs().max()
    assert sizes[1] == sizes[4] > 0


def test_two_streams_interleaved_over_one_vae():
    """Two videos streamed chunk by chunk in turn over one VAE each equal their own whole decode, and
    the VAE's own cache is left alone. Break tried: the streams sharing one cache list (as they
    would through the VAE's ``_feat_map``)."""
    vae = tiny_vae("2.1")
    vae.clear_cache()
    za, zb = latent_video(vae, 15, seed=2, batch=1), latent_video(vae, 15, seed=3, batch=1)
    a, b = StreamingWanDecoder(vae), StreamingWanDecoder(vae)
    outa, outb = [], []
    for k in range(5):
        outa.append(a.decode(za[:, :, 3 * k:3 * k + 3]))
        outb.append(b.decode(zb[:, :, 3 * k:3 * k + 3]))
    assert all(c is None for c in vae._feat_map)
    assert torch.equal(torch.cat(outa, 2), pipeline_decode(vae, za))
    assert torch.equal(torch.cat(outb, 2), pipeline_decode(vae, zb))


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_streamed_encoder_equals_encode(version):
    """25 pixel frames fed 7 at a time (groups of 1, 4, 4, ... straddle the calls) encode to the
    posterior's mode of diffusers' whole-video encode, normalized as WanVideoToVideoPipeline does,
    bitwise for Wan 2.1. For Wan 2.2's VAE, computed with one thread, the whole-video encode and the
    stream round differently in the last bit (8.2e-8 of 0.64 measured; bitwise with two threads):
    held to 1e-6 relative there. Breaks tried: groups of 4 from the first frame; the leftover
    frames of a call dropped; the logvar half returned instead of the mean."""
    vae = tiny_vae(version)
    x = torch.rand(2, 3, 25, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    stream = StreamingWanEncoder(vae)
    z = torch.cat([stream.encode(x[:, :, i:i + 7]) for i in range(0, 25, 7)], 2)
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.mode()
    mean = torch.tensor(MEAN).view(1, 4, 1, 1, 1)
    ref = (ref - mean) * (1.0 / torch.tensor(STD).view(1, 4, 1, 1, 1))
    assert z.shape == ref.shape == (2, 4, 7) + ref.shape[3:]
    if version == "2.1":
        assert torch.equal(z, ref), (z - ref).abs().max()
    else:
        assert (z - ref).abs().max() <= 1e-6 * ref.abs().max(), (z - ref).abs().max()
    assert stream.pending is None


def test_only_the_wan_vae_untiled(tmp_path):
    """Any other autoencoder class is a clear error (in memory and from a folder), and tiling is
    refused at construction and when switched on later. Break tried: each check removed."""
    torch.manual_seed(0)
    kl = AutoencoderKL(block_out_channels=[8], norm_num_groups=4, latent_channels=4)
    with pytest.raises(TypeError, match="AutoencoderKLWan"):
        StreamingWanDecoder(kl)
    kl.save_pretrained(tmp_path / "kl")
    with pytest.raises(TypeError, match="AutoencoderKLWan"):
        load_wan_vae(tmp_path / "kl")

    vae = tiny_vae("2.1")
    vae.save_pretrained(tmp_path / "wan")
    loaded = load_wan_vae(tmp_path / "wan")
    z = latent_video(vae, 2, seed=5)
    assert torch.equal(StreamingWanDecoder(loaded).decode(z), pipeline_decode(vae, z))

    stream = StreamingWanDecoder(vae)
    vae.enable_tiling()
    with pytest.raises(ValueError, match="tiling"):
        stream.decode(z)
    with pytest.raises(ValueError, match="tiling"):
        StreamingWanEncoder(vae)


def test_bfloat16_vae_casts_as_the_pipelines_do():
    """A bfloat16 VAE: float32 latents from the transformer are cast to bfloat16 before the
    un-normalization (WanPipeline), and encoded latents come back float32, normalized in float32
    (WanVideoToVideoPipeline); both bitwise. Breaks tried: un-normalizing in float32 before the
    cast; normalizing the encoder's latents in bfloat16."""
    vae = tiny_vae("2.1").to(torch.bfloat16)
    z = latent_video(vae, 4, seed=6)  # float32
    stream = StreamingWanDecoder(vae)
    out = torch.cat([stream.decode(z[:, :, :2]), stream.decode(z[:, :, 2:])], 2)
    ref = pipeline_decode(vae, z.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)

    x = torch.rand(1, 3, 9, 16, 16, generator=torch.Generator().manual_seed(7)) * 2 - 1
    got = StreamingWanEncoder(vae).encode(x)
    with torch.no_grad():
        ref = vae.encode(x.to(torch.bfloat16)).latent_dist.mode().to(torch.float32)
    ref = (ref - torch.tensor(MEAN).view(1, 4, 1, 1, 1)) * (1.0 / torch.tensor(STD).view(1, 4, 1, 1, 1))
    assert got.dtype == torch.float32 and torch.equal(got, ref)
