"""The engine on a second backbone: a tiny random Wan 2.1 transformer (``causal_wan.CausalWan``)
run chunk by chunk through the KV cache, against the independent sampler (``oracle.Oracle``: Wan's
block-causal full-sequence forward at every step) in float64."""

import gc
import warnings

import pytest
import torch

from ca2vdm import StreamSession
from ca2vdm.backbone import Backbone
from ca2vdm.causal_wan import CausalWan, CausalWanConfig
from ca2vdm.conditioning import Text
from ca2vdm.diffusion import FlowMatching
from ca2vdm.generate import generate_video
from ca2vdm.stream import next_chunks
from ca2vdm.wan import WanConfig

from conftest import tiny_wan
from oracle import Oracle

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT_DIM = 8
TOL = 1e-9


def wan(seed=0, window=6, chunk=2, **overrides) -> CausalWan:
    """``conftest.tiny_wan``: chunks of 2 in a window of 6 (the ring keeps 4 frames); overrides of
    ``CausalWanConfig``."""
    return tiny_wan(seed, window, chunk, causal=overrides)


def text(batch, tokens=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Text(torch.randn(batch, tokens, TEXT_DIM, generator=g, dtype=torch.float64))


def close(a, b):
    return (a - b).abs().max().item() <= TOL * max(1.0, b.abs().max().item())


def test_it_is_a_backbone_and_its_cache_holds_the_window_less_the_chunk():
    model = wan()
    assert isinstance(model, Backbone)
    cfg = model.config
    assert (cfg.chunk_frames, cfg.max_context_frames, cfg.prefix_frames, cfg.depth) == (2, 4, 0, 2)
    cache = model.new_cache(2)
    assert cache.k[0].shape == (2, 2, 4 + 2, 4, 16)  # (B, H, P_max + l, S, d)
    assert cache.nbytes == cache.formula_bytes()


@pytest.mark.parametrize("sampling", ["steps", "levels"])
def test_shared_equals_the_block_causal_oracle_with_text_guidance_and_evictions(sampling):
    """8 chunks through a ring of 4 frames (6 evictions), two videos, a prompt and a negative
    prompt at guidance 3: every chunk of the cached stream equals the independent sampler's, with
    Wan's flow schedule (shift 5) or Self-Forcing's few-step levels (x0 re-noised between levels),
    and the recompute-full mode too. Breaks tried: RoPE of the cached chunk at frame 0 instead of
    its absolute index; the write pass not committing block 1."""
    model = wan()
    kw = dict(steps=3) if sampling == "steps" else dict(levels=FlowMatching(shift=5.0).warped_levels(4))
    prompt, negative = text(2), text(2, 3, seed=2)
    shared = generate_video(model, 16, prompt=prompt, negative_prompt=negative, guidance=3.0, seed=[4, 9], **kw)
    full = generate_video(model, 16, prompt=prompt, negative_prompt=negative, guidance=3.0, seed=[4, 9],
                          mode="recompute-full", **kw)
    oracle = Oracle(model, [4, 9], model.guided_condition(2, prompt, negative=negative), guidance=3.0, **kw)
    want = torch.cat(oracle.run(8, first_chunk=1), dim=2)
    assert close(shared, want) and close(full, want)
    assert (shared[0] - shared[1]).abs().max() > 1e-3


def test_a_prompt_switch_recaches_the_window_under_the_new_prompt():
    """After 5 chunks (10 frames; the ring keeps frames 6-9) the prompt switches: the next chunks
    equal the independent sampler whose context this test cuts to the last 4 frames. Break tried:
    the re-cache's first frame shifted by 1 (its chunk boundaries move)."""
    model = wan()
    old, new = text(1), text(1, 4, seed=7)
    s = StreamSession(model, prompt=old, steps=3, seed=5)
    oracle = Oracle(model, [5], model.condition(1, old), steps=3)
    for a, b in zip([s.next_chunk() for _ in range(5)], oracle.run(5, first_chunk=1)):
        assert close(a, b)
    s.set_prompt(new)
    oracle.keep_last(4)
    oracle.cond = model.condition(1, new)
    assert oracle.start == 6
    for a, b in zip([s.next_chunk() for _ in range(3)], oracle.run(3, first_chunk=6)):
        assert close(a, b)


def test_video_to_video_enters_the_schedule_at_its_strength():
    model = wan()
    prompt, g = text(1), torch.Generator().manual_seed(3)
    source = torch.randn(1, 4, 2, 4, 4, generator=g, dtype=torch.float64)
    s = StreamSession(model, prompt=prompt, steps=4, seed=2)
    oracle = Oracle(model, [2], model.condition(1, prompt), steps=4)
    s.next_chunk(), oracle.run(1, first_chunk=1)
    got = s.next_chunk(source=source, strength=0.6)
    first = s.start_step(0.6)
    assert 0 < first < 4
    want = oracle.chunk(2, 2, source=source, first_step=first)
    assert close(got, want)


def test_a_saved_stream_continues_bit_for_bit():
    model = wan()
    s = StreamSession(model, prompt=text(1), negative_prompt=text(1, 3, seed=2), guidance=2.0, steps=3, seed=1)
    for _ in range(4):
        s.next_chunk()
    s.set_prompt(text(1, 6, seed=8))
    path = s.save(__import__("tempfile").mkdtemp() + "/wan.safetensors")
    want = torch.cat([s.next_chunk() for _ in range(3)], dim=2)
    loaded = StreamSession.load(path, wan())
    assert torch.equal(torch.cat([loaded.next_chunk() for _ in range(3)], dim=2), want)
    with pytest.raises(ValueError, match="another config"):
        StreamSession.load(path, wan(window=8))


def test_memory_is_flat_over_100_chunks():
    """The cache is preallocated and written in place: after the first chunks no tensor is added
    and none grows (counted over every live tensor)."""
    model = wan()
    s = StreamSession(model, prompt=text(1), steps=2, seed=0)

    def live_bytes():
        gc.collect()
        with warnings.catch_warnings():  # isinstance on every object touches deprecated torch aliases
            warnings.simplefilter("ignore", FutureWarning)
            return sum(o.numel() * o.element_size() for o in gc.get_objects() if torch.is_tensor(o))

    for _ in range(10):
        s.next_chunk()
    before, nbytes = live_bytes(), s.engine.nbytes
    for _ in range(90):
        s.next_chunk()
    assert live_bytes() == before and s.engine.nbytes == nbytes and s.engine.cache.frames_written == 200


def test_batched_streams_at_different_frames_give_what_each_gives_alone():
    """Four streams joined at different rounds (windows of different lengths, one past an
    eviction), other prompts, seeds, guidance scales and batch sizes, one doing video-to-video:
    ``next_chunks`` runs the guided ones as one forward (per-row RoPE, a key mask per row) and each
    equals itself run alone (float64). Breaks tried: one RoPE for every row (the first stream's
    frames); the key mask admitting the whole ring."""
    model = wan()
    specs = [dict(guidance=3.0, seed=1), dict(guidance=2.0, seed=2, batch=2), dict(guidance=4.0, seed=3),
             dict(guidance=1.0, seed=4)]
    joins, lead = [0, 1, 3, 0], [0, 3, 1, 0]  # the round each joins; chunks each ran alone before
    source = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def session(j):
        b = specs[j].get("batch", 1)
        kw = {k: v for k, v in specs[j].items() if k != "batch"}
        negative = text(b, 3, seed=20 + j) if kw["guidance"] != 1.0 else None
        return StreamSession(model, prompt=text(b, 3 + j, seed=10 + j), negative_prompt=negative, steps=3,
                             seed=[kw["seed"] + i for i in range(b)], guidance=kw["guidance"])

    def play(batched):
        sessions = [session(j) for j in range(4)]
        out = [[s.next_chunk() for _ in range(n)] for s, n in zip(sessions, lead)]  # alone first: offsets change
        for r in range(5):
            live = [j for j in range(4) if joins[j] <= r]
            srcs = [source if j == 2 else None for j in live]
            sts = [0.5 if j == 2 else None for j in live]
            got = (next_chunks([sessions[j] for j in live], srcs, sts) if batched else
                   [sessions[j].next_chunk(source=x, strength=st) for j, x, st in zip(live, srcs, sts)])
            for j, x in zip(live, got):
                out[j].append(x)
        return out

    rows = []
    hook = model.transformer.blocks[0].register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    alone = play(False)
    solo = max(rows)
    rows.clear()
    together = play(True)
    hook.remove()
    assert max(rows) > solo  # one forward held several streams' rows
    for a, b in zip(alone, together):
        assert len(a) == len(b) and all(close(x, y) for x, y in zip(b, a))


def test_what_a_wan_model_cannot_do_is_refused_with_its_reason():
    model = wan()
    with pytest.raises(ValueError, match="step caching is not available"):
        StreamSession(model, prompt=text(1), steps=2, step_cache="fixed:1")
    with pytest.raises(ValueError, match="leaves no frame of the window to slide"):
        CausalWanConfig(WanConfig(sink_frames=3, max_context_frames=6))
    with pytest.raises(ValueError, match="divisible by the patch"):
        CausalWanConfig(WanConfig(), frame_size=(5, 8))
    with pytest.raises(ValueError, match="class labels"):
        model.condition(1, labels=torch.tensor([1]))


def test_cached_steps_and_writes_stay_on_the_device():
    """On ``meta`` tensors (no host sync can pass) under the hot-path watch (no host-to-device copy):
    denoising calls and write passes through the window's evictions. Break tried: RoPE positions
    built with torch.tensor(list(frames), device=...)."""
    from test_hot_path import HostToDevice, meta

    model = wan().to("meta")
    cond = model.condition(2, Text(meta(2, 5, TEXT_DIM)))
    cache = model.new_cache(2)
    zeros = torch.zeros(2, 2, dtype=torch.float64, device="meta")
    with torch.no_grad():
        model.forward_cached(meta(2, 4, 2, 4, 4), zeros, cache, cond, write=True)  # first use: RoPE frequencies
        for _ in range(4):
            with HostToDevice() as watch:
                t = torch.full((2, 2), 500.0, dtype=torch.float64, device="meta")
                out = model.forward_cached(meta(2, 4, 2, 4, 4), t, cache, cond, x0=True)
                model.forward_cached(meta(2, 4, 2, 4, 4), zeros, cache, cond, write=True)
            assert watch.ops == [], f"host-to-device copies in the hot path: {watch.ops}"
            assert out.shape == (2, 4, 2, 4, 4)
    assert cache.frames_written == 10


def test_exported_from_both_layouts_it_loads_back_bitwise_and_generates(tmp_path):
    """``ca2vdm export --wan``: from a diffusers folder and from a causal checkpoint in Wan's own
    layout (``generator_ema`` entry, ``model.`` prefix, a .pt, its architecture from the folder's
    config.json), written as this library's checkpoint: both read back by ``load_checkpoint`` equal
    the transformer ``load_wan`` reads from the folder, bitwise, and a stream runs on them."""
    from diffusers import WanTransformer3DModel

    from ca2vdm.checkpoint import load_checkpoint, sampling_for
    from ca2vdm.cli import main
    from ca2vdm.wan_weights import load_wan
    from test_wan import original_layout

    cfg = wan().config.wan
    torch.manual_seed(3)
    ref = WanTransformer3DModel(**cfg.to_diffusers())
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp_path / "diffusers")
    torch.save({"generator_ema": {f"model.{k}": v for k, v in original_layout(ref.state_dict()).items()}},
               tmp_path / "causal.pt")
    common = ["--wan", "--frame-size", "4x4", "--chunk-frames", "2", "--window", "6", "--dtype", "float32",
              "--levels", "1,0.75,0.5"]
    for src, out, extra in ((tmp_path / "diffusers", "a", []),
                            (tmp_path / "causal.pt", "b", ["--wan-config", tmp_path / "diffusers" / "config.json"])):
        main(["export", str(src), str(tmp_path / out), *map(str, common), *map(str, extra)])  # the CLI, in-process
    want = load_wan(tmp_path / "diffusers", chunk_frames=2, max_context_frames=6, text_len=cfg.text_len)
    for out in ("a", "b"):
        got = load_checkpoint(tmp_path / out)
        assert isinstance(got, CausalWan) and got.config.frame_size == (4, 4)
        assert got.transformer.state_dict().keys() == want.state_dict().keys()
        assert all(torch.equal(got.transformer.state_dict()[k], v) for k, v in want.state_dict().items())
        assert sampling_for(tmp_path / out)["levels"] == [1.0, 0.75, 0.5]
    s = StreamSession(got, prompt=Text(torch.randn(1, 3, TEXT_DIM)), **sampling_for(tmp_path / "b"))
    assert s.next_chunk().shape == (1, 4, 2, 4, 4)
    from ca2vdm.checkpoint import export_wan
    with pytest.raises(ValueError, match="without a config"):
        export_wan(tmp_path / "causal.pt", tmp_path / "c", frame_size=(4, 4))
    assert not (tmp_path / "c").exists()


