"""Training: the Ca2-VDM loss, one optimisation step, exact resume, checkpoints, run configs, errors.

Every test uses a tiny model (hidden 32, depth 2, 8x8 frames of 16 tokens) and a handful of steps.
"""

import csv
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from ca2vdm import CausalVideoDiT, ModelConfig
from ca2vdm import Text
from ca2vdm.checkpoint import DEFAULT_GUIDANCE, CheckpointError, guidance_for, load_checkpoint, save_checkpoint
from ca2vdm.data import MovingDigits
from ca2vdm.training import (TrainConfig, Trainer, apply_overrides, ca2vdm_loss, clip_frames, load_run_config,
                             lr_at, prefix_choices)

from conftest import tiny_model

REPO = Path(__file__).resolve().parent.parent
TEXT_DIM = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def model_config(**overrides) -> ModelConfig:
    base = dict(in_channels=3, frame_size=8, patch=2, hidden=32, depth=2, heads=2, mlp_ratio=2.0,
                chunk_frames=2, prefix_frames=1, max_context_frames=5, conditioning="class", num_classes=10)
    base.update(overrides)
    return ModelConfig(**base)


def train_config(**overrides) -> TrainConfig:
    base = dict(steps=4, batch_size=2, eval_every=0, save_every=1000, val_clips=4, warmup=2, log_every=1000)
    base.update(overrides)
    return TrainConfig(**base)


_DATA = {}


def digits(frames: int, split: str = "train", num_clips: int = 16) -> MovingDigits:
    key = (frames, split, num_clips)
    if key not in _DATA:
        _DATA[key] = MovingDigits(num_clips, frames, size=8, channels=3, digit_size=6, split=split, seed=0)
    return _DATA[key]


class FakeTextEncoder:
    """Deterministic per caption (hash-seeded), 1-4 tokens per caption, right-padded like MiniLM."""

    def __init__(self, dim: int = TEXT_DIM):
        self.dim, self.calls = dim, 0

    def encode(self, captions):
        self.calls += 1
        rows = []
        for c in captions:
            seed = int.from_bytes(hashlib.sha256(c.encode()).digest()[:8], "little") >> 1
            n = 1 + seed % 4
            rows.append(torch.randn(n, self.dim, generator=torch.Generator().manual_seed(seed)))
        N = max(r.shape[0] for r in rows)
        states = torch.zeros(len(rows), N, self.dim)
        mask = torch.zeros(len(rows), N, dtype=torch.bool)
        for i, r in enumerate(rows):
            states[i, :r.shape[0]], mask[i, :r.shape[0]] = r, True
        return states, mask


def make_trainer(cfg=None, tc=None, dataset=None, **kwargs) -> Trainer:
    cfg = cfg or model_config()
    tc = tc or train_config()
    if dataset is None:
        dataset = digits(clip_frames(cfg))
    if cfg.conditioning == "text" and "text_encoder" not in kwargs:
        kwargs["text_encoder"] = FakeTextEncoder(cfg.text_dim)
    return Trainer(cfg, tc, dataset, **kwargs)


def params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def dir_bytes(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


# --------------------------------------------------------------------------------------------
# 1. Layouts
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p,l,P,choices,clip", [
    (1, 8, 25, [1, 9, 17, 25], 33),
    (0, 4, 8, [0, 4, 8], 12),
    (1, 2, 5, [1, 3, 5], 7),
    (0, 2, 4, [0, 2, 4], 6),
    (1, 4, 1, [1], 5),
    (2, 3, 7, [2, 5, 7], 11),  # 7 - 2 is not a multiple of 3: a full 7-frame window begins mid-chunk
])
def test_prefix_choices_and_clip_frames(p, l, P, choices, clip):
    cfg = ModelConfig(chunk_frames=l, prefix_frames=p, max_context_frames=P)
    assert prefix_choices(cfg) == choices
    assert clip_frames(cfg) == clip


def test_digits_config_layout():
    cfg = ModelConfig.from_dict(load_run_config(REPO / "configs" / "digits.yaml")["model"])
    assert prefix_choices(cfg) == [0, 4, 8] and clip_frames(cfg) == 12 == cfg.cyclic_length


# --------------------------------------------------------------------------------------------
# 2. One training step
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,train_overrides", [
    (dict(conditioning="none", num_classes=0), {}),
    (dict(conditioning="class"), {}),
    (dict(conditioning="text", num_classes=0, text_dim=TEXT_DIM), {}),
    (dict(conditioning="class", prefix_frames=0, max_context_frames=4), {}),
    (dict(conditioning="class"), dict(grad_accum=2)),
    (dict(conditioning="class"), dict(context_noise=0.1)),
    (dict(conditioning="none", num_classes=0, objective="eps"), dict(context_noise=50)),
    (dict(conditioning="text", num_classes=0, text_dim=TEXT_DIM, positions="rope", prefix_enhance=True),
     dict(grad_accum=2, context_noise=0.2, autocast="off")),
    (dict(conditioning="class"), dict(layout="all-chunks", context_noise=0.1)),
    (dict(conditioning="none", num_classes=0, prefix_frames=0, max_context_frames=4), dict(layout="all-chunks")),
    (dict(conditioning="class"), dict(grad_checkpointing=True)),
    (dict(conditioning="text", num_classes=0, text_dim=TEXT_DIM, prediction="sample"), {}),
    (dict(conditioning="text", num_classes=0, text_dim=TEXT_DIM, pooled_text=True), {}),
    (dict(conditioning="text", num_classes=0, text_dim=TEXT_DIM, prefix_frames=0, temporal="bidirectional",
          cyclic_length=10, clip_length=10), dict(layout="full-clip")),
], ids=["none", "class", "text", "no-prefix", "grad-accum", "context-noise", "eps", "text-rope-accum",
        "all-chunks", "all-chunks-no-prefix", "grad-checkpointing", "x0-prediction", "pooled-text", "bidirectional"])
