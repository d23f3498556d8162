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


@pytest.mark.parametrize("sigma_min", [0.05, 0.3])
def test_sample_prediction_is_the_native_head_turned_into_a_velocity(sigma_min):
    """prediction='sample': the same weights' raw output is read as x0 and returned as the
    velocity (x_sigma - x0_hat) / max(sigma, sigma_min), per frame; float64, exact."""
    from conftest import tiny_model

    native = tiny_model(conditioning="none", num_classes=0)
    sample = tiny_model(conditioning="none", num_classes=0, prediction="sample", sample_sigma_min=sigma_min)
    sample.load_state_dict(native.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, 8, generator=g, dtype=torch.float64)
    sigma = torch.tensor([[1.0, 0.5, 0.2, 0.01, 0.0], [0.9, 0.05, 0.3, 0.7, 0.001]], dtype=torch.float64)
    t = sigma * native.config.num_train_timesteps
    with torch.no_grad():
        x0_hat = native(x, t)
        v = sample(x, t)
    expect = (x - x0_hat) / sigma.clamp_min(sigma_min)[:, None, :, None, None]
    assert torch.equal(v, expect)
    # Where sigma >= sigma_min, an Euler step from sigma to 0 lands on the predicted x0.
    x_end = FlowMatching.update(x, v, sigma[:, None, :, None, None], 0.0)
    ok = sigma >= sigma_min  # (B, F)
    assert ok.sum() >= 5 and (~ok).sum() >= 2
    err = (x_end - x0_hat).abs().amax(dim=(1, 3, 4))  # (B, F)
    assert err[ok].max() < 1e-12 and err[~ok].min() > 1e-3


def test_sample_prediction_target_is_reached_by_the_true_x0():
    """With prediction='sample' the training target is what the model returns for x0_hat = x0,
    at every noise level, below sigma_min included; with 'native' it is the plain velocity."""
    from conftest import tiny_model

    model = tiny_model(conditioning="none", num_classes=0, prediction="sample")
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 3, 4, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    level = torch.tensor([[1.0, 0.3, 0.05, 0.01], [0.001, 0.5, 0.04, 0.9]], dtype=torch.float64)
    xt = model.diffusion.add_noise(x0, noise, level)
    t = model.diffusion.model_time(level)
    assert torch.allclose(model.target(x0, noise, level), model.velocity_from_sample(xt, x0, t), atol=1e-12)
    plain = model.diffusion.target(x0, noise, level)
    high = level >= model.config.sample_sigma_min
    assert torch.equal(model.target(x0, noise, level)[:, :, high[0]][0], plain[:, :, high[0]][0])
    native = tiny_model(conditioning="none", num_classes=0)
    assert torch.equal(native.target(x0, noise, level), plain)
