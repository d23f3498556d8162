"""Tiny configurations shared by the tests (hidden <= 64, depth <= 2, 16 tokens per frame)."""

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test`: two worker processes share the two cores, so
    torch.set_num_threads(1)               # each computes with one thread (oversubscribed, the suite took
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # longer), and so do the commands its tests start

from ca2vdm import CausalVideoDiT, ModelConfig, Text
from ca2vdm.causal_wan import CausalWan, CausalWanConfig
from ca2vdm.wan import WanConfig

WAN_TEXT_DIM = 8


def tiny_config(**overrides) -> ModelConfig:
    base = dict(in_channels=3, frame_size=8, patch=2, hidden=32, depth=2, heads=2, mlp_ratio=2.0,
                chunk_frames=2, prefix_frames=1, max_context_frames=5)
    base.update(overrides)
    return ModelConfig(**base)


def tiny_wan(seed=0, window=6, chunk=2, causal: dict | None = None, **wan) -> CausalWan:
    """2 blocks, 2 heads of 16, 4 latent channels, 4x4 latent frames (4 tokens), 16 text positions of
    width 8; chunks of ``chunk`` in a window of ``window`` (the chunk included). Every parameter
    perturbed, float64. ``wan``: other ``WanConfig`` fields; ``causal``: ``CausalWanConfig`` ones."""
    cfg = WanConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                    text_dim=WAN_TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=2, text_len=16, chunk_frames=chunk,
                    max_context_frames=window, **wan)
    torch.manual_seed(seed)
    model = CausalWan(CausalWanConfig(cfg, **{"frame_size": (4, 4), **(causal or {})}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.double().eval()


def tiny_model(dtype=torch.float64, seed=0, **overrides) -> CausalVideoDiT:
    """A tiny model whose zero-initialised (adaLN-Zero) weights are perturbed, so every branch matters."""
    torch.manual_seed(seed)
    model = CausalVideoDiT(tiny_config(**overrides)).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def random_text(batch, tokens, dim, dtype=torch.float64, seed=0, ragged=True) -> Text:
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, tokens, dim, generator=g).to(dtype)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    if ragged and batch > 1:
        mask[0, tokens // 2:] = False  # prompts of different lengths
    return Text(states, mask)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (and thrash when the CPU is busy)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