def test_one_training_step(overrides, train_overrides):
    tr = make_trainer(model_config(**overrides), train_config(**train_overrides))
    before = params(tr.model)
    row = tr.train_step()
    assert tr.step == 1 and row["step"] == 1
    assert torch.isfinite(torch.tensor(row["loss"])) and row["loss"] > 0
    assert torch.isfinite(torch.tensor(row["grad_norm"]))
    assert row["lr"] == pytest.approx(tr.tc.lr / tr.tc.warmup)  # linear warm-up, step 0
    after = params(tr.model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "final_proj.weight" in changed  # adaLN-Zero: the output layer moves first
    assert all(torch.isfinite(v).all() for v in after.values())
    # the EMA (decay warms up: 0.1 at step 0) lies between the initial and the new weights
    assert not torch.equal(tr.ema.shadow["final_proj.weight"], after["final_proj.weight"])
    assert not torch.equal(tr.ema.shadow["final_proj.weight"], before["final_proj.weight"])
    expect = 0.1 * before["final_proj.weight"] + 0.9 * after["final_proj.weight"]
    assert torch.allclose(tr.ema.shadow["final_proj.weight"], expect, atol=1e-7)
    tr.train_step()
    assert tr.step == 2
    if overrides.get("conditioning") == "text":
        assert tr.text.memo  # captions were encoded and memoised


def test_grad_accum_uses_both_micro_batches():
    cfg = model_config()
    one = make_trainer(cfg, train_config(grad_accum=1)).train_step()["loss"]
    two = make_trainer(cfg, train_config(grad_accum=2)).train_step()["loss"]
    assert one != two
    tr = make_trainer(cfg, train_config(grad_accum=2))
    (_, v0, _), (_, v1, _) = tr.batch(0, 0), tr.batch(0, 1)
    assert not torch.equal(v0, v1)
    (_, again, _) = tr.batch(0, 0)
    assert torch.equal(v0, again)


@pytest.mark.parametrize("layout", ["prefix", "all-chunks"])
def test_grad_checkpointing_gives_the_same_step(layout):
    cfg = model_config(conditioning="text", num_classes=0, text_dim=TEXT_DIM)
    plain = make_trainer(cfg, train_config(autocast="off", layout=layout))
    ckpt = make_trainer(cfg, train_config(autocast="off", layout=layout, grad_checkpointing=True))
    assert ckpt.model.grad_checkpointing and not plain.model.grad_checkpointing
    for _ in range(2):
        a, b = plain.train_step(), ckpt.train_step()
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    for (k, v), w in zip(plain.model.named_parameters(), ckpt.model.parameters()):
        assert torch.allclose(v, w, atol=1e-6), k


def test_train_config_layout_is_validated():
    with pytest.raises(ValueError, match=r"TrainConfig\.layout="):
        TrainConfig(layout="teacher")


def test_text_cache_encodes_each_caption_once():
    tr = make_trainer(model_config(conditioning="text", num_classes=0, text_dim=TEXT_DIM))
    enc = tr.text.encoder
    items, _, _ = tr.batch(0, 0)
    caps = [it["caption"] for it in items]
    a = tr.text(caps, "cpu")
    calls = enc.calls
    b = tr.text(caps + caps, "cpu")
    assert enc.calls == calls  # nothing new to encode
    assert torch.equal(b.states[:len(caps)], a.states) and torch.equal(b.mask[:len(caps)], a.mask)


# --------------------------------------------------------------------------------------------
# 3. The loss
# --------------------------------------------------------------------------------------------
def loss_inputs(n_frames=7, seed=0, **overrides):
    model = tiny_model(dtype=torch.float32, **overrides).train()
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(2, 3, n_frames, 8, 8, generator=g) * 2 - 1
    return model, video


def test_loss_is_deterministic_per_generator_seed():
    model, video = loss_inputs()
    a = ca2vdm_loss(model, video, None, 3, torch.Generator().manual_seed(5))
    b = ca2vdm_loss(model, video, None, 3, torch.Generator().manual_seed(5))
    c = ca2vdm_loss(model, video, None, 3, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dim() == 0 and torch.isfinite(a)


def test_loss_only_sees_the_cut_clip_and_the_noisy_frames(monkeypatch):
    model, video = loss_inputs(n_frames=9)
    n_prefix, l = 3, model.config.chunk_frames
    base = ca2vdm_loss(model, video, None, n_prefix, torch.Generator().manual_seed(1))
    # frames after prefix + l are cut away
    later = video.clone()
    later[:, :, n_prefix + l:] = 123.0
    assert torch.equal(ca2vdm_loss(model, later, None, n_prefix, torch.Generator().manual_seed(1)), base)
    # the prefix frames' predictions are not part of the loss
    forward = model.forward

    def garbage_in_prefix(x, t, cond=None, **kw):
        out = forward(x, t, cond, **kw).clone()
        out[:, :, :n_prefix] = 1e6
        return out

    monkeypatch.setattr(model, "forward", garbage_in_prefix)
    assert torch.equal(ca2vdm_loss(model, video, None, n_prefix, torch.Generator().manual_seed(1)), base)
    monkeypatch.undo()
    # ... but the prefix frames themselves are context: changing them changes the loss
    other = video.clone()
    other[:, :, :n_prefix] = -video[:, :, :n_prefix]
    assert not torch.equal(ca2vdm_loss(model, other, None, n_prefix, torch.Generator().manual_seed(1)), base)


def test_loss_gradient_reaches_prefix_frames_through_attention():
    model, video = loss_inputs()
    with torch.no_grad():  # open the temporal-attention gates that adaLN-Zero closes
        for b in model.blocks:
            b.adaLN[1].bias.add_(0.5)
    video.requires_grad_(True)
    ca2vdm_loss(model, video, None, 3, torch.Generator().manual_seed(0)).backward()
    g = video.grad
    assert g[:, :, :3].abs().sum() > 0  # context
    assert g[:, :, 3:5].abs().sum() > 0  # the noisy chunk (x0 in the noisy input and the target)
    assert torch.equal(g[:, :, 5:], torch.zeros_like(g[:, :, 5:]))  # cut away


def test_context_noise_changes_only_clips_with_a_prefix():
    model, video = loss_inputs()
    for n_prefix in (1, 3):
        clean = ca2vdm_loss(model, video, None, n_prefix, torch.Generator().manual_seed(2))
        noisy = ca2vdm_loss(model, video, None, n_prefix, torch.Generator().manual_seed(2), context_noise=0.3)
        assert not torch.equal(clean, noisy)
    model0, video0 = loss_inputs(prefix_frames=0, max_context_frames=4)
    clean = ca2vdm_loss(model0, video0, None, 0, torch.Generator().manual_seed(2))
    noisy = ca2vdm_loss(model0, video0, None, 0, torch.Generator().manual_seed(2), context_noise=0.3)
    assert torch.equal(clean, noisy)


def record_shifts(monkeypatch, model):
    shifts, forward = [], model.forward

    def spy(x, t, cond=None, tpe_shift=0, **kw):
        shifts.append(tpe_shift)
        return forward(x, t, cond, tpe_shift=tpe_shift, **kw)

    monkeypatch.setattr(model, "forward", spy)
    return shifts


def test_random_tpe_shift_when_the_clip_fills_the_cyclic_table(monkeypatch):
    model, video = loss_inputs()  # p=1, l=2, P_max=5: cyclic table of 7 rows, clips of up to 7 frames
    L = model.config.cyclic_length
    assert L == 7
    shifts = record_shifts(monkeypatch, model)
    with torch.no_grad():
        for seed in range(12):
            ca2vdm_loss(model, video, None, 5, torch.Generator().manual_seed(seed))
        full = list(shifts)
        shifts.clear()
        for n_prefix in (1, 3):
            for seed in range(12):
                ca2vdm_loss(model, video, None, n_prefix, torch.Generator().manual_seed(seed))
    assert len(full) == 12 and all(0 <= s < L for s in full)
    assert len(set(full)) > 1 and any(s != 0 for s in full)
    assert shifts == [0] * 24  # a short prefix only happens at the start of a video: no rotation


def test_no_tpe_shift_with_rope(monkeypatch):
    model, video = loss_inputs(positions="rope")
    shifts = record_shifts(monkeypatch, model)
    with torch.no_grad():
        for seed in range(6):
            ca2vdm_loss(model, video, None, 5, torch.Generator().manual_seed(seed))
    assert shifts == [0] * 6


def test_misaligned_layout_still_trains_every_tpe_row(monkeypatch):
    # p=1, l=2, P_max=4: inference windows hold 4 frames (frames 1..4 before the chunk at 5..6,
    # TPE rows 1..6 mod 6 = 1, 2, 3, 4, 5, 0); training must include such full windows.
    model, video = loss_inputs(max_context_frames=4)
    L = model.config.cyclic_length
    assert L == 6 and clip_frames(model.config) == 7
    assert len(model.layout.window(3)) == 4 and prefix_choices(model.config) == [1, 3, 4]
    shifts = record_shifts(monkeypatch, model)
    seen = set()
    with torch.no_grad():
        for n_prefix in prefix_choices(model.config):
            for seed in range(12):
                shifts.clear()
                ca2vdm_loss(model, video, None, n_prefix, torch.Generator().manual_seed(seed))
                seen |= {(shifts[0] + i) % L for i in range(n_prefix + model.config.chunk_frames)}
    assert seen == set(range(L))


# --------------------------------------------------------------------------------------------
# 4. Resume reproduces an uninterrupted run
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("autocast,conditioning,layout", [
    ("off", "class", "prefix"), ("auto", "class", "prefix"), ("off", "text", "prefix"), ("auto", "text", "prefix"),
    ("auto", "class", "all-chunks"),
])
def test_resume_equals_uninterrupted(tmp_path, autocast, conditioning, layout):
    extra = dict(num_classes=0, text_dim=TEXT_DIM) if conditioning == "text" else {}
    cfg = model_config(conditioning=conditioning, **extra)
    tc = train_config(steps=6, autocast=autocast, caption_dropout=0.3, layout=layout)
    straight = make_trainer(cfg, tc)
    history = straight.run(log=lambda s: None)
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6]

    first = make_trainer(cfg, tc)
    early = [first.train_step() for _ in range(3)]
    assert [r["loss"] for r in early] == [r["loss"] for r in history[:3]]
    first.save(tmp_path / "ckpt")

    resumed = make_trainer(cfg, train_config(steps=6, autocast=autocast, caption_dropout=0.3, layout=layout))
    resumed.resume(tmp_path / "ckpt")
    assert resumed.step == 3
    later = resumed.run(log=lambda s: None)
    assert [r["step"] for r in later] == [4, 5, 6]
    for a, b in zip(history[3:], later):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=0)
        assert b["lr"] == a["lr"]
    for k, v in straight.model.state_dict().items():
        assert torch.allclose(resumed.model.state_dict()[k], v, atol=1e-6, rtol=0), k
    assert straight.ema.shadow.keys() == resumed.ema.shadow.keys()
    for k, v in straight.ema.shadow.items():
        assert torch.allclose(resumed.ema.shadow[k], v, atol=1e-6, rtol=0), k
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        sa, sb = straight.opt.state[p], resumed.opt.state[q]
        assert sa.keys() == sb.keys()
        for f in sa:
            assert torch.allclose(torch.as_tensor(sb[f]).float(), torch.as_tensor(sa[f]).float(), atol=1e-6), f


