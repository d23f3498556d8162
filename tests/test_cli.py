"""The `ca2vdm` command, invoked as a user would, on tiny checkpoints."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ca2vdm.checkpoint import save_checkpoint

from conftest import tiny_model


def ca2vdm(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ca2vdm.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory):
    """A tiny text-conditioned model that starts from a prompt alone (MiniLM token states)."""
    path = tmp_path_factory.mktemp("ckpt") / "text"
    model = tiny_model(dtype=torch.float32, prefix_frames=0, conditioning="text", text_dim=384)
    save_checkpoint(path, model, {"data": {"dataset": "moving-digits"}})
    return path


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    """A tiny text model at the moving-digits frame size (32x32, patch 8: 16 tokens per frame)."""
    path = tmp_path_factory.mktemp("ckpt") / "digits"
    model = tiny_model(dtype=torch.float32, frame_size=32, patch=8, prefix_frames=0, conditioning="text",
                       text_dim=384)
    save_checkpoint(path, model, {"data": {"dataset": "moving-digits", "max_digits": 2}})
    return path


@pytest.fixture(scope="module")
def image_checkpoint(tmp_path_factory):
    """A tiny unconditioned model that continues one given frame."""
    path = tmp_path_factory.mktemp("ckpt") / "image"
    save_checkpoint(path, tiny_model(dtype=torch.float32, prefix_frames=1))
    return path


def test_every_subcommand_has_help(capsys):
    """Every subcommand's --help exits 0 with its usage (in-process: the parser is the CLI's own;
    the subprocess tests below run the entry point itself)."""
    from ca2vdm.cli import main

    r = ca2vdm("--help")
    assert r.returncode == 0 and "usage: ca2vdm" in r.stdout, r.stderr
    for sub in ("generate", "v2v", "demo", "train", "eval", "export", "bench", "bench-step-cache", "serve", "distill",
                "distill-report", "encode", "eval-steering"):
        with pytest.raises(SystemExit) as done:
            main([sub, "--help"])
        out = capsys.readouterr().out
        assert done.value.code == 0 and f"usage: ca2vdm {sub}" in out, (sub, out)


def test_generate_streams_to_file_and_saves_latents(text_checkpoint, tmp_path):
    out, lat = tmp_path / "v.mp4", tmp_path / "lat.safetensors"
    r = ca2vdm("generate", "--checkpoint", text_checkpoint, "--frames", 9, "--prompt", "a 3 moving left",
               "--negative-prompt", "blurry", "--steps", 2, "--out", out, "--save-latents", lat)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout and "time to first chunk" in r.stdout and "frames/s" in r.stdout
    assert out.stat().st_size > 0
    latents = load_file(str(lat))["latents"]
    assert latents.shape == (1, 3, 9, 8, 8) and latents.dtype == torch.float32
    # the exact oracle, in float64, gives the same latents end to end, and stores them in float64
    lat2 = tmp_path / "lat2.safetensors"
    r = ca2vdm("generate", "--checkpoint", text_checkpoint, "--frames", 9, "--prompt", "a 3 moving left",
               "--negative-prompt", "blurry", "--steps", 2, "--out", tmp_path / "v2.gif", "--save-latents", lat2,
               "--cache", "recompute-full", "--dtype", "float64")
    assert r.returncode == 0, r.stderr
    latents64 = load_file(str(lat2))["latents"]
    assert latents64.dtype == torch.float64
    assert (latents64 - latents.double()).abs().max() < 1e-4


def test_prompts_file_makes_one_video_per_line(text_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a 1 moving up\n\na 2 moving down\n")
    r = ca2vdm("generate", "--checkpoint", text_checkpoint, "--frames", 4, "--prompts-file", prompts, "--steps", 1,
               "--out", tmp_path / "batch.gif")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "batch_0.gif").exists() and (tmp_path / "batch_1.gif").exists()


def test_first_frame_from_image_and_video(image_checkpoint, tmp_path):
    from ca2vdm.video import VideoWriter

    clip = tmp_path / "start.mp4"
    with VideoWriter(clip, fps=8) as w:
        w.write(torch.rand(3, 5, 16, 16) * 2 - 1)
    r = ca2vdm("generate", "--checkpoint", image_checkpoint, "--frames", 5, "--first-frame", clip, "--steps", 1,
               "--out", tmp_path / "cont.mp4")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "/nonexistent/ckpt", "--frames", 9, "--prompt", "x"], "checkpoint directory not found"),
    (["--frames", 1, "--prompt", "x"], "less than one chunk"),
    (["--frames", 9, "--label", 3], "takes no --label"),
    (["--frames", 9, "--prompt", "x", "--first-frame", "/nonexistent.png"], "takes no --first-frame"),
    (["--frames", 9, "--prompt", "x", "--device", "cuda"], "CUDA is not available"),
    (["--frames", 9], "give --prompt"),
])
def test_generate_errors_are_one_line(text_checkpoint, args, message):
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    if "--checkpoint" not in args:
        args = ["--checkpoint", text_checkpoint, *args]
    r = ca2vdm("generate", *args)
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_unreadable_first_frame_and_prompt_to_unconditioned_model(image_checkpoint, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    r = ca2vdm("generate", "--checkpoint", image_checkpoint, "--frames", 5, "--first-frame", bad)
    assert r.returncode != 0 and "cannot read video" in r.stderr and "Traceback" not in r.stderr
    r = ca2vdm("generate", "--checkpoint", image_checkpoint, "--frames", 5, "--prompt", "a 3")
    assert r.returncode != 0 and "takes no --prompt" in r.stderr


def test_export_writes_a_smaller_fp16_copy(text_checkpoint, tmp_path):
    r = ca2vdm("export", text_checkpoint, tmp_path / "fp16")
    assert r.returncode == 0, r.stderr
    src = (text_checkpoint / "model.safetensors").stat().st_size
    assert (tmp_path / "fp16" / "model.safetensors").stat().st_size < 0.6 * src
    assert load_file(str(tmp_path / "fp16" / "model.safetensors"))["patch_embed.weight"].dtype == torch.float16


def test_recommended_guidance_travels_with_the_checkpoint(digits_checkpoint, tmp_path):
    r = ca2vdm("export", digits_checkpoint, tmp_path / "g", "--guidance", 7.5)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "g" / "config.json").read_text())["sampling"] == {"guidance": 7.5}
    for given, used in [((), 7.5), (("--guidance", 2), 2.0)]:
        js = tmp_path / f"eval{used}.json"
        r = ca2vdm("eval", "--checkpoint", tmp_path / "g", "--videos", 1, "--frames", 4, "--steps", 1, "--no-fvd",
                   "--json", js, *given)
        assert r.returncode == 0, r.stderr
        assert json.loads(js.read_text())["settings"]["guidance"] == used
    r = ca2vdm("generate", "--checkpoint", tmp_path / "g", "--frames", 4, "--prompt", "a 3", "--guidance", -1,
               "--out", tmp_path / "v.gif")
    assert r.returncode == 1 and "guidance scale must be >= 0" in r.stderr and "Traceback" not in r.stderr


def test_train_two_steps_then_resume(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""out_dir: {tmp_path / 'run'}
model: {{in_channels: 3, frame_size: 8, patch: 2, hidden: 32, depth: 1, heads: 2, chunk_frames: 2,
         prefix_frames: 1, max_context_frames: 3, conditioning: class, num_classes: 10}}
data: {{dataset: moving-digits, num_clips: 16, size: 8, digit_size: 5, val_clips: 2}}
train: {{steps: 2, batch_size: 2, eval_every: 2, save_every: 1, log_every: 1, val_clips: 2}}
""")
    r = ca2vdm("train", cfg)
    assert r.returncode == 0, r.stderr
    assert "step 2/2" in r.stdout and (tmp_path / "run" / "checkpoint" / "model.safetensors").exists()
    r = ca2vdm("train", cfg, "--set", "train.steps=3")
    assert r.returncode == 0 and "resumed from" in r.stdout and "step 3/3" in r.stdout
    r = ca2vdm("train", cfg, "--set", "trian.steps=3")
    assert r.returncode != 0 and "unknown sections trian" in r.stderr


