"""A bidirectional model (``temporal='bidirectional'``): the ordinary video DiT that a causal student
can be distilled from. Every frame of a clip sees every other; it has no cache and no streams."""

import pytest
import torch

from ca2vdm import ModelConfig, StreamSession
from ca2vdm.generate import generate_clip, generate_video
from ca2vdm.training import TrainConfig
from ca2vdm.training.losses import Draws, Objective, clip_frames, random_tpe_shift

from conftest import random_text, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _bi(**kw):
    base = dict(temporal="bidirectional", prefix_frames=0, conditioning="text", text_dim=16, cyclic_length=10,
                clip_length=10)
    base.update(kw)
    return tiny_model(**base)


@pytest.mark.parametrize("positions", ["cyclic", "rope"])
def test_every_frame_sees_every_frame_of_its_clip(positions):
    """Changing the last frame changes the first frame's output in a bidirectional model, and never in
    the causal one (whose first chunk cannot see later chunks)."""
    for temporal, sees_later in (("bidirectional", True), ("causal", False)):
        kw = dict(temporal="bidirectional", clip_length=10) if temporal == "bidirectional" else {}
        model = tiny_model(positions=positions, prefix_frames=0, cyclic_length=10, **kw)
        x = torch.randn(1, 3, 10, 8, 8, dtype=torch.float64)
        t = torch.full((1, 10), 500.0, dtype=torch.float64)
        y = x.clone()
        y[:, :, -1] += 1.0
        with torch.no_grad():
            first_x, first_y = model(x, t)[:, :, 0], model(y, t)[:, :, 0]
        assert ((first_x - first_y).abs().max() > 1e-6) == sees_later, temporal


def test_a_bidirectional_model_refuses_streams_and_caches():
    model = _bi()
    with pytest.raises(ValueError, match="bidirectionally over whole clips"):
        StreamSession(model, prompt=random_text(1, 4, 16))
    with pytest.raises(ValueError, match="bidirectionally over whole clips"):
        generate_video(model, 8, prompt=random_text(1, 4, 16))
    with pytest.raises(ValueError, match="bidirectionally over whole clips"):
        model.new_cache(1)
    with pytest.raises(ValueError, match="at most 10 frames"):
        model(torch.zeros(1, 3, 11, 8, 8, dtype=torch.float64), torch.zeros(1, 11, dtype=torch.float64))


@pytest.mark.parametrize("bad,message", [
    (dict(prefix_frames=1), "prefix_frames"),
    (dict(prefix_enhance=True), "prefix_enhance"),
    (dict(cyclic_length=8, clip_length=10), "cyclic_length"),
    (dict(temporal="sideways"), "temporal"),
])
def test_contradicting_configs_are_refused(bad, message):
    kw = dict(temporal="bidirectional", prefix_frames=0, max_context_frames=5, chunk_frames=2)
    kw.update(bad)
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kw)
    with pytest.raises(ValueError, match="clip_length"):
        ModelConfig(clip_length=8)  # a causal model streams: a clip length means nothing to it


def test_full_clip_training_trains_every_cyclic_row_and_layouts_must_match():
    model = _bi().float().train()
    assert clip_frames(model.config) == 10
    video = torch.randn(2, 3, 12, 8, 8)
    objective = Objective(model, "full-clip")
    loss = objective(video, Draws(torch.Generator().manual_seed(0)), text=random_text(2, 4, 16, dtype=torch.float32),
                     drop=torch.tensor([False, True]))
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[0].temporal.qkv.weight.grad.abs().sum() > 0
    shifts = {random_tpe_shift(model.config, Draws(torch.Generator().manual_seed(s))) for s in range(200)}
    assert shifts == set(range(10))  # a uniform rotation over the whole table: every row is trained
    with pytest.raises(ValueError, match="contradicts ModelConfig.temporal"):
        Objective(model, "prefix")
    with pytest.raises(ValueError, match="contradicts ModelConfig.temporal"):
        Objective(tiny_model(), "full-clip")
    assert TrainConfig(layout="full-clip").layout == "full-clip"


def test_generate_clip_samples_whole_clips():
    model = _bi(prediction="sample")
    prompt = random_text(2, 4, 16)
    a = generate_clip(model, prompt=prompt, steps=3, guidance=2.0, seed=[1, 2])
    b = generate_clip(model, prompt=prompt, steps=3, guidance=2.0, seed=[1, 2])
    assert a.shape == (2, 3, 10, 8, 8) and torch.equal(a, b)
    c = generate_clip(model, prompt=prompt, steps=3, guidance=2.0, seed=[1, 3])
    assert torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])  # noise per (seed, sample)
    with pytest.raises(ValueError, match="samples bidirectional models"):
        generate_clip(tiny_model(), steps=2)


def test_a_bidirectional_run_validates_on_whole_clips():
    from test_train import make_trainer, model_config, train_config

    cfg = model_config(conditioning="none", num_classes=0, prefix_frames=0, temporal="bidirectional", cyclic_length=10,
                       clip_length=10)
    tr = make_trainer(cfg, train_config(layout="full-clip"), val_dataset=__import__("test_train").digits(10, "val"))
    tr.train_step()
    assert torch.isfinite(torch.tensor(tr.validation_loss()))
    with pytest.raises(ValueError, match="contradicts"):
        make_trainer(cfg, train_config(layout="prefix"))