def test_resume_is_bit_exact_without_autocast(tmp_path):
    cfg, tc = model_config(), train_config(steps=4, autocast="off")
    straight = make_trainer(cfg, tc)
    history = straight.run(log=lambda s: None)
    first = make_trainer(cfg, tc)
    first.train_step()
    first.train_step()
    first.save(tmp_path / "ckpt")
    resumed = make_trainer(cfg, tc)
    resumed.resume(tmp_path / "ckpt")
    later = resumed.run(log=lambda s: None)
    assert [r["loss"] for r in later] == [r["loss"] for r in history[2:]]
    for k, v in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    for k, v in straight.ema.shadow.items():
        assert torch.equal(resumed.ema.shadow[k], v), k


def test_saved_model_is_the_ema_and_metadata(tmp_path):
    tr = make_trainer(extra_meta={"data": {"dataset": "moving-digits"}})
    tr.train_step()
    tr.train_step()
    tr.save(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["step"] == 2 and meta["data"] == {"dataset": "moving-digits"}
    assert meta["train"]["batch_size"] == 2 and meta["train"]["betas"] == [0.9, 0.99]
    assert ModelConfig.from_dict(meta["model"]) == tr.model.config
    loaded = load_checkpoint(tmp_path / "ckpt")
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, tr.ema.shadow[k]), k
    assert not torch.equal(loaded.final_proj.weight, tr.model.final_proj.weight)