def test_all_chunks_at_once_is_what_each_cached_denoising_step_sees():
    """Self-Forcing's teacher forcing on Wan: one forward over [clean clip || noisy copies] (5 chunks
    of 2 through a ring of 4: evictions) predicts for every noisy chunk what the cached denoising
    step of that chunk computes after the clean chunks before it were written (float64); the
    training loss runs on it. Break tried: noisy copies seeing their own clean frames."""
    from ca2vdm.training.losses import all_chunks_loss

    model = wan()
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(2, 4, 10, 4, 4, generator=g, dtype=torch.float64)
    noisy = torch.randn(2, 4, 10, 4, 4, generator=g, dtype=torch.float64)
    t = (torch.rand(2, 5, generator=g, dtype=torch.float64) * 1000).repeat_interleave(2, dim=1)
    cond = model.condition(2, text(2))
    with torch.no_grad():
        together = model.forward_all_chunks(clean, noisy, t, cond)
        cache = model.new_cache(2)
        for k in range(5):
            s = slice(2 * k, 2 * k + 2)
            step = model.forward_cached(noisy[:, :, s], t[:, s], cache, cond)
            assert close(together[:, :, s], step), k
            model.forward_cached(clean[:, :, s], torch.zeros(2, 2, dtype=torch.float64), cache, cond, write=True)
    loss = all_chunks_loss(model, clean, cond, torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss) and model.transformer.blocks[0].self_attn.q.weight.grad is not None


