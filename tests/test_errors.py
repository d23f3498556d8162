"""A config that cannot work, or input of the wrong shape, fails early with a message naming it."""

import pytest
import torch

from ca2vdm import ModelConfig, Text
from ca2vdm.generate import generate_video

from conftest import tiny_config, tiny_model


@pytest.mark.parametrize("overrides,field", [
    (dict(positions="cyclic", cyclic_length=6, max_context_frames=5, chunk_frames=2), "cyclic_length"),
    (dict(prefix_frames=3, max_context_frames=2), "max_context_frames"),
    (dict(hidden=32, heads=3), "heads"),
    (dict(frame_size=9, patch=2), "frame_size"),
    (dict(frame_size=(8, 10), patch=4), "frame_size"),
    (dict(positions="alibi"), "positions"),
    (dict(conditioning="audio"), "conditioning"),
    (dict(conditioning="class", num_classes=0), "num_classes"),
    (dict(objective="x0"), "objective"),
    (dict(chunk_frames=0), "chunk_frames"),
    (dict(depth=0), "depth"),
    (dict(prefix_frames=-1), "prefix_frames"),
    (dict(prefix_enhance=True, prefix_enhance_frames=0), "prefix_enhance_frames"),
    (dict(positions="rope", hidden=36, heads=4), "heads"),  # head dim 9 is odd
    (dict(mlp_ratio=0), "mlp_ratio"),
    (dict(prediction="x0"), "prediction"),
    (dict(objective="eps", prediction="sample"), "prediction"),  # x0 prediction is a flow option
    (dict(prediction="sample", sample_sigma_min=0), "sample_sigma_min"),
])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}="):
        tiny_config(**overrides)


def test_config_round_trip_and_unknown_field():
    cfg = tiny_config(conditioning="text", text_dim=16, positions="rope")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig fields: colour"):
        ModelConfig.from_dict({**cfg.to_dict(), "colour": 1})


def test_wrong_input_shapes():
    model = tiny_model(conditioning="text", text_dim=16)
    x, t = torch.zeros(2, 3, 5, 8, 8, dtype=torch.float64), torch.zeros(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="channels"):
        model(torch.zeros(2, 4, 5, 8, 8, dtype=torch.float64), t)
    with pytest.raises(ValueError, match="8x8"):
        model(torch.zeros(2, 3, 5, 8, 6, dtype=torch.float64), t)
    with pytest.raises(ValueError, match=r"\(batch, channels, frames, height, width\)"):
        model(torch.zeros(3, 5, 8, 8), t)
    with pytest.raises(ValueError, match="per frame"):
        model(x, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"text states must be \(2, tokens, 16\)"):
        model.condition(2, Text(torch.zeros(2, 4, 7)))
    with pytest.raises(ValueError, match="at least one unmasked"):
        model.condition(1, Text(torch.zeros(1, 4, 16), torch.zeros(1, 4, dtype=torch.bool)))
    with pytest.raises(ValueError, match="takes no class labels"):
        model.condition(2, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="conditioning is for batch 1"):
        model(x, t, model.condition(1))
    cache = model.new_cache(2)
    with pytest.raises(ValueError, match="chunk 0 has 1 frames, got 2"):
        model.forward_cached(x[:, :, :2], t[:, :2], cache)
    with pytest.raises(ValueError, match="cache is for batch 2"):
        model.forward_cached(x[:1, :, :1], t[:1, :1], cache)


def test_generate_rejects_bad_requests():
    model = tiny_model()
    first = torch.zeros(1, 3, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="mode must be one of shared, recompute-full, recompute-window"):
        generate_video(model, 5, first_frames=first, mode="fast")
    with pytest.raises(ValueError, match=r"first_frames must be \(1, 3, 1, 8, 8\)"):
        generate_video(model, 5, first_frames=torch.zeros(1, 3, 2, 8, 8))
    with pytest.raises(ValueError, match="first_frames must be"):
        generate_video(model, 5)
    with pytest.raises(ValueError, match="must exceed the 1 given"):
        generate_video(model, 1, first_frames=first)
    with pytest.raises(ValueError, match="guidance needs a conditioned model"):
        generate_video(model, 5, first_frames=first, guidance=3.0)
    with pytest.raises(ValueError, match="batch sizes disagree: first_frames=1, seed=2"):
        generate_video(model, 5, first_frames=first, seed=[1, 2])
    with pytest.raises(ValueError, match="takes no text prompt"):
        generate_video(model, 5, first_frames=first, prompt=Text(torch.zeros(1, 2, 16)))
    starter = tiny_model(prefix_frames=0)
    with pytest.raises(ValueError, match="prefix_frames=0"):
        generate_video(starter, 4, first_frames=first)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        generate_video(starter, 4, steps=0)


def test_prompt_alone_starts_a_video():
    model = tiny_model(prefix_frames=0, conditioning="class", num_classes=3)
    video = generate_video(model, 7, labels=torch.tensor([2]), guidance=2.0, steps=2)
    assert video.shape == (1, 3, 7, 8, 8) and torch.isfinite(video).all()