# --------------------------------------------------------------------------------------------
# 5. Checkpoint round trip
# --------------------------------------------------------------------------------------------
def model_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 7, 8, 8, generator=g)
    t = torch.rand(2, 7, generator=g) * 1000
    return x, t


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model(dtype=torch.float32, conditioning="class", num_classes=10)
    save_checkpoint(tmp_path / "ckpt", model, {"note": "hi"})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == model.config and not loaded.training
    assert loaded.dtype == torch.float32
    x, t = model_inputs(model)
    with torch.no_grad():
        labels = torch.tensor([3, 10])
        a = model(x, t, model.condition(2, labels=labels))
        b = loaded(x, t, loaded.condition(2, labels=labels))
    assert torch.equal(a, b)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["note"] == "hi"


def test_checkpoint_float16(tmp_path):
    model = tiny_model(dtype=torch.float32)
    save_checkpoint(tmp_path / "fp32", model)
    save_checkpoint(tmp_path / "fp16", model, dtype=torch.float16)
    size32 = (tmp_path / "fp32" / "model.safetensors").stat().st_size
    size16 = (tmp_path / "fp16" / "model.safetensors").stat().st_size
    assert size16 < 0.6 * size32
    loaded = load_checkpoint(tmp_path / "fp16")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.half().float()), k
    x, t = model_inputs(model)
    with torch.no_grad():
        assert torch.allclose(loaded(x, t), model(x, t), atol=1e-2)
    assert load_checkpoint(tmp_path / "fp16", dtype=torch.float64).dtype == torch.float64


def test_checkpoint_replaced_atomically(tmp_path):
    a, b = tiny_model(dtype=torch.float32, seed=0), tiny_model(dtype=torch.float32, seed=1)
    save_checkpoint(tmp_path / "ckpt", a)
    save_checkpoint(tmp_path / "ckpt", b, train_tensors={"x": torch.ones(3)})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no .tmp- / .old- leftovers
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(loaded.final_proj.weight, b.final_proj.weight)
    assert (tmp_path / "ckpt" / "train.safetensors").is_file()
    # a save that fails half-way leaves the previous checkpoint as it was, and no debris
    before = dir_bytes(tmp_path / "ckpt")
    import ca2vdm.checkpoint as ckpt_mod
    real = ckpt_mod.save_file

    def fail_on_train(tensors, filename, *args, **kw):
        if filename.endswith("train.safetensors"):
            raise OSError("disk full")
        return real(tensors, filename, *args, **kw)

    ckpt_mod.save_file = fail_on_train
    try:
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint(tmp_path / "ckpt", a, train_tensors={"x": torch.zeros(3)})
    finally:
        ckpt_mod.save_file = real
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert dir_bytes(tmp_path / "ckpt") == before


def test_saving_over_a_checkpoint_keeps_other_files(tmp_path):
    """A model card or a log beside the weights survives a save (e.g. `export` over a shipped model);
    the checkpoint's own files are replaced, and a stale train.safetensors does not linger."""
    path = tmp_path / "ckpt"
    save_checkpoint(path, tiny_model(dtype=torch.float32, seed=0), train_tensors={"x": torch.ones(3)})
    (path / "MODEL_CARD.md").write_text("card")
    (path / "logs").mkdir()
    (path / "logs" / "train.txt").write_text("log")
    b = tiny_model(dtype=torch.float32, seed=1)
    save_checkpoint(path, b, dtype=torch.float16)
    assert sorted(p.name for p in path.iterdir()) == ["MODEL_CARD.md", "config.json", "logs", "model.safetensors"]
    assert (path / "MODEL_CARD.md").read_text() == "card" and (path / "logs" / "train.txt").read_text() == "log"
    assert torch.equal(load_checkpoint(path).final_proj.weight, b.final_proj.weight.half().float())
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


# --------------------------------------------------------------------------------------------
# 6. Checkpoint errors
# --------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, tiny_model(dtype=torch.float32))
    return path


def test_guidance_for_prefers_the_user_then_the_checkpoint(tmp_path):
    model = CausalVideoDiT(model_config())
    save_checkpoint(tmp_path / "plain", model, {})
    save_checkpoint(tmp_path / "rec", model, {"sampling": {"guidance": 6}})
    save_checkpoint(tmp_path / "bad", model, {"sampling": {"guidance": "high"}})
    assert guidance_for(tmp_path / "plain") == DEFAULT_GUIDANCE
    assert guidance_for(tmp_path / "rec") == 6.0 and guidance_for(tmp_path / "rec", 1.5) == 1.5
    with pytest.raises(CheckpointError, match="sampling.guidance must be a number"):
        guidance_for(tmp_path / "bad")
    for wrong in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="must be >= 0"):
            guidance_for(tmp_path / "rec", wrong)


