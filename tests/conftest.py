"""Tiny configurations shared by the tests (hidden <= 64, depth <= 2, 16 tokens per frame)."""

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test`: two worker processes share the two cores, so
    torch.set_num_threads(1)               # each computes with one thread (oversubscribed, the suite took
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # longer), and so do the commands its tests start

from ca2vdm import CausalVideoDiT, ModelConfig, Text


def tiny_config(**overrides) -> ModelConfig:
    base = dict(in_channels=3, frame_size=8, patch=2, hidden=32, depth=2, heads=2, mlp_ratio=2.0,
                chunk_frames=2, prefix_frames=1, max_context_frames=5)
    base.update(overrides)
    return ModelConfig(**base)


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