def test_bench_tiny_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    r = ca2vdm("bench", "--preset", "tiny", "--frames", 17, "--steps", 1, "--json", out, "--plot", png)
    assert r.returncode == 0, r.stderr
    assert png.stat().st_size > 10_000
    result = json.loads(out.read_text())
    assert set(result["modes"]) == {"shared", "recompute-window", "recompute-full", "limit"}
    for mode in result["modes"].values():
        assert {"step_seconds", "total_seconds", "cache_bytes", "peak_mem_bytes"} <= set(mode)
        assert len(mode["step_seconds"]) == 2  # (17 - 1) / 8 chunks
    assert set(result["ratios"]) == {"recompute_window_over_shared", "recompute_full_over_shared",
                                     "shared_over_limit", "shared_last_over_first_step"}
    assert result["live2diff_cache_bytes"] == result["modes"]["shared"]["cache_bytes"]  # T = 1
    assert "ratios:" in r.stdout
    r = ca2vdm("bench", "--preset", "tiny", "--frames", 5)
    assert r.returncode == 1 and "less than one chunk" in r.stderr


def test_bench_single_calls():
    """The paper preset's CPU path: one denoising forward and one write per mode, at a full window."""
    from ca2vdm.bench import benchmark

    result = benchmark("tiny", frames=81, steps=3, isolated=False, single_calls=True, log=lambda s: None)
    m = result["modes"]
    assert result["single_calls"] and all(len(r["step_seconds"]) == 1 for r in m.values())
    for r in m.values():
        c = r["call_seconds"]
        assert r["step_seconds"][0] == pytest.approx(3 * c["denoise"] + c["write"])
    assert m["shared"]["cache_bytes"] > 0 and m["recompute-full"]["call_seconds"]["write"] == 0
    assert result["ratios"]["recompute_full_over_shared"] > 0