def test_load_missing_directory(tmp_path):
    path = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match="not found") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


def test_load_without_config_json(saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(saved)


def test_load_invalid_config_json(saved):
    text = (saved / "config.json").read_text()
    (saved / "config.json").write_text(text[:len(text) // 2])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(saved)


def test_load_config_without_model_section(saved):
    (saved / "config.json").write_text(json.dumps({"step": 3}))
    with pytest.raises(CheckpointError, match="no 'model' section"):
        load_checkpoint(saved)


def test_load_missing_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing checkpoint file"):
        load_checkpoint(saved)


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_load_truncated_weights(saved, keep):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_checkpoint(saved)
    assert "model.safetensors" in str(e.value)


def test_load_shape_mismatch(saved):
    meta = json.loads((saved / "config.json").read_text())
    meta["model"]["hidden"] = 64
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match") as e:
        load_checkpoint(saved)
    assert "shape mismatch" in str(e.value)


def test_load_missing_keys(saved):
    meta = json.loads((saved / "config.json").read_text())
    meta["model"].update(conditioning="class", num_classes=10)  # adds label_embed.weight
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match.*missing 1 keys.*label_embed"):
        load_checkpoint(saved)


def test_resume_with_a_different_model_config(tmp_path):
    tr = make_trainer()
    tr.train_step()
    tr.save(tmp_path / "ckpt")
    other = make_trainer(model_config(depth=1))
    with pytest.raises(CheckpointError, match="different model config"):
        other.resume(tmp_path / "ckpt")
    assert other.step == 0


def test_resume_from_a_weights_only_checkpoint(tmp_path):
    cfg = model_config()
    save_checkpoint(tmp_path / "ckpt", CausalVideoDiT(cfg), {"step": 5})
    tr = make_trainer(cfg)
    with pytest.raises(CheckpointError, match="train.safetensors"):
        tr.resume(tmp_path / "ckpt")


def text_config(**overrides) -> ModelConfig:
    return model_config(conditioning="text", num_classes=0, text_dim=TEXT_DIM, **overrides)


def test_init_from_adds_a_zero_initialised_module(tmp_path):
    old = make_trainer(text_config())
    old.train_step()
    old.save(tmp_path / "old")
    tr = make_trainer(text_config(pooled_text=True))
    new = tr.init_from(tmp_path / "old")
    assert new == ["text_pool.0.bias", "text_pool.0.weight", "text_pool.2.bias", "text_pool.2.weight"]
    saved = load_checkpoint(tmp_path / "old").state_dict()
    for k, v in tr.model.state_dict().items():
        if not k.startswith("text_pool"):
            assert torch.equal(v, saved[k]), k  # the old EMA weights, model and EMA alike
            assert torch.equal(tr.ema.shadow[k], saved[k]), k
    # the new branch starts at zero, so the fine-tune starts from the old model's function
    video = digits(clip_frames(tr.model.config))[0]["video"][None]
    t = torch.full(video.shape[:1] + video.shape[2:3], 500.0)
    text = tr.text(["a 3 moving left"], "cpu")
    old_model = load_checkpoint(tmp_path / "old")
    with torch.no_grad():
        cond = tr.model.condition(1, text)
        assert cond.vector is not None and not cond.vector.any()
        assert torch.allclose(tr.model(video, t, cond), old_model(video, t, old_model.condition(1, text)), atol=1e-6)
    assert tr.step == 0 and tr.train_step()["loss"] > 0


def test_pooled_text_depends_on_the_real_tokens_only():
    torch.manual_seed(0)
    model = CausalVideoDiT(text_config(pooled_text=True))
    torch.nn.init.normal_(model.text_pool[2].weight)
    states = torch.randn(2, 3, TEXT_DIM)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    vec = model.condition(2, Text(states, mask)).vector  # (B, D)
    padded = states.clone()
    padded[0, 2] = 100.0  # a padding token must not count
    assert torch.allclose(model.condition(2, Text(padded, mask)).vector, vec)
    assert torch.allclose(vec[0], model.text_pool(states[0, :2].mean(0)))
    other = states.clone()
    other[0, 1] += 1.0
    assert not torch.allclose(model.condition(2, Text(other, mask)).vector[0], vec[0])


def test_init_from_rejects_removed_keys_and_other_shapes(tmp_path):
    save_checkpoint(tmp_path / "pooled", CausalVideoDiT(text_config(pooled_text=True)), {"step": 0})
    tr = make_trainer(text_config())
    before = params(tr.model)
    with pytest.raises(CheckpointError, match="unexpected 4 keys"):
        tr.init_from(tmp_path / "pooled")
    save_checkpoint(tmp_path / "wide", CausalVideoDiT(text_config(hidden=48)), {"step": 0})
    with pytest.raises(CheckpointError, match="shape mismatch"):
        tr.init_from(tmp_path / "wide")
    assert all(torch.equal(v, before[k]) for k, v in params(tr.model).items())  # nothing was loaded


def test_pooled_text_needs_text_conditioning():
    with pytest.raises(ValueError, match="pooled_text"):
        model_config(pooled_text=True)


# --------------------------------------------------------------------------------------------
# 7. A non-finite loss stops training and keeps the last checkpoint
# --------------------------------------------------------------------------------------------
class Poisoned(torch.utils.data.Dataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        item = dict(self.base[i])
        item["video"] = torch.full_like(item["video"], float("nan"))
        return item


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path):
    tr = make_trainer(tc=train_config(steps=3, save_every=1), out_dir=tmp_path / "run")
    tr.train_step()
    tr.save(tmp_path / "run" / "checkpoint")
    before = dir_bytes(tmp_path / "run" / "checkpoint")
    weights = params(tr.model)
    tr.dataset = Poisoned(tr.dataset)
    with pytest.raises(FloatingPointError, match="at step 2"):  # steps count from 1, as in the logs
        tr.run(log=lambda s: None)
    assert tr.step == 1
    assert dir_bytes(tmp_path / "run" / "checkpoint") == before
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint", "metrics.csv"]
    after = params(tr.model)
    assert all(torch.equal(weights[k], after[k]) for k in weights)  # no optimizer step taken
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert rows == []


def test_nan_loss_from_the_first_step():
    cfg = model_config()
    tr = make_trainer(cfg, dataset=Poisoned(digits(clip_frames(cfg))))
    with pytest.raises(FloatingPointError, match="nan at step 1"):
        tr.train_step()


# --------------------------------------------------------------------------------------------
# 8. Run configuration
# --------------------------------------------------------------------------------------------
def test_apply_overrides_parses_yaml_values():
    cfg = {"model": {"hidden": 128}, "train": {"lr": 1e-3}}
    out = apply_overrides(cfg, [
        "model.hidden=64", "train.lr=2.0e-4", "train.betas=[0.9, 0.95]", "model.frame_size=[16, 16]",
        "model.positions=rope", "model.prefix_enhance=true", "out_dir=runs/x", "data.seed=3",
        "data.extra.deep.key=1.5", "train.caption_dropout=0", "model.cyclic_length=null", "train.note=a=b",
    ])
    assert out is cfg
    assert cfg["model"] == {"hidden": 64, "frame_size": [16, 16], "positions": "rope", "prefix_enhance": True,
                            "cyclic_length": None}
    assert cfg["train"] == {"lr": 2e-4, "betas": [0.9, 0.95], "caption_dropout": 0, "note": "a=b"}
    assert isinstance(cfg["train"]["lr"], float) and isinstance(cfg["model"]["hidden"], int)
    assert cfg["out_dir"] == "runs/x"
    assert cfg["data"] == {"seed": 3, "extra": {"deep": {"key": 1.5}}}


def test_apply_overrides_errors():
    with pytest.raises(ValueError, match="'foo' is not of the form key=value"):
        apply_overrides({}, ["foo"])
    with pytest.raises(ValueError, match="hidden is not a section"):
        apply_overrides({"model": {"hidden": 64}}, ["model.hidden.x=1"])


def write_yaml(tmp_path, text) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_load_run_config_digits():
    cfg = load_run_config(REPO / "configs" / "digits.yaml", ["train.steps=7", "model.depth=2"])
    assert set(cfg) <= {"model", "data", "train", "out_dir"}
    assert cfg["train"]["steps"] == 7 and cfg["model"]["depth"] == 2
    mc, tc = ModelConfig.from_dict(cfg["model"]), TrainConfig.from_dict(cfg["train"])
    assert mc.conditioning == "text" and mc.text_dim == 384 and tc.steps == 7
    assert cfg["data"]["dataset"] == "moving-digits"


def test_digits_stage2_continues_stage1():
    """Stage 2 starts from stage 1's run and differs from it only where its header says."""
    one = load_run_config(REPO / "configs" / "digits.yaml")
    two = load_run_config(REPO / "configs" / "digits_stage2.yaml")
    assert two["train"]["init_from"] == f"{one['out_dir']}/checkpoint"
    assert {k: v for k, v in two["model"].items() if k not in ("pooled_text", "flow_shift")} == one["model"]
    assert two["model"]["pooled_text"] and two["model"]["flow_shift"] == 3.0
    assert two["data"] == one["data"] and two["out_dir"] != one["out_dir"]


def test_load_run_config_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="unknown sections optim"):
        load_run_config(write_yaml(tmp_path, "model: {hidden: 32, heads: 2}\noptim: {lr: 1}\n"))
    with pytest.raises(ValueError, match="unknown ModelConfig fields: hiddn"):
        load_run_config(write_yaml(tmp_path, "model: {hiddn: 32}\n"))
    with pytest.raises(ValueError, match="unknown TrainConfig fields: stepz"):
        load_run_config(write_yaml(tmp_path, "train: {stepz: 3}\n"))
    with pytest.raises(ValueError, match="unknown ModelConfig fields: hiddn"):
        load_run_config(write_yaml(tmp_path, "model: {hidden: 32}\n"), ["model.hiddn=4"])
    with pytest.raises(ValueError, match=r"ModelConfig\.heads="):
        load_run_config(write_yaml(tmp_path, "model: {hidden: 32}\n"), ["model.heads=3"])
    with pytest.raises(ValueError, match=r"TrainConfig\.autocast="):
        load_run_config(write_yaml(tmp_path, "train: {autocast: fp16}\n"))
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_run_config(tmp_path / "missing.yaml")
    assert load_run_config(write_yaml(tmp_path, "")) == {}


def test_load_run_config_rejects_unknown_override_sections(tmp_path):
    with pytest.raises(ValueError, match="trian"):
        load_run_config(write_yaml(tmp_path, "train: {steps: 3}\n"), ["trian.steps=5"])


def test_exponent_learning_rate_is_a_float(tmp_path):
    """YAML 1.1 reads '2e-4' (no dot) as a string; the config turns it into the float it means."""
    cfg = load_run_config(write_yaml(tmp_path, "train: {steps: 3}\n"), ["train.lr=2e-4"])
    assert cfg["train"]["lr"] == "2e-4"  # what YAML hands over
    tc = TrainConfig.from_dict(cfg["train"])
    assert isinstance(tc.lr, float) and tc.lr == 2e-4
    assert lr_at(0, tc) == pytest.approx(2e-4 / tc.warmup)
    with pytest.raises(ValueError, match=r"TrainConfig\.lr='fast': expected float"):
        TrainConfig.from_dict({"lr": "fast"})


@pytest.mark.parametrize("field", ["steps", "batch_size", "grad_accum"])
def test_train_config_validation(field):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}=0"):
        TrainConfig(**{field: 0})
    with pytest.raises(ValueError, match="caption_dropout"):
        TrainConfig(caption_dropout=1.0)
    assert TrainConfig.from_dict({"betas": [0.8, 0.9]}).betas == (0.8, 0.9)


# --------------------------------------------------------------------------------------------
# 9. The loop: metrics.csv, evaluation and checkpoints
# --------------------------------------------------------------------------------------------
def test_run_writes_metrics_and_checkpoints(tmp_path, monkeypatch):
    cfg = model_config()
    frames = clip_frames(cfg)
    tc = train_config(steps=5, save_every=2, eval_every=2, log_every=2)
    out = tmp_path / "run"
    tr = make_trainer(cfg, tc, val_dataset=digits(frames, "val", 4), out_dir=out)
    saved_at, save = [], tr.save

    def spy(path):
        saved_at.append(tr.step)
        assert Path(path) == out / "checkpoint"
        save(path)

    monkeypatch.setattr(tr, "save", spy)
    lines = []
    history = tr.run(log=lines.append)
    assert saved_at == [2, 4, 5]  # every save_every steps and at the end
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5]
    with open(out / "metrics.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["step", "loss", "lr", "grad_norm", "it_per_s", "val_loss", "minutes"]
        rows = list(reader)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [float(r["loss"]) for r in rows] == pytest.approx([h["loss"] for h in history])
    has_val = [r["val_loss"] != "" for r in rows]
    assert has_val == [False, True, False, True, False]
    assert all(0 < float(r["val_loss"]) < 100 for r in rows if r["val_loss"])
    assert lines[0].startswith("step 2/5 loss ") and "val" in lines[0] and len(lines) == 2
    meta = json.loads((out / "checkpoint" / "config.json").read_text())
    assert meta["step"] == 5
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "metrics.csv", "samples"]
    samples = sorted(p.name for p in (out / "samples").iterdir())  # a sample video at every evaluation
    assert samples == ["step_0000002.gif", "step_0000004.gif"]
    assert all((out / "samples" / n).stat().st_size > 0 for n in samples)
    # resuming appends to metrics.csv without a second header
    more = make_trainer(cfg, train_config(steps=6, save_every=2, eval_every=0), out_dir=out)
    more.resume(out / "checkpoint")
    more.run(log=lambda s: None)
    text = (out / "metrics.csv").read_text().splitlines()
    assert text[0].startswith("step,loss") and sum(line.startswith("step,") for line in text) == 1
    assert [int(line.split(",")[0]) for line in text[1:]] == [1, 2, 3, 4, 5, 6]


