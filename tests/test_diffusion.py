"""Our schedules and update rules match diffusers' schedulers for the same settings."""

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402

from ca2vdm.diffusion import DDPM, FlowMatching, make_diffusion  # noqa: E402


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 2, 10, 50])
def test_flow_matching_matches_diffusers(shift, steps):
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(steps)
    ours = FlowMatching(1000, shift).sampler(steps)
    assert torch.allclose(torch.tensor(ours.timesteps, dtype=torch.float64), ref.timesteps.double(), rtol=0, atol=1e-3)
    sigmas = [c[0] for c in ours.coefs] + [ours.coefs[-1][1]]
    assert torch.allclose(torch.tensor(sigmas, dtype=torch.float64), ref.sigmas.double(), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, 4, generator=g)
    y = x.clone()
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(x.shape, generator=g)
        x = ref.step(v, t, x).prev_sample
        y = ours.step(y, v, i)
    assert torch.allclose(x, y, atol=1e-5)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 10, 50])
def test_ddim_matches_diffusers(spacing, steps):
    ref = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                        clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    ours = DDPM(1000, 1e-4, 0.02, spacing).sampler(steps)
    assert ours.timesteps == [float(t) for t in ref.timesteps.tolist()]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 4, 4, generator=g)
    y = x.clone()
    for i, t in enumerate(ref.timesteps):
        eps = torch.randn(x.shape, generator=g)
        x = ref.step(eps, t, x, eta=0.0).prev_sample
        y = ours.step(y, eps, i)
    assert torch.allclose(x, y, rtol=1e-4, atol=1e-4 * x.abs().max().item())


def test_add_noise_matches_diffusers_and_is_per_frame():
    ddpm = DDPM()
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    x0, noise = torch.randn(2, 3, 5, 4, 4), torch.randn(2, 3, 5, 4, 4)
    t = torch.tensor([[0, 10, 500, 999, 3], [999, 0, 1, 2, 700]])
    ours = ddpm.add_noise(x0, noise, t)
    for b in range(2):
        for f in range(5):
            expect = ref.add_noise(x0[b, :, f], noise[b, :, f], t[b, f:f + 1])
            assert torch.allclose(ours[b, :, f], expect, atol=1e-5)
    flow = FlowMatching()
    sigma = torch.tensor([[0.0, 0.5, 1.0, 0.25, 0.0]] * 2, dtype=torch.float64)
    xs = flow.add_noise(x0, noise, sigma)
    assert torch.equal(xs[:, :, 0], x0[:, :, 0]) and torch.allclose(xs[:, :, 2], noise[:, :, 2])
    assert torch.allclose(flow.target(x0, noise, sigma), noise - x0)


def test_make_diffusion_rejects_unknown_objective():
    with pytest.raises(ValueError, match="objective"):
        make_diffusion("v")