@pytest.mark.parametrize("rollout", ["self", "diffusion-forcing"])
def test_dmd_runs_on_wan_student_teacher_and_critic(rollout):
    """CausVid / Self-Forcing distillation on the Wan backbone: the student rolls out through its
    own cache (or denoises noised clips in one causal pass), the guided teacher's real score and the
    critic's fake score run in the all-chunks layout; a few iterations change the student and the
    critic and leave the teacher as it was."""
    from ca2vdm.distill import DMD, DMDConfig, VideoDMD

    teacher, student, critic = (wan(seed).float() for seed in (0, 1, 0))
    student.train(), critic.train(), teacher.requires_grad_(False)
    items = [{"caption": f"clip {i}", "video": torch.randn(4, 6, 4, 4, generator=torch.Generator().manual_seed(i))}
             for i in range(4)]
    encode = lambda captions: Text(torch.randn(len(captions), 3, TEXT_DIM))  # noqa: E731
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in
              (("teacher", teacher), ("student", student), ("critic", critic))}
    problem = VideoDMD(student, teacher, critic, [1.0, 0.75, 0.5], frames=6, batch=2, items=lambda i: items[i],
                       pool=4, encode=encode, guidance=2.0, rollout=rollout)
    run = DMD(student, critic, problem.problem(), DMDConfig(ratio=2, generator_lr=1e-3))
    rows = [run.step() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(r["critic_loss"])) for r in rows)
    changed = lambda name, m: max((m.state_dict()[k] - v).abs().max().item() for k, v in before[name].items())  # noqa: E731
    assert changed("student", student) > 1e-5 and changed("critic", critic) > 1e-6
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in before["teacher"].items())