def test_generate_with_step_cache(text_checkpoint, tmp_path):
    out, lat = tmp_path / "s.gif", tmp_path / "s.safetensors"
    r = ca2vdm("generate", "--checkpoint", text_checkpoint, "--frames", 9, "--prompt", "a 3 moving left",
               "--steps", 6, "--step-cache", "fixed:2", "--out", out, "--save-latents", lat)
    assert r.returncode == 0, r.stderr
    # 5 chunks x 6 steps x 2 guidance rows; fixed:2 computes steps 0, 3, 5 of each chunk
    assert "block stack computed on 30 of 60 denoising steps (50.0%" in r.stdout
    assert load_file(lat)["latents"].shape == (1, 3, 9, 8, 8)
    for bad, words in [(["--step-cache", "fixed:x"], "not a number"),
                       (["--step-cache", "adacache", "--cache", "recompute-full"], "shared-cache loop")]:
        r = ca2vdm("generate", "--checkpoint", text_checkpoint, "--frames", 9, "--prompt", "a 3", *bad)
        assert r.returncode == 1 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_bench_step_cache_report(digits_checkpoint, tmp_path):
    from ca2vdm.eval import STEP_CACHE_POLICIES

    js, png = tmp_path / "sc.json", tmp_path / "sc.png"
    r = ca2vdm("bench-step-cache", "--checkpoint", digits_checkpoint, "--videos", 2, "--frames", 8, "--steps", 4,
               "--policies", "fixed:1,first-block:0", "--batch", 2, "--json", js, "--plot", png)
    assert r.returncode == 0, r.stderr
    report = json.loads(js.read_text())
    runs = {x["name"]: x for x in report["runs"]}
    assert set(runs) == {"uncached", "fixed:1", "first-block:0"}
    exact = runs["first-block:0"]  # never reuses: identical to uncached (PSNR capped at 100 dB)
    assert exact["fraction_computed"] == 1.0 and exact["psnr"] == 100.0 and exact["ssim"] == 1.0
    assert runs["fixed:1"]["fraction_computed"] == 0.75  # steps 0, 2, 3 of 4
    assert len(runs["fixed:1"]["psnr_per_chunk"]) == 4 and 0 < runs["fixed:1"]["ssim"] < 1
    assert [b["steps"] for b in report["fewer_steps"]] == [3]  # the equal-compute baseline
    assert png.stat().st_size > 10_000
    assert ",".join(STEP_CACHE_POLICIES) in ca2vdm("bench-step-cache", "--help").stdout.replace("\n", "").replace(" ", "")


