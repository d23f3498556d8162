"""Unbounded length: 2,000 frames in shared mode with flat memory, and yielded chunks not retained."""

import gc
import weakref

import psutil
import torch

from ca2vdm.generate import GenerationStats, generate

from conftest import tiny_model


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def test_two_thousand_frames_flat_memory_and_no_retained_chunks():
    model = tiny_model(dtype=torch.float32, chunk_frames=4, max_context_frames=9, conditioning="class",
                       num_classes=3, prefix_enhance=True)
    assert model.config.tokens == 16 and model.config.hidden <= 64 and model.config.depth <= 2
    stats = GenerationStats()
    gen = generate(model, 2000, first_frames=torch.zeros(1, 3, 1, 8, 8), labels=torch.tensor([1]),
                   guidance=2.0, steps=2, stats=stats)
    frames, rss_200, refs = 0, None, []
    for chunk in gen:
        frames += chunk.shape[2]
        if len(refs) < 50:
            refs.append(weakref.ref(chunk))
        del chunk
        if rss_200 is None and frames >= 200:
            rss_200 = _rss()
    rss_2000 = _rss()
    assert frames == 2000 and stats.frames == 1999
    assert all(r() is None for r in refs), "the generator keeps yielded chunks alive"
    grown = (rss_2000 - rss_200) / 2**20
    assert grown < 4.0, f"process memory grew by {grown:.1f} MB between 200 and 2,000 frames"


def test_generator_holds_no_reference_while_suspended():
    model = tiny_model(dtype=torch.float32)
    gen = generate(model, 11, first_frames=torch.zeros(1, 3, 1, 8, 8), steps=1)
    first = next(gen)
    second = next(gen)
    r1, r2 = weakref.ref(first), weakref.ref(second)
    del first, second
    gc.collect()
    assert r1() is None and r2() is None  # the suspended generator does not hold them
    assert sum(c.shape[2] for c in gen) == 11 - 3