@pytest.mark.parametrize("layout", ["all-chunks", "prefix"])
def test_a_wan_model_trains_saves_and_resumes_through_the_trainer(tmp_path, layout):
    """``Trainer`` builds the family its config names: a tiny Wan on 8x8 moving digits (3 channels,
    text from a stand-in encoder, captions dropped to the zero prompt) takes steps in either layout,
    its checkpoint loads as a ``CausalWan`` and a resumed run continues from the saved step."""
    from ca2vdm.checkpoint import load_checkpoint
    from ca2vdm.training.trainer import Trainer
    from test_train import FakeTextEncoder, digits, train_config

    wcfg = WanConfig(num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=3, text_dim=TEXT_DIM,
                     freq_dim=16, ffn_dim=32, num_layers=1, text_len=8, chunk_frames=2, max_context_frames=6)
    cfg = CausalWanConfig(wcfg, frame_size=(8, 8))
    tc = train_config(layout=layout, steps=2)
    from ca2vdm.training.losses import clip_frames
    trainer = Trainer(cfg, tc, digits(clip_frames(cfg)), text_encoder=FakeTextEncoder(TEXT_DIM), out_dir=tmp_path)
    assert isinstance(trainer.model, CausalWan)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    assert trainer.step == 2 and any(not torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())
    saved = tmp_path / "checkpoint"
    trainer.save(saved)
    assert isinstance(load_checkpoint(saved), CausalWan)
    again = Trainer(cfg, train_config(layout=layout, steps=3), digits(clip_frames(cfg)),
                    text_encoder=FakeTextEncoder(TEXT_DIM), out_dir=tmp_path)
    again.resume(saved)
    assert again.step == 2


def test_grad_checkpointing_recomputes_each_block_and_gives_the_same_gradients():
    """Activation checkpointing on Wan (``train.grad_checkpointing``, FSDP's per-block setting): the
    all-chunks training forward with it gives the same gradients (float64) and runs each block's
    forward again in backward (2 calls instead of 1). Break tried: the flag never reaching the
    transformer (1 call)."""
    from ca2vdm.training.losses import all_chunks_loss

    grads, calls = [], []
    for on in (False, True):
        model = wan().train()
        model.grad_checkpointing = on
        n = [0]
        model.transformer.blocks[0].register_forward_pre_hook(lambda *a: n.__setitem__(0, n[0] + 1))
        clean = torch.randn(2, 4, 6, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        all_chunks_loss(model, clean, model.condition(2, text(2)), torch.Generator().manual_seed(1)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        calls.append(n[0])
    assert calls == [1, 2] and "grad-checkpointing" in wan().features
    assert close(grads[1], grads[0])