def test_eval_moving_digits(digits_checkpoint, tmp_path):
    js = tmp_path / "eval.json"
    r = ca2vdm("eval", "--checkpoint", digits_checkpoint, "--videos", 2, "--frames", 16, "--steps", 1, "--json", js)
    assert r.returncode == 0, r.stderr
    report = json.loads(js.read_text())
    assert report["num_videos"] == 2 and report["frames"] == 16 and len(report["acc"]) == 8  # chunks of 2
    f = report["fvd"]  # Kinetics I3D on the two 16-frame clips of each set
    assert f["clips_a"] == f["clips_b"] == 2 and f["fvd"] > 0 and len(f["per_window"]) == 1
    assert "FVD" in r.stdout and "2 generated vs 2 real 16-frame clips" in r.stdout
    assert report["overall"]["acc_gt_mean"] > 0.5  # the classifier reads the real clips
    r = ca2vdm("eval", "--checkpoint", digits_checkpoint, "--data", "kinetics")
    assert r.returncode == 2 and "invalid choice" in r.stderr and "Traceback" not in r.stderr


def test_eval_continuations_of_a_video_folder(tmp_path):
    """A model that continues a given frame, measured against the real continuation (PSNR/SSIM)."""
    from ca2vdm.video import VideoWriter

    root = tmp_path / "videos"
    root.mkdir()
    for i in range(2):
        with VideoWriter(root / f"v{i}.mp4", fps=8) as w:
            w.write(torch.linspace(-1, 1, 12).repeat_interleave(3 * 64).reshape(12, 3, 8, 8).transpose(0, 1) * (i + 1) / 2)
    (root / "captions.jsonl").write_text('{"video_fn": "v0.mp4", "prompt": "a"}\n')
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, tiny_model(dtype=torch.float32, prefix_frames=1, conditioning="text", text_dim=384),
                    {"data": {"dataset": "video-folder", "root": str(root), "size": [8, 8]}})
    js = tmp_path / "cont.json"
    r = ca2vdm("eval", "--checkpoint", ckpt, "--data", "video-folder", "--frames", 9, "--steps", 2, "--no-fvd",
               "--json", js)
    assert r.returncode == 0, r.stderr
    report = json.loads(js.read_text())
    assert len(report["videos"]) == 2 and report["captions"] == ["a", ""]
    assert len(report["psnr_per_chunk"]) == 4 and -1 <= report["ssim"] <= 1  # 8 generated frames, chunks of 2
    assert "per chunk PSNR" in r.stdout
    r = ca2vdm("eval", "--checkpoint", ckpt, "--data", "video-folder", "--root", tmp_path / "nowhere")
    assert r.returncode == 1 and "Traceback" not in r.stderr


def test_bench_unbounded_context_grows_the_cache():
    """--context unbounded: P_max covers the whole video, so the shared cache grows with it."""
    from ca2vdm.bench import benchmark, preset_config

    assert preset_config("tiny", "unbounded", frames=41).max_context_frames == 41
    sizes = []
    for frames in (17, 33):
        r = benchmark("tiny", frames=frames, steps=1, context="unbounded", isolated=False, log=lambda s: None)
        sizes.append(r["modes"]["shared"]["cache_bytes"])
    staging = preset_config("tiny").chunk_frames
    assert sizes[1] * (17 + staging) == sizes[0] * (33 + staging)  # ring slots = P_max = the video's frames
    with pytest.raises(ValueError, match="bounded"):
        preset_config("tiny", "infinite")


