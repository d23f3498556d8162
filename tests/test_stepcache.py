"""Step caching (AdaCache and friends) inside the cached autoregressive loop."""

import math

import pytest
import torch

from ca2vdm import stepcache
from ca2vdm.generate import GenerationStats, generate_video
from ca2vdm.layers import modulate
from ca2vdm.stepcache import (CODEBOOK_LONG, CODEBOOK_SHORT, StepCache, StepCacheConfig, motion_score,
                              relative_l1, stride_from_codebook)

from conftest import random_text, tiny_model


def _text_model(**kw):
    return tiny_model(conditioning="text", text_dim=16, **kw)


def _kw(model, batch=2, steps=6, guidance=3.0, seeds=(3, 11)):
    cfg = model.config
    g = torch.Generator().manual_seed(5)
    first = torch.randn(batch, cfg.in_channels, cfg.prefix_frames, *cfg.frame_size, generator=g).double()
    return dict(steps=steps, guidance=guidance, seed=list(seeds[:batch]), first_frames=first,
                prompt=random_text(batch, 6, cfg.text_dim, seed=1))


def _pick(kw, b):
    """The keyword arguments of sample b alone."""
    out = dict(kw, seed=[kw["seed"][b]], first_frames=kw["first_frames"][b:b + 1])
    t = kw["prompt"]
    out["prompt"] = type(t)(t.states[b:b + 1], t.mask[b:b + 1])
    return out


def _block_calls(model):
    """Count each block's denoising calls and write-pass calls through forward pre-hooks."""
    counts = {"denoise": [0] * len(model.blocks), "write": [0] * len(model.blocks)}

    def hook(i):
        def pre(module, args):
            counts["write" if args[3].write else "denoise"][i] += 1
        return pre
    handles = [b.register_forward_pre_hook(hook(i)) for i, b in enumerate(model.blocks)]
    return counts, handles


# -- parsing and the policies' arithmetic ------------------------------------------------------
def test_parse_specs_and_errors():
    assert StepCacheConfig.parse("adacache").policy == "adacache"
    assert StepCacheConfig.parse("adacache-moreg").policy == "adacache-moreg"
    assert StepCacheConfig.parse("fixed:3").reuse == 3
    assert StepCacheConfig.parse("first-block:0.05").threshold == 0.05
    for bad, words in [("teacache", "must be"), ("fixed", "must be"), ("fixed:x", "not a number"),
                       ("fixed:-1", "N >= 0"), ("first-block:nan", "threshold >= 0"),
                       ("first-block:", "must be"), ("adacache:2", "must be")]:
        with pytest.raises(ValueError, match=words):
            StepCacheConfig.parse(bad)
    with pytest.raises(ValueError, match="ascending"):
        StepCacheConfig(codebook={0.5: 2, 0.1: 3})


def test_codebook_lookup_and_defaults():
    assert stride_from_codebook(0.05, CODEBOOK_LONG) == 6
    assert stride_from_codebook(0.08, CODEBOOK_LONG) == 5  # thresholds are strict upper bounds
    assert stride_from_codebook(0.39, CODEBOOK_LONG) == 2
    assert stride_from_codebook(7.0, CODEBOOK_LONG) == 1
    cfg = StepCacheConfig()
    assert cfg.codebook_for(20) is CODEBOOK_SHORT and cfg.codebook_for(30) is CODEBOOK_LONG


def test_relative_l1_and_motion_score_by_hand():
    old = torch.tensor([[1.0, -2.0, 3.0, 0.0]]).reshape(1, 2, 1, 2)
    new = torch.tensor([[1.5, -2.0, 2.0, 1.0]]).reshape(1, 2, 1, 2)
    assert relative_l1(new, old) == pytest.approx([2.5 / 6.0])
    # frames [1, -2] and [3, 0]: |2| + |2| over (|3| + |0|) + (|1| + |2|)
    assert motion_score(old) == pytest.approx([4.0 / 6.0])
    still = torch.ones(2, 4, 3, 5)
    assert motion_score(still) == pytest.approx([0.0, 0.0])


# -- the loop ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["fixed:0", "first-block:0"])
def test_never_reusing_is_bitwise_uncached(spec):
    model = _text_model()
    kw = _kw(model)
    plain = generate_video(model, 9, **kw)
    stats = GenerationStats()
    cached = generate_video(model, 9, stats=stats, step_cache=spec, **kw)
    assert torch.equal(plain, cached)
    assert stats.steps_computed == stats.steps_total == 4 * 6 * 4  # 4 chunks x 6 steps x 4 rows
    assert torch.equal(generate_video(model, 9, **kw), plain)  # nothing of the policy stayed on the model