def test_the_bidirectional_config_starts_from_the_shipped_weights():
    """configs/digits_bidirectional.yaml is the shipped model's architecture with full temporal
    attention over 16 frames: its weights load as they are (the TPE table is not a weight)."""
    from pathlib import Path

    from ca2vdm.assets import asset_path
    from ca2vdm.checkpoint import load_state, load_tensors, read_config
    from ca2vdm.model import CausalVideoDiT
    from ca2vdm.training import load_run_config

    cfg = load_run_config(Path(__file__).resolve().parents[1] / "configs" / "digits_bidirectional.yaml")
    mc = ModelConfig.from_dict(cfg["model"])
    shipped = ModelConfig.from_dict(read_config(asset_path("digits"))["model"]).to_dict()
    differ = {k for k, v in mc.to_dict().items() if shipped[k] != v}
    assert differ == {"temporal", "clip_length", "cyclic_length"} and mc.clip_length == 16
    assert mc.clip_length > mc.max_context_frames + mc.chunk_frames  # a 16-frame rollout evicts
    assert cfg["train"]["layout"] == "full-clip" and cfg["train"]["init_from"] == "ca2vdm/assets/digits"
    model = CausalVideoDiT(mc)
    weights = asset_path("digits") / "model.safetensors"
    assert load_state(model, load_tensors(weights), weights) == []  # nothing missing, nothing extra


def test_the_comparison_configs_differ_only_in_teacher_and_rollout():
    """Issue 16's rows: one config each, equal in everything but the teacher (and the student it
    then needs), the rollout and the run folder; every DMD row has the same CPU-minute budget."""
    from pathlib import Path

    from ca2vdm.checkpoint import read_config
    from ca2vdm.distill import load_distill_config

    folder = Path(__file__).resolve().parents[1] / "configs" / "asymmetric"
    rows = {p.stem: load_distill_config(p) for p in sorted(folder.glob("*.yaml"))}
    assert set(rows) == {"causal_self", "causal_df", "bidir_self", "bidir_df"}
    base = rows["causal_self"]
    for name, cfg in rows.items():
        assert cfg.dmd.rollout == ("self" if name.endswith("_self") else "diffusion-forcing")
        assert ("bidirectional" in cfg.teacher) == name.startswith("bidir") and bool(cfg.student) == name.startswith("bidir")
        assert cfg.dmd.cpu_minutes == base.dmd.cpu_minutes > 0 and cfg.out_dir.endswith(name)
        for f in ("steps", "teacher_steps", "teacher_guidance", "seed", "ode_pairs", "ode_init"):
            assert getattr(cfg, f) == getattr(base, f), (name, f)
        assert {k: v for k, v in vars(cfg.dmd.dmd).items()} == vars(base.dmd.dmd)
        # the teachers are shipped in git: a fresh clone runs every row as it is
        root = Path(__file__).resolve().parents[1]
        teacher = read_config(root / cfg.teacher)["model"]
        assert teacher.get("temporal", "causal") == ("bidirectional" if name.startswith("bidir") else "causal"), name


def test_the_digits_eval_samples_a_bidirectional_model_by_whole_clips(tmp_path):
    """``eval`` measures a bidirectional teacher on its own clips (generate_clip), and refuses other lengths."""
    from ca2vdm.checkpoint import save_checkpoint
    from ca2vdm.eval import evaluate_digits
    from ca2vdm.eval.digits import held_out_clips
    from ca2vdm.metrics.digit_classifier import load_classifier
    from ca2vdm.metrics.digits import digit_report
    from ca2vdm.conditioning import Text
    from ca2vdm.text import get_text_encoder

    model = _bi(frame_size=32, patch=8, text_dim=384, dtype=torch.float32)
    path = tmp_path / "bi"
    save_checkpoint(path, model, {"data": {"dataset": "moving-digits", "max_digits": 1}})
    report = evaluate_digits(path, videos=2, frames=10, steps=2, guidance=2.0, seed=5, fvd=False, log=lambda *a: None)
    items = held_out_clips(path, model, 2, 10, 5)
    prompt = Text(*get_text_encoder("cpu").encode([it["caption"] for it in items]))
    clips = generate_clip(model, prompt, steps=2, guidance=2.0, seed=[5, 6]).float().clamp(-1, 1)
    expected = digit_report(load_classifier(), clips, [it["digits"] for it in items],
                            torch.stack([it["video"] for it in items]), chunk_frames=model.config.chunk_frames)
    assert report["frames"] == 10 and report["num_videos"] == 2
    assert report["overall"]["brightness_drift"] == pytest.approx(expected["overall"]["brightness_drift"], abs=0)
    assert report["acc"] == expected["acc"]
    with pytest.raises(ValueError, match="whole clips of 10 frames"):
        evaluate_digits(path, videos=1, frames=12, steps=2, fvd=False, log=lambda *a: None)


def test_training_samples_of_a_bidirectional_model_are_whole_clips(tmp_path):
    """A training run's sample GIF (what ``train`` writes every ``eval_every`` steps) samples clips."""
    from ca2vdm.generate import write_sample_gif
    from ca2vdm.video import read_video

    model = _bi(conditioning="none", dtype=torch.float32)
    path = write_sample_gif(model, [{}, {}], tmp_path / "s.gif", frames=4, steps=2)
    video = read_video(path)
    assert video.shape[1] == 10  # the clip's 10 frames, not the 4 asked of a causal stream