def test_a_student_checkpoint_samples_with_its_levels(text_checkpoint, tmp_path):
    """export --levels records few-step levels; generate then uses them (and guidance 1) unless told
    otherwise, and says so; a malformed --levels is a one-line error."""
    r = ca2vdm("export", text_checkpoint, tmp_path / "s", "--levels", "1,0.75,0.5", "--guidance", 1)
    assert r.returncode == 0, r.stderr
    sampling = json.loads((tmp_path / "s" / "config.json").read_text())["sampling"]
    assert sampling == {"guidance": 1.0, "levels": [1.0, 0.75, 0.5], "steps": 3}
    r = ca2vdm("generate", "--checkpoint", tmp_path / "s", "--frames", 4, "--prompt", "a 1", "--out",
               tmp_path / "s.gif")
    assert r.returncode == 0, r.stderr
    assert "sampling: levels 1, 0.75, 0.5, guidance 1" in r.stdout and "6 denoising forwards" in r.stdout
    r = ca2vdm("generate", "--checkpoint", tmp_path / "s", "--frames", 4, "--prompt", "a 1", "--levels", "1,x")
    assert r.returncode != 0 and "comma-separated numbers" in r.stderr


def test_bench_calls_separates_overhead_from_compute(text_checkpoint, tmp_path):
    from ca2vdm.bench import linear_fit

    assert linear_fit([1, 2, 4, 8], [5.0, 7.0, 11.0, 19.0]) == pytest.approx((3.0, 2.0))
    with pytest.raises(ValueError, match="two different"):
        linear_fit([2, 2], [1.0, 3.0])
    js = tmp_path / "calls.json"
    r = ca2vdm("bench", "--calls", "--checkpoint", text_checkpoint, "--json", js)
    assert r.returncode == 0, r.stderr
    result = json.loads(js.read_text())
    assert result["batches"] == [1, 2, 4, 8, 16] and set(result["calls"]) == {"denoise", "write"}
    for call in result["calls"].values():
        assert len(call["seconds"]) == 5 and all(s > 0 for s in call["seconds"])
    assert "overhead at B=1" in r.stdout