def test_reused_step_adds_the_kept_residual():
    """fixed:1 over 3 steps: step 0 computed, step 1 reuses step 0's residual, step 2 (last)
    computed. Rebuilt by hand from the model's pieces for the first generated chunk."""
    model = tiny_model(prefix_frames=1)
    kw = dict(steps=3, seed=[7], first_frames=torch.randn(1, 3, 1, 8, 8, dtype=torch.float64))
    video = generate_video(model, 3, step_cache="fixed:1", **kw)

    def final(h, c):
        shift, scale = model.final_adaLN(c)[:, :, None].chunk(2, dim=-1)
        return model.unpatchify(model.final_proj(modulate(model.final_norm(h), shift, scale)))

    from ca2vdm.generate import chunk_noise
    cache = model.new_cache(1)
    with torch.no_grad():
        first = kw["first_frames"]
        model.forward_cached(first, torch.zeros(1, 1, dtype=torch.float64), cache, write=True)
        sampler = model.diffusion.sampler(3)
        x = chunk_noise([7], 1, (3, 2, 8, 8), dtype=torch.float64)
        cond = model.condition(1)
        residual = None
        for i, tv in enumerate(sampler.timesteps):
            t = torch.full((1, 2), tv, dtype=torch.float64)
            if i == 1:
                h, c = model.embed(x, t, cond)
                pred = final(h + residual, c)
            else:
                pred, hidden = model.forward_cached(x, t, cache, cond, return_hidden=True)
                residual = hidden[-1] - model.embed(x, t, cond)[0]
            x = sampler.step(x, pred, i)
    assert (video[:, :, 1:3] - x).abs().max().item() < 1e-12
    # ... and reusing really changed the result
    assert (generate_video(model, 3, **kw)[:, :, 1:3] - x).abs().max().item() > 1e-6


def test_skipped_blocks_and_full_write_passes():
    model = _text_model()
    kw = _kw(model, steps=6)
    counts, handles = _block_calls(model)
    sc = StepCache("fixed:2", model.config.depth)  # computed steps per chunk: 0, 3, 5 (last)
    generate_video(model, 9, step_cache=sc, **kw)  # 1 given frame + 4 chunks of 2; 3 write passes after the first
    assert counts["denoise"] == [4 * 3, 4 * 3]
    assert counts["write"] == [4, 4]  # never skipped: every block of every write pass
    assert sc.chunk_computed == [3 * 4] * 4  # the same pattern in every chunk: state resets
    for c in counts.values():
        c[:] = [0, 0]
    # block 0 always; the rest only on first/last steps
    generate_video(model, 9, step_cache="first-block:inf", **kw)
    assert counts["denoise"] == [4 * 6, 4 * 2]
    assert counts["write"] == [4, 4]
    for h in handles:
        h.remove()


def test_each_row_keeps_its_own_state(monkeypatch):
    """Batched with guidance, rows decide separately (some steps run part of the batch), and each
    video equals the same video generated alone."""
    model = _text_model(prefix_enhance=True)
    kw = _kw(model, steps=6)
    seen = []
    real = stepcache.relative_l1
    monkeypatch.setattr(stepcache, "relative_l1", lambda new, old: seen.append(real(new, old)) or seen[-1])
    generate_video(model, 7, step_cache="first-block:inf", **kw)
    threshold = sorted(seen[0])[len(seen[0]) // 2]  # splits the rows at the second step
    parts = []
    sc = StepCache(StepCacheConfig(policy="first-block", threshold=threshold), model.config.depth)
    monkeypatch.setattr(sc, "run_blocks", _spy(sc.run_blocks, sc, parts))
    batched = generate_video(model, 7, step_cache=sc, **kw)
    assert any(0 < n < 4 for n in parts) and sc.computed < sc.total
    for b in range(2):
        policy = StepCacheConfig(policy="first-block", threshold=threshold)
        alone = generate_video(model, 7, step_cache=policy, **_pick(kw, b))
        assert (batched[b:b + 1] - alone).abs().max().item() < 1e-10


def _spy(fn, sc, parts):
    def wrapped(blocks, h, c, cond, ctx, mods=None):
        out = fn(blocks, h, c, cond, ctx, mods)
        parts.append(sc.samples and sum(1 for s in sc.samples if s.last_step == sc.step))
        return out
    return wrapped


@pytest.mark.parametrize("spec", ["adacache", "adacache-moreg"])
def test_adacache_schedules_per_chunk(spec):
    """First and last steps always computed; strides follow the codebook; the counters add up."""
    model = _text_model()
    kw = _kw(model, steps=8)
    cfg = StepCacheConfig.parse(spec)
    cfg.codebook = {1e9: 3}  # every metric maps to stride 3: computed steps 0, 1, 4, 7
    sc = StepCache(cfg, model.config.depth)
    stats = GenerationStats()
    generate_video(model, 9, stats=stats, step_cache=sc, **kw)
    assert sc.chunk_computed == [4 * 4] * 4
    assert stats.steps_computed == 4 * 4 * 4 and stats.steps_total == 4 * 8 * 4
    assert math.isclose(sc.fraction_computed, 0.5)


def test_step_cache_only_in_shared_mode():
    model = _text_model()
    with pytest.raises(ValueError, match="shared"):
        generate_video(model, 5, mode="recompute-full", step_cache="adacache", **_kw(model, steps=2))