def test_validation_loss_restores_raw_weights_and_is_deterministic():
    cfg = model_config()
    tr = make_trainer(cfg, val_dataset=digits(clip_frames(cfg), "val", 4))
    tr.train_step()
    tr.train_step()
    raw = params(tr.model)
    a, b = tr.validation_loss(), tr.validation_loss()
    assert a == b and 0 < a < 100
    assert tr.validation_loss(use_ema=False) != a
    after = params(tr.model)
    assert all(torch.equal(raw[k], after[k]) for k in raw) and tr.model.training
    assert math.isnan(make_trainer(cfg).validation_loss())  # no validation set


def test_zero_log_interval_is_rejected():
    with pytest.raises(ValueError, match=r"TrainConfig\.log_every=0: must be at least 1"):
        train_config(steps=2, log_every=0)


def test_zero_save_interval_saves_only_at_the_end(tmp_path, monkeypatch):
    tr = make_trainer(tc=train_config(steps=3, save_every=0, eval_every=0), out_dir=tmp_path / "run")
    saved = []
    monkeypatch.setattr(tr, "save", lambda path: saved.append(tr.step))
    tr.run(log=lambda s: None)
    assert saved == [3]


# --------------------------------------------------------------------------------------------
# 10. Datasets that cannot train the layout
# --------------------------------------------------------------------------------------------
def test_empty_dataset():
    with pytest.raises(ValueError, match="empty"):
        make_trainer(dataset=[])


