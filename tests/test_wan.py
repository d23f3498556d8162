"""The Wan backbone computes what diffusers' WanTransformer3DModel computes, and loads Wan weights
from both layouts, strictly.

Tiny random configurations (2 layers, 2 heads of 16, patches (1, 2, 2) of 8x8 latent frames).
Bounds in float32: diffusers computes its norms and residual in float32 as we do, but its time
sinusoid in float32 where Wan's code (and ours) uses float64; relative errors below are the largest
absolute difference over the largest absolute reference value, measured at 1.0e-6 to 2.3e-6 and
held to 1e-5 (with a float32 sinusoid the per-frame path is bitwise diffusers', the others 4e-7).
Each test names the deliberate breaks it was checked to catch.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
from diffusers.models.transformers.transformer_wan import (  # noqa: E402
    WanAttnProcessor,
    WanTransformer3DModel,
)
from safetensors.torch import save_file  # noqa: E402

from ca2vdm.conditioning import Condition, Text  # noqa: E402
from ca2vdm.wan import WanConfig  # noqa: E402
from ca2vdm.wan_weights import WanWeightsError, load_state, load_wan  # noqa: E402

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=6, text_dim=24,
            freq_dim=32, ffn_dim=64, num_layers=2)
B, H, W = 2, 8, 8
S = (H // 2) * (W // 2)  # tokens per frame
BOUND = 1e-5


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """diffusers' model with every parameter perturbed (norm weights are not 1, tables not tiny),
    and the folder it saves itself to."""
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**WanConfig(**TINY).to_diffusers()).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("wan") / "diffusers"
    ref.save_pretrained(path)
    return ref, path


def inputs(frames, text_tokens=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, frames, H, W, generator=g)
    t = torch.rand(B, frames, generator=g) * 1000
    text = torch.randn(B, text_tokens, 24, generator=g)
    return x, t, text


def test_bidirectional_forward_matches_diffusers(reference, one_thread):
    """All frames see all frames, one timestep per video (diffusers' (B,) path), a 7-token prompt
    zero-padded to all 512 positions and attended without a mask (diffusers gets the padded
    states, as Wan's pipeline builds them). A ``Text`` whose padding is masked equals its zeroed
    states. Measured 1.0e-6. Caught: RoPE rotating halves instead of adjacent pairs; the head
    modulated by the 6-D projection instead of the time embedding."""
    ref, path = reference
    model = load_wan(path)
    x, t, text = inputs(5)
    t = t[:, :1].expand(B, 5)
    with torch.no_grad():
        ours = model(x, t, text)
        theirs = ref(x, t[:, 0], F.pad(text, (0, 0, 0, 512 - 7))).sample
        assert ours.shape == theirs.shape == (B, 6, 5, H, W)
        assert rel(ours, theirs) < BOUND
        mask = torch.ones(B, 10, dtype=torch.bool)
        mask[:, 7:] = False
        padded = Text(torch.cat([text, torch.randn(B, 3, 24)], dim=1), mask)
        assert torch.equal(model(x, t, padded), ours)


def test_per_frame_levels_match_diffusers_per_token_timesteps(reference, one_thread):
    """Each frame at its own level equals diffusers' per-token path (timestep (B, seq_len), every
    token given its frame's level). Measured 2.3e-6. Caught: the levels applied in reverse frame
    order."""
    ref, path = reference
    model = load_wan(path, text_len=7)
    x, t, text = inputs(4)
    with torch.no_grad():
        ours = model(x, t, text)
        theirs = ref(x, t.repeat_interleave(S, dim=1), text).sample
    assert rel(ours, theirs) < BOUND


class MaskedWanProcessor(WanAttnProcessor):
    """Test only: diffusers' Wan attention, self-attention given a token mask and RoPE tables for
    frames starting at ``offset`` (diffusers' own tables, sliced as its WanRotaryPosEmbed does)."""

    def __init__(self, mask, rope, offset, frames, h, w):
        super().__init__()
        self.mask = mask
        parts = [rope.t_dim, rope.h_dim, rope.w_dim]
        out = []
        for table in (rope.freqs_cos, rope.freqs_sin):
            tf, th, tw = table.split(parts, dim=1)
            out.append(torch.cat([tf[offset:offset + frames].view(frames, 1, 1, -1).expand(frames, h, w, -1),
                                  th[:h].view(1, h, 1, -1).expand(frames, h, w, -1),
                                  tw[:w].view(1, 1, w, -1).expand(frames, h, w, -1)],
                                 dim=-1).reshape(1, frames * h * w, 1, -1))
        self.rotary = tuple(out)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is None:  # self-attention
            attention_mask, rotary_emb = self.mask, self.rotary
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


def causal_token_mask(offset, frames, chunk, window, sink):
    """Self-Forcing's / LongLive's block mask over tokens: a token sees every key token before the
    end of its chunk, within the last (window - sink) frames of it, plus the sink frames."""
    absolute = offset + torch.arange(frames * S) // S  # frame of every token
    ends = (absolute // chunk + 1) * chunk
    q, k = ends[:, None], absolute[None, :]
    return (k < q) & ((k >= q - (window - sink)) | (k < sink))


@pytest.mark.parametrize("offset, sink", [(3, 0), (0, 1)])
def test_block_causal_forward_matches_diffusers_with_a_mask(reference, one_thread, offset, sink):
    """Chunks of 2 frames, a window of 4 (the window binds: the last chunk does not see the
    first), frames starting mid-chunk at absolute frame 3, or from 0 with a sink frame: equals
    diffusers' forward whose self-attention gets the same mask as a token mask and RoPE at the
    same absolute frames. Measured 1.1e-6 and 1.2e-6. Caught: the window one frame wider; chunks
    counted from x's first frame instead of absolute frame 0. (Every frame's RoPE shifted alike
    changes no output, RoPE being relative: the next test checks offsets where they matter.)"""
    ref, path = reference
    model = load_wan(path, chunk_frames=2, max_context_frames=4, sink_frames=sink, text_len=7)
    frames = 7
    x, t, text = inputs(frames)
    masked = copy.deepcopy(ref)
    mask = causal_token_mask(offset, frames, 2, 4, sink)
    proc = MaskedWanProcessor(mask, masked.rope, offset, frames, H // 2, W // 2)
    for block in masked.blocks:
        block.attn1.set_processor(proc)
    with torch.no_grad():
        ours = model(x, t, text, mask="block-causal", frames=offset)
        theirs = masked(x, t.repeat_interleave(S, dim=1), text).sample
        plain = model(x, t, text, frames=offset)
    assert rel(ours, theirs) < BOUND
    assert rel(plain, theirs) > 1e-2  # the mask matters here


def test_context_then_chunk_equals_the_block_causal_forward(reference, one_thread):
    """What a KV-cache engine computes: the context frames' rotated K/V recorded by one forward,
    then the chunk alone at its absolute frames attending to [window || chunk], equals the
    block-causal forward over [context || chunk] (float64; measured bitwise equal, held to 1e-12).
    Caught: the chunk's RoPE at frame 5 instead of 6 (the assertion below); RoPE ignoring
    ``frames``; a K/V hook whose output is ignored."""
    _, path = reference
    model = load_wan(path, dtype=torch.float64, chunk_frames=2, max_context_frames=4, text_len=7)
    x, t, text = (a.double() for a in inputs(8))
    t[:, :6] = 0  # clean context frames 0..5, a noisy chunk 6..7
    cond = model.condition(text)
    recorded = {}

    def record(i, k, v):
        recorded[i] = (k, v)
        return k, v

    def window(i, k, v):  # the chunk of frames 6..7 sees frames 4..7
        return torch.cat([recorded[i][0][:, :, 4:6], k], dim=2), torch.cat([recorded[i][1][:, :, 4:6], v], dim=2)

    with torch.no_grad():
        full = model(x, t, cond, mask="block-causal")
        model(x[:, :, :6], t[:, :6], cond, mask="block-causal", keys=record)
        chunk = model(x[:, :, 6:], t[:, 6:], cond, frames=6, keys=window)
        shifted = model(x[:, :, 6:], t[:, 6:], cond, frames=5, keys=window)
    assert rel(chunk, full[:, :, 6:]) < 1e-12
    assert rel(shifted, full[:, :, 6:]) > 1e-6


def test_precision_never_below_float32_never_downcast_from_float64(reference, one_thread):
    """float64 parameters: every module's floating output is float64 (nothing falls to float32).
    bfloat16 parameters: the residual stream (every block's output), norms and modulation are
    float32. Caught: ``upcast`` returning float32 always; the time MLP run in the parameter dtype;
    a block's output cast back to the parameter dtype."""
    _, path = reference
    x, t, text = inputs(3)
    for dtype, expect in ((torch.float64, {torch.float64}), (torch.bfloat16, {torch.float32})):
        model = load_wan(path, dtype=dtype, text_len=7)
        seen = {}

        def hook(module, args, out, seen=seen):
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                seen.setdefault(type(module).__name__, set()).add(out.dtype)

        handles = [m.register_forward_hook(hook) for m in model.modules()]
        with torch.no_grad():
            out = model(x, t, text)
        for h in handles:
            h.remove()
        assert torch.isfinite(out.float()).all()
        if dtype == torch.float64:
            assert all(d == {torch.float64} for d in seen.values()), seen
        else:
            for name in ("WanBlock", "LayerNorm", "TimeMLP"):
                assert seen[name] == expect, (name, seen[name])
            assert model.modulation(t)[1].dtype == torch.float32


def original_layout(state: dict) -> dict:
    """diffusers' names -> Wan's own (written from Wan's WanModel, independent of the loader)."""
    names = [("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
             ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
             ("condition_embedder.time_proj", "time_projection.1"),
             ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
             ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
             ("attn1.to_out.0", "self_attn.o"), ("attn2.to_out.0", "cross_attn.o"),
             ("attn1.to_", "self_attn."), ("attn2.to_", "cross_attn."), ("attn1.", "self_attn."),
             ("attn2.", "cross_attn."), (".norm2.", ".norm3."), ("ffn.net.0.proj", "ffn.0"),
             ("ffn.net.2", "ffn.2"), (".scale_shift_table", ".modulation"), ("proj_out", "head.head")]
    out = {}
    for k, v in state.items():
        for a, b in names:
            k = k.replace(a, b)
        out["head.modulation" if k == "scale_shift_table" else k] = v.clone()
    return out


@pytest.fixture(scope="module")
def original_files(reference, tmp_path_factory):
    """The reference weights in Wan's layout: a .pt whose generator_ema entry has the ``model.``
    prefix (its generator entry holds other weights), and a flat .safetensors."""
    ref, _ = reference
    state = original_layout(ref.state_dict())
    other = {k: torch.randn_like(v) for k, v in state.items()}
    root = tmp_path_factory.mktemp("original")
    torch.save({"generator": {f"model.{k}": v for k, v in other.items()},
                "generator_ema": {f"model.{k}": v for k, v in state.items()}, "step": torch.tensor(7)},
               root / "ckpt.pt")
    save_file(state, str(root / "flat.safetensors"))
    return root, state


def test_both_layouts_load_bitwise_equal(reference, original_files, tmp_path, capfd, one_thread):
    """The diffusers folder, its sharded copy, the original layout in a .pt (generator_ema picked
    and printed, ``model.`` stripped, converted by diffusers' code) and in a flat .safetensors:
    the same weights, bitwise-equal outputs. Caught: picking ``generator`` first."""
    ref, path = reference
    root, _ = original_files
    cfg = WanConfig(**TINY, text_len=7)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    x, t, text = inputs(3)
    models = [load_wan(path, text_len=7), load_wan(tmp_path / "sharded", text_len=7),
              load_wan(root / "ckpt.pt", cfg), load_wan(root / "flat.safetensors", cfg)]
    assert "'generator_ema' entry" in capfd.readouterr().err
    with torch.no_grad():
        outs = [m(x, t, text) for m in models]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_mismatched_weights_are_one_clear_error(reference, original_files, tmp_path):
    """A prefixed file loaded without stripping, a missing key, a mis-shaped key: each one
    ``WanWeightsError`` naming the keys; a failed load leaves the model as it was. Caught: the
    strict check removed (load_state_dict(strict=False))."""
    root, state = original_files
    cfg = WanConfig(**TINY)
    with pytest.raises(WanWeightsError, match=r"(?s)missing \(\d+\).*unexpected.*starts with 'model\.'"):
        load_wan(root / "ckpt.pt", cfg, prefix=None)
    lacking = {k: v for k, v in state.items() if k != "blocks.1.ffn.2.bias"}
    save_file(lacking, str(tmp_path / "lacking.safetensors"))
    with pytest.raises(WanWeightsError, match=r"missing \(1\): blocks\.1\.ffn\.fc2\.bias"):
        load_wan(tmp_path / "lacking.safetensors", cfg)
    wrong = dict(state, **{"head.modulation": torch.zeros(1, 3, 32)})
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    shape = r"mis-shaped \(1\): head\.modulation \(1, 3, 32\) \(model \(1, 2, 32\)\)"
    with pytest.raises(WanWeightsError, match=shape):
        load_wan(tmp_path / "wrong.safetensors", cfg)
    model = load_wan(root / "flat.safetensors", cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    bad["head.proj.weight"] = torch.zeros(5, 5)
    with pytest.raises(WanWeightsError):
        load_state(model, bad, "bad")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("style", ["peft", "kohya"])
def test_lora_merge_equals_the_delta_added_by_hand(original_files, tmp_path, style):
    """A rank-4 LoRA on three linears of Wan's layout: LongLive's peft keys under
    ``generator_lora`` (alpha given), or lora_down / lora_up with a stored alpha. The merged
    weights equal base + (B @ A) * alpha / r added by hand, bitwise; the others are untouched.
    Caught: scaling by alpha instead of alpha / r. A LoRA with no alpha is an error."""
    root, state = original_files
    cfg = WanConfig(**TINY)
    g = torch.Generator().manual_seed(3)
    targets = {"blocks.0.self_attn.q": "blocks.0.self_attn.q", "blocks.1.cross_attn.o": "blocks.1.cross_attn.o",
               "blocks.0.ffn.0": "blocks.0.ffn.fc1"}  # Wan's name -> ours
    factors = {n: (torch.randn(4, state[f"{n}.weight"].shape[1], generator=g),
                   torch.randn(state[f"{n}.weight"].shape[0], 4, generator=g)) for n in targets}
    if style == "peft":
        lora = {f"base_model.model.{n}.lora_{r}.weight": f for n, (a, b) in factors.items()
                for r, f in (("A", a), ("B", b))}
        torch.save({"generator_lora": lora}, tmp_path / "lora.pt")
        merged = load_wan(root / "ckpt.pt", cfg, lora=tmp_path / "lora.pt", lora_alpha=8)
        with pytest.raises(WanWeightsError, match="stores no alpha"):
            load_wan(root / "ckpt.pt", cfg, lora=tmp_path / "lora.pt")
    else:
        lora = {f"diffusion_model.{n}.{k}": v for n, (a, b) in factors.items()
                for k, v in (("lora_down.weight", a), ("lora_up.weight", b), ("alpha", torch.tensor(8.0)))}
        save_file(lora, str(tmp_path / "lora.safetensors"))
        merged = load_wan(root / "ckpt.pt", cfg, lora=tmp_path / "lora.safetensors")
    base = load_wan(root / "ckpt.pt", cfg).state_dict()
    expected = dict(base)
    for n, ours in targets.items():
        a, b = factors[n]
        expected[f"{ours}.weight"] = base[f"{ours}.weight"] + (b @ a) * (8 / 4)
    got = merged.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert not torch.equal(got["blocks.0.ffn.fc1.weight"], base["blocks.0.ffn.fc1.weight"])


def test_config_round_trip_and_contradictions(reference):
    """The diffusers config round-trips; contradictory settings are refused with the field named."""
    ref, _ = reference
    cfg = WanConfig.from_diffusers(dict(ref.config), chunk_frames=2)
    assert cfg == WanConfig(**TINY, chunk_frames=2) and cfg.to_diffusers() == {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in ref.config.items() if k in WanConfig.DIFFUSERS_KEYS}
    assert WanConfig.from_dict(cfg.to_dict()) == cfg
    for bad, field in [(dict(patch_size=(2, 2, 2)), "patch_size"), (dict(attention_head_dim=15), "attention_head_dim"),
                       (dict(chunk_frames=5, max_context_frames=4), "max_context_frames"),
                       (dict(sink_frames=2, max_context_frames=4, chunk_frames=3), "max_context_frames"),
                       (dict(freq_dim=31), "freq_dim"), (dict(qk_norm=None), "qk_norm")]:
        with pytest.raises(ValueError, match=f"WanConfig.{field}"):
            WanConfig(**{**TINY, **bad})
    with pytest.raises(ValueError, match="image conditioning"):
        WanConfig.from_diffusers(dict(ref.config, image_dim=1280))
    with pytest.raises(ValueError, match="unknown WanTransformer3DModel config keys: window"):
        WanConfig.from_diffusers(dict(ref.config, window=3))


def test_guided_condition_is_both_prompts_in_one_batch(reference, one_thread):
    """Condition.cat of two unmasked (Wan) conditions: one 2B forward equals the two forwards."""
    _, path = reference
    model = load_wan(path, dtype=torch.float64, text_len=7)
    x, t, text = (a.double() for a in inputs(3))
    a, b = model.condition(text), model.condition(torch.zeros_like(text))
    with torch.no_grad():
        both = model(torch.cat([x, x]), torch.cat([t, t]), Condition.cat(a, b))
        apart = torch.cat([model(x, t, a), model(x, t, b)])
    assert rel(both, apart) < 1e-12
