"""CUDA paths (fused SDPA with a bottom-right causal bias, bf16): run where a GPU exists."""

import pytest
import torch

from ca2vdm.generate import generate_video

from conftest import random_text, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _kw(model, dtype):
    return dict(first_frames=torch.randn(2, 3, 1, 8, 8).to("cuda", dtype), steps=2, guidance=3.0, seed=[1, 2],
                prompt=random_text(2, 5, 16, dtype), negative_prompt=random_text(2, 3, 16, dtype, seed=4))


def test_cuda_float64_shared_equals_oracle():
    model = tiny_model(conditioning="text", text_dim=16, prefix_enhance=True).cuda()
    kw = _kw(model, torch.float64)
    a = generate_video(model, 15, mode="shared", **kw)
    b = generate_video(model, 15, mode="recompute-full", **kw)
    assert (a - b).abs().max().item() <= 1e-9 * max(1.0, b.abs().max().item())


def test_cuda_bf16_autocast_and_bf16_cache_close_to_fp32():
    model = tiny_model(dtype=torch.float32, conditioning="text", text_dim=16, positions="rope").cuda()
    kw = _kw(model, torch.float32)
    ref = generate_video(model, 15, **kw)
    amp = generate_video(model, 15, autocast=torch.bfloat16, cache_dtype=torch.bfloat16, **kw)
    assert torch.isfinite(amp).all()
    assert (amp - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_cuda_matches_cpu_float64():
    cpu = tiny_model(conditioning="class", num_classes=3)
    kw = dict(first_frames=torch.randn(1, 3, 1, 8, 8, dtype=torch.float64), steps=2, labels=torch.tensor([1]),
              guidance=2.0, seed=0)
    a = generate_video(cpu, 11, **kw)
    gpu = tiny_model(conditioning="class", num_classes=3).cuda()
    b = generate_video(gpu, 11, **{**kw, "first_frames": kw["first_frames"].cuda()}).cpu()
    assert (a - b).abs().max().item() <= 1e-9 * max(1.0, a.abs().max().item())


def test_cuda_resume_keeps_adamw_steps_on_the_cpu(tmp_path):
    """Resuming on CUDA: moments beside their parameters on the GPU, step counters on the CPU
    (the optimizer's own load_state_dict decides; writing state by hand had put them on the GPU)."""
    from test_train import make_trainer, model_config, train_config

    first = make_trainer(model_config(), train_config(steps=4, autocast="off"), device="cuda")
    first.train_step()
    first.save(tmp_path / "ckpt")
    resumed = make_trainer(model_config(), train_config(steps=4, autocast="off"), device="cuda")
    resumed.resume(tmp_path / "ckpt")
    for st in resumed.opt.state.values():
        assert st["exp_avg"].is_cuda and st["step"].device.type == "cpu"
    resumed.train_step()


@pytest.mark.parametrize("positions", ["cyclic", "rope"])
def test_cuda_cached_step_and_write_never_sync(positions):
    """A cached denoising step and a write pass under sync-debug mode "error": any host sync raises."""
    model = tiny_model(positions=positions, conditioning="text", text_dim=16, prefix_enhance=True).cuda()
    text = random_text(2, 5, 16)
    cond = model.condition(2, type(text)(text.states.cuda(), text.mask.cuda()))
    cache = model.new_cache(2)
    x1, x = torch.randn(2, 3, 1, 8, 8, device="cuda", dtype=torch.float64), torch.randn(2, 3, 2, 8, 8, device="cuda",
                                                                                        dtype=torch.float64)
    zeros1, zeros, t = (torch.zeros(2, 1, device="cuda", dtype=torch.float64),
                        torch.zeros(2, 2, device="cuda", dtype=torch.float64),
                        torch.full((2, 2), 500.0, device="cuda", dtype=torch.float64))
    with torch.no_grad():
        model.forward_cached(x1, zeros1, cache, cond, write=True)
        model.forward_cached(x, t, cache, cond)  # warm-up: lazy per-device state is made once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(4):
                model.forward_cached(x, t, cache, cond)
                model.forward_cached(x, zeros, cache, cond, write=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert cache.frames_written == 9