def test_clips_too_short():
    cfg = model_config()  # needs 7 frames
    with pytest.raises(ValueError, match="training clips have 6 frames; this layout needs 7"):
        make_trainer(cfg, dataset=digits(6))


def test_text_model_needs_an_encoder():
    cfg = model_config(conditioning="text", num_classes=0, text_dim=TEXT_DIM)
    with pytest.raises(ValueError, match="text encoder"):
        Trainer(cfg, train_config(), digits(clip_frames(cfg)))


def test_rank_shares_concatenate_to_the_global_batch():
    """Sample j of a step has its own generator: two ranks' halves are the one-process batch."""
    cfg = model_config(conditioning="class", num_classes=10)
    whole = make_trainer(cfg, train_config(batch_size=4))
    items, video, draws = whole.batch(3, 0)
    halves = []
    for rank in (0, 1):
        tr = make_trainer(cfg, train_config(batch_size=4))
        tr.rank, tr.world = rank, 2
        halves.append(tr.batch(3, 0))
    assert torch.equal(torch.cat([h[1] for h in halves]), video)
    assert torch.equal(torch.cat([h[2].randn((2, 5)) for h in halves]), draws.randn((4, 5)))
    assert [h[2].choice(100) for h in halves] == [draws.choice(100)] * 2  # shared per-batch draws



def test_global_batch_must_split_evenly(monkeypatch):
    import ca2vdm.training.trainer as trainer

    monkeypatch.setattr(trainer, "_distributed", lambda: (0, 2))
    with pytest.raises(ValueError, match="divisible by the 2 processes"):
        make_trainer(model_config(), train_config(batch_size=3))