def test_bench_settings_times_every_setting_against_the_gemm_peak(tmp_path):
    """The settings this CPU can run well (no bf16 without native bf16, and it says so), each timed
    against the GEMM peak of its matmul dtype, and the fastest named. No wall-clock limit: the
    bench's speed is its output, not the test's condition."""
    from ca2vdm.bench import PRESETS, SETTINGS, cpu_settings, native_bf16

    js = tmp_path / "settings.json"
    names = [n for n in cpu_settings() if not SETTINGS[n].compile]  # compiling takes ~20 s (the bench checks it itself)
    r = ca2vdm("bench", "--settings", "--preset", "tiny", "--steps", 2, "--rounds", 1, "--json", js,
               *[a for n in names for a in ("--setting", n)], timeout=None)
    assert r.returncode == 0, r.stderr
    result = json.loads(js.read_text())
    assert list(result["settings"]) == names and "GEMM peak" in r.stdout
    assert result["native_bf16"] == native_bf16() and result["best"] in names and f"fastest on this CPU" in r.stdout
    assert result["best"] == min(names, key=lambda n: result["settings"][n]["step_seconds"])
    p = PRESETS["tiny"]
    tokens = p["chunk_frames"] * (p["frame_size"] // p["patch"]) ** 2
    block_linears = 2 * tokens * 16 * p["hidden"] ** 2  # qkv + proj twice, MLP 4x: 16 D^2 MACs per token
    calls = 2 + 1  # two denoising calls and the write pass
    assert calls * p["depth"] * block_linears < result["flops_per_step"] < 1.6 * calls * p["depth"] * block_linears
    for s in result["settings"].values():
        assert s["step_seconds"] > 0 and s["gemm_floor_seconds"] > 0 and 0 < s["peak_fraction"]
    dtypes = {str(SETTINGS[n].autocast or "float32").replace("torch.", "") for n in names}
    assert set(result["gemm_peak_flops"]) == dtypes and all(v > 0 for v in result["gemm_peak_flops"].values())
    if "bfloat16" in result["cache_bytes"]:
        assert result["cache_bytes"]["bfloat16"] * 2 == result["cache_bytes"]["float32"]


def test_bench_settings_skip_bf16_exactly_where_the_cpu_has_no_native_bf16(monkeypatch):
    """The decision comes from PyTorch's kernel capability and the CPU's bf16 instructions, not from
    timing: AVX2 (or AVX-512 without BF16 / AMX) keeps only the float32 settings."""
    import ca2vdm.bench as bench

    assert bench.cpu_settings(native=True) == list(bench.SETTINGS)
    assert all(bench.SETTINGS[n].autocast is None for n in bench.cpu_settings(native=False))
    assert "float32" in bench.cpu_settings(native=False) and len(bench.cpu_settings(native=False)) >= 2
    for capability, bf16, amx, want in (("AVX2", True, True, False), ("AVX512", False, False, False),
                                        ("AVX512", True, False, True), ("AVX512", False, True, True),
                                        ("DEFAULT", True, True, False)):
        monkeypatch.setattr(bench.torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        monkeypatch.setattr(bench.torch.cpu, "_is_avx512_bf16_supported", lambda b=bf16: b, raising=False)
        monkeypatch.setattr(bench.torch.cpu, "_is_amx_tile_supported", lambda a=amx: a, raising=False)
        assert bench.native_bf16() is want, (capability, bf16, amx)


def _clip(path, frames, fps, size=(24, 40)):
    from ca2vdm.video import VideoWriter

    with VideoWriter(path, fps=fps) as w:
        w.write(torch.rand(3, frames, *size) * 2 - 1)
    return path


def test_v2v_streams_a_video_of_any_size_and_rate(text_checkpoint, tmp_path):
    """20 frames of 24x40 at 12 fps, resampled to 8 fps (14 frames: the last chunk is partial),
    cropped to the model's 8x8; strength 0.5 enters a 4-step schedule mid-way."""
    from ca2vdm.video import read_video

    src, out = _clip(tmp_path / "in.mp4", 20, 12), tmp_path / "out.mp4"
    r = ca2vdm("v2v", "--checkpoint", text_checkpoint, "--input", src, "--prompt", "a 5 moving up",
               "--strength", 0.5, "--steps", 4, "--fps", 8, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "enters at step" in r.stdout and "14 frames" in r.stdout
    video = read_video(out)
    assert video.shape == (3, 14, 32, 32)  # 8x8 frames written at --scale 4


def test_v2v_bad_input_is_one_line_and_writes_nothing(text_checkpoint, tmp_path):
    bad, out = tmp_path / "bad.mp4", tmp_path / "out.mp4"
    bad.write_bytes(b"not a video")
    r = ca2vdm("v2v", "--checkpoint", text_checkpoint, "--input", bad, "--prompt", "a 5", "--strength", 0.5, "--out", out)
    assert r.returncode != 0 and "cannot read video" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
    r = ca2vdm("v2v", "--checkpoint", text_checkpoint, "--input", _clip(tmp_path / "ok.mp4", 4, 8), "--prompt", "a 5",
               "--strength", 1.5, "--out", out)
    assert r.returncode != 0 and "strength must be in (0, 1]" in r.stderr and not out.exists()


def test_continue_a_real_clip(image_checkpoint, tmp_path):
    """A model with 1 given frame and chunks of 2: a 7-frame clip gives its first frame and 3 whole
    chunks to the context; 4 frames follow; the output holds all 11."""
    from ca2vdm.video import read_video

    out = tmp_path / "cont.mp4"
    r = ca2vdm("generate", "--checkpoint", image_checkpoint, "--continue", _clip(tmp_path / "c.mp4", 7, 8, (8, 8)),
               "--frames", 4, "--steps", 1, "--out", out)
    assert r.returncode == 0, r.stderr
    assert read_video(out).shape[1] == 11
    r = ca2vdm("generate", "--checkpoint", image_checkpoint, "--continue", _clip(tmp_path / "s.mp4", 2, 8, (8, 8)),
               "--frames", 4, "--steps", 1, "--out", out)
    assert r.returncode != 0 and "continuing needs at least 3" in r.stderr


def test_eval_steering_reports_the_switch_and_the_v2v_curve(tmp_path):
    ckpt = tmp_path / "one_digit"
    save_checkpoint(ckpt, tiny_model(dtype=torch.float32, frame_size=32, patch=8, prefix_frames=0,
                                     conditioning="text", text_dim=384),
                    {"data": {"dataset": "moving-digits", "max_digits": 1}})
    out, strip = tmp_path / "steer.json", tmp_path / "strip.png"
    r = ca2vdm("eval-steering", "--checkpoint", ckpt, "--videos", 2, "--frames", 8, "--switch-at", 4, "--v2v-frames", 4,
               "--strengths", "0.5,1.0", "--steps", 2, "--json", out, "--strip", strip)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    modes = report["prompt_switch"]["modes"]
    assert set(modes) == {"recache", "no-recache", "restart"} and all(len(m["new_digit"]) == 2 for m in modes.values())  # 4 frames, chunks of 2
    rows = report["v2v"]["rows"]
    assert [r["start_step"] for r in rows] == [1, 0]  # 2 flow steps: sigma 1, then 0.001; 0.5 enters at the second
    assert strip.stat().st_size > 0
    r = ca2vdm("eval-steering", "--checkpoint", ckpt, "--videos", 2, "--frames", 8, "--switch-at", 3, "--what", "switch")
    assert r.returncode != 0 and "multiple of the chunk length" in r.stderr


def test_bench_step_cache_with_the_context_held(digits_checkpoint, tmp_path):
    js = tmp_path / "held.json"
    r = ca2vdm("bench-step-cache", "--held-context", "--checkpoint", digits_checkpoint, "--videos", 2, "--frames", 8,
               "--steps", 4, "--policies", "fixed:1,first-block:0", "--batch", 2, "--json", js)
    assert r.returncode == 0, r.stderr
    rows = {x["name"]: x for x in json.loads(js.read_text())["rows"]}
    assert set(rows) == {"fixed:1", "first-block:0", "uncached, 3 steps", "uncached, 2 steps"}
    assert rows["first-block:0"]["psnr_per_chunk"] == [100.0] * 4  # never reuses: the reference's own chunks
    assert rows["fixed:1"]["fraction_computed"] == 0.75 and min(rows["fixed:1"]["psnr_per_chunk"]) < 100
    assert rows["uncached, 2 steps"]["fraction_computed"] == 0.5


def test_bench_streams_compares_batched_streams_with_one_alone(text_checkpoint, tmp_path):
    js = tmp_path / "streams.json"
    r = ca2vdm("bench", "--streams", 3, "--checkpoint", text_checkpoint, "--json", js)
    assert r.returncode == 0, r.stderr
    report = json.loads(js.read_text())
    assert report["streams"] == 3 and report["rows_per_stream"] == 2  # the checkpoint recommends guidance 4
    assert report["denoise_calls_per_chunk"] == 20  # its default sampling: 20 steps
    assert report["frames_per_second_batched"] > 0 and report["ceiling_frames_per_second"] > 0
    assert set(report["call_seconds"]["denoise"]) == {"alone", "batched"}  # timed at 2 and 3 x 2 rows
    assert "3 streams batched" in r.stdout