def test_ddp_two_processes_match_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo) == 1 process with the same global batch, and the
    ranks' weights stay identical."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    cfg = tmp_path / "ddp.yaml"
    cfg.write_text("""
model: {in_channels: 3, frame_size: 8, patch: 2, hidden: 32, depth: 2, heads: 2, chunk_frames: 2,
        prefix_frames: 1, max_context_frames: 3, conditioning: class, num_classes: 10}
data: {dataset: moving-digits, num_clips: 32, size: 8, digit_size: 5, val_clips: 2}
train: {steps: 4, batch_size: 4, eval_every: 0, save_every: 0, log_every: 1, autocast: "off", warmup: 1,
        lr: 0.001, caption_dropout: 0.25}
""")
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "ca2vdm.cli", "train", str(cfg), "--out-dir", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "ca2vdm.cli", "train", str(cfg), "--out-dir", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr
    assert "x 2 processes (global batch 4)" in two.stdout
    assert "2 ranks in sync: max |weight on rank r - weight on rank 0| = 0" in two.stdout
    a = load_file(str(tmp_path / "one" / "checkpoint" / "train.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoint" / "train.safetensors"))
    raw = [k for k in a if k.startswith("raw.")]
    assert raw and set(a) == set(b)
    wa = torch.cat([a[k].double().flatten() for k in raw])
    wb = torch.cat([b[k].double().flatten() for k in raw])
    assert (wa - wb).norm() / wa.norm() <= 1e-6  # float32 sums in another order: close, not bitwise
    assert (wa - wb).abs().max() <= 1e-6 * wa.abs().max()
    # the logged losses (global-batch means) agree too
    losses = lambda out: [float(line.split()[3]) for line in out.splitlines() if line.startswith("step ")]  # noqa: E731
    assert losses(one.stdout) == pytest.approx(losses(two.stdout), rel=1e-5)


def test_context_noise_reads_its_old_name():
    """train.prefix_noise was renamed context_noise (the same knob as generate's): old run configs and
    the train section of older checkpoints still read; both names at once is a contradiction."""
    import json

    from ca2vdm.assets import asset_path

    assert TrainConfig.from_dict({"prefix_noise": "0.25"}).context_noise == 0.25
    shipped = json.loads((asset_path("digits") / "config.json").read_text())["train"]
    assert "prefix_noise" in shipped and TrainConfig.from_dict(shipped).context_noise == shipped["prefix_noise"]
    with pytest.raises(ValueError, match="old name of 'context_noise'"):
        TrainConfig.from_dict({"prefix_noise": 0.1, "context_noise": 0.1})


@pytest.mark.parametrize("layout", ["prefix", "all-chunks"])
def test_every_cyclic_row_is_trained_when_the_table_is_longer_than_a_clip(layout):
    """With cyclic_length L > P_max + l a clip never fills the table, yet inference frame n uses row
    n mod L, so a sliding window meets every rotation: training must shift the rows at random
    whenever the window is full, not only when the clip fills the table."""
    from ca2vdm.training import Draws, all_chunks_loss

    model = tiny_model(dtype=torch.float32, conditioning="none", cyclic_length=11)  # P_max + l = 7
    cfg = model.config
    rows = set()
    real = model.tpe.forward
    model.tpe.forward = lambda frames, shift=0: (rows.update((n + shift) % cfg.cyclic_length for n in frames),
                                                 real(frames, shift))[1]
    video = torch.randn(2, 3, clip_frames(cfg), 8, 8)
    for s in range(40):
        draws = Draws(torch.Generator().manual_seed(s))
        with torch.no_grad():
            if layout == "prefix":
                ca2vdm_loss(model, video, None, max(prefix_choices(cfg)), draws)
            else:
                all_chunks_loss(model, video, None, draws)
    assert rows == set(range(cfg.cyclic_length))


def test_resume_restores_the_optimizer_through_its_own_state_dict(tmp_path):
    """The resumed AdamW state is the saved one: every moment and step counter, same dtype and device
    (step counters on the CPU, where AdamW keeps them unless capturable / fused)."""
    cfg, tc = model_config(), train_config(steps=4, autocast="off")
    first = make_trainer(cfg, tc)
    first.train_step()
    first.save(tmp_path / "ckpt")
    resumed = make_trainer(cfg, tc)
    resumed.resume(tmp_path / "ckpt")
    a, b = first.opt.state_dict(), resumed.opt.state_dict()
    strip = lambda groups: [{k: v for k, v in g.items() if k != "lr"} for g in groups]  # noqa: E731 (lr: set per step)
    assert strip(a["param_groups"]) == strip(b["param_groups"]) and a["state"].keys() == b["state"].keys()
    assert len(a["state"]) == len(list(first.model.parameters()))
    for i, st in a["state"].items():
        for field, v in st.items():
            w = b["state"][i][field]
            assert torch.equal(w, v) and w.dtype == v.dtype and w.device == v.device, (i, field)
        assert b["state"][i]["step"].device.type == "cpu"


def test_init_optimizer_state_leaves_existing_state_alone():
    """What a sharded save does before writing the optimizer (every parameter needs a state to be
    saved): the parameters without state get one, at learning rate 0; the others' moments and step
    counts stay as they were. Break tried: zero gradients for every parameter (the stepped one's
    moments decay by the betas and its step counts 2)."""
    from ca2vdm.training.optim import init_optimizer_state

    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([a, b], lr=0.1, weight_decay=0.01)
    a.grad = torch.full((3,), 0.5)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[a].items()}
    wa, wb = a.detach().clone(), b.detach().clone()
    init_optimizer_state(opt)
    assert all(torch.equal(opt.state[a][k], v) for k, v in before.items())
    assert b in opt.state and torch.equal(a, wa) and torch.equal(b, wb) and opt.param_groups[0]["lr"] == 0.1
