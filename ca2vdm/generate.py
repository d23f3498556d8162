"""Generation: a video of any length as a loop over a ``StreamSession``, streamed chunk by chunk.

* ``generate`` — yields each chunk (B, C, f, H, W) as soon as it exists; unbounded.
* ``generate_video`` — the whole video as one tensor.
* ``generate_clip`` — whole clips of a bidirectional model (a distillation teacher; it has no cache).
* ``write_sample_gif`` — a few sample videos side by side in one GIF (training progress).
* ``generate_to_files`` — from a checkpoint directory to mp4 / gif files (and latents), each chunk
  appended as it is denoised: what ``ca2vdm generate`` and ``ca2vdm demo`` run (``--continue``:
  a real clip first, ``load_clip``).
* ``video_to_video_files`` — streaming video-to-video from a file to a file: ``ca2vdm v2v``.

The loop itself, its modes, noise and step caching are ``stream.StreamSession``'s.
"""

import math
import sys
import time
from pathlib import Path

import torch

from .conditioning import Text, classifier_free_guidance
from .backbone import Backbone
from .stream import MODES, GenerationStats, StreamSession, batch_size_of, chunk_noise

__all__ = ["generate", "generate_video", "generate_clip", "generate_to_files", "video_to_video_files", "load_first_frames", "load_clip",
           "write_sample_gif",
           "MODES", "GenerationStats", "StreamSession", "chunk_noise"]  # the last four: stream's, re-exported


def generate(model: Backbone, num_frames: int, first_frames: torch.Tensor | None = None,
             prompt: Text | None = None, negative_prompt: Text | None = None, labels=None,
             steps: int | None = None, guidance: float = 1.0, seed: int | list[int] = 0, mode: str = "shared",
             batch: int | None = None, context_noise: float = 0.0, cache_dtype: torch.dtype | None = None,
             autocast: torch.dtype | None = None, step_cache=None, stats: GenerationStats | None = None,
             levels: list[float] | None = None, given: torch.Tensor | None = None):
    """Generate a video chunk by chunk, yielding each chunk (B, C, f, H, W) as soon as it exists.

    The first yield is the given first frames (chunk 0) when the model takes them; then ``given``
    (B, C, n * l, H, W), clean frames that continue them (a real clip), written into the context
    (``StreamSession.extend``) and yielded back as they are; every later yield is one generated
    chunk of ``chunk_frames`` frames, the last one trimmed so that the frames yielded add up to
    ``num_frames``. Unbounded: memory in ``shared`` mode does not grow.
    The last chunk is not written into the cache (nothing follows it). Every other argument is
    ``StreamSession``'s: first_frames, prompt, negative_prompt, labels, steps (default 10) or levels
    (few-step noise levels), guidance, seed (an int: sample b uses seed + b; or one per sample), mode,
    batch, context_noise, cache_dtype, autocast, step_cache (a policy spec, ``StepCacheConfig`` or
    ``StepCache``), stats.
    """
    p, l = model.config.prefix_frames, model.config.chunk_frames
    p_given = p + (0 if given is None else given.shape[2])
    if num_frames <= p_given:
        raise ValueError(f"num_frames={num_frames} must exceed the {p_given} given frame(s)")
    session = StreamSession(model, first_frames, prompt, negative_prompt, labels, steps, guidance, seed, mode,
                            batch, context_noise, cache_dtype, autocast, step_cache, stats, levels)
    n_chunks = math.ceil((num_frames - p_given) / l)
    out = []
    if p:
        out.append(session.next_chunk())
        yield out.pop()  # the generator keeps no reference to what it yields
    if given is not None:
        session.extend(given)
        yield given
    for k in range(1, n_chunks + 1):
        keep = min(l, num_frames - p_given - (k - 1) * l)
        out.append(session.next_chunk(last=k == n_chunks, frames=keep))
        yield out.pop()


def generate_video(model: Backbone, num_frames: int, **kwargs) -> torch.Tensor:
    """Run ``generate`` to the end and return the whole video (B, C, num_frames, H, W)."""
    return torch.cat(list(generate(model, num_frames, **kwargs)), dim=2)


@torch.no_grad()
def generate_clip(model: Backbone, prompt: Text | None = None, negative_prompt: Text | None = None, labels=None,
                  steps: int = 20, guidance: float = 1.0, seed: int | list[int] = 0, batch: int | None = None,
                  frames: int | None = None, autocast: torch.dtype | None = None,
                  trajectory: list | None = None) -> torch.Tensor:
    """Sample whole clips (B, C, F, H, W) from a bidirectional model (``temporal='bidirectional'``):
    every step denoises all F frames at one level, each frame seeing every other; F defaults to the
    model's ``clip_length``. Noise: one generator per (seed, sample), as chunk 0 of a stream.
    ``trajectory``: a list that receives the state before every step and, last, the clip (ODE pairs)."""
    cfg = model.config
    if cfg.temporal != "bidirectional":
        raise ValueError("generate_clip samples bidirectional models; a causal model streams with generate()")
    F = cfg.clip_length if frames is None else frames
    B = batch_size_of(None, prompt, labels, seed, batch)
    seeds = [seed + b for b in range(B)] if isinstance(seed, int) else list(seed)
    guided = guidance != 1.0
    cond = model.guided_condition(B, prompt, labels, negative_prompt) if guided else model.condition(B, prompt, labels)
    x = chunk_noise(seeds, 0, (cfg.in_channels, F, *cfg.frame_size), dtype=model.dtype, device=model.device)
    sampler = model.diffusion.sampler(steps)
    amp = torch.autocast(model.device.type, dtype=autocast) if autocast else torch.autocast(model.device.type,
                                                                                           enabled=False)
    for i, tv in enumerate(sampler.timesteps):
        if trajectory is not None:
            trajectory.append(x)
        xin = torch.cat([x, x]) if guided else x
        with amp:
            pred = model(xin, torch.full((xin.shape[0], F), tv, dtype=torch.float64, device=model.device), cond)
        pred = pred.to(model.dtype)
        if guided:
            pred = classifier_free_guidance(pred, guidance)
        x = sampler.step(x, pred, i)
    if trajectory is not None:
        trajectory.append(x)
    return x


# --------------------------------------------------------------------------------------------
# From a checkpoint to files
# --------------------------------------------------------------------------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def pixel_size(model: Backbone, autoencoder, option: str) -> tuple[int, int]:
    """The (H, W) of the pixel frames that ``autoencoder`` encodes to the model's frames; a clear error,
    naming the command-line ``option`` that brought the frames, when it cannot make the model's channels."""
    cfg = model.config
    if autoencoder.channels != cfg.in_channels:
        raise ValueError(f"this model works on {cfg.in_channels}-channel latents and its checkpoint names no "
                         f"autoencoder to encode {option} with")
    return tuple(s * autoencoder.downsample for s in cfg.frame_size)


def load_first_frames(path, model: Backbone, batch: int, autoencoder) -> torch.Tensor:
    """An image, or a video's last frames, resized to the model's frame size and encoded by
    ``autoencoder``: (batch, C, prefix_frames, H, W). An image for a model that takes several
    frames is repeated."""
    from .video import read_image, read_video

    cfg = model.config
    size = pixel_size(model, autoencoder, "--first-frame")
    p = cfg.prefix_frames
    if p == 0:
        raise ValueError("this model starts from a prompt alone (prefix_frames=0); it takes no --first-frame")
    if not Path(path).is_file():
        raise FileNotFoundError(f"first-frame file not found: {path}")
    if Path(path).suffix.lower() in IMAGE_SUFFIXES:
        frames = read_image(path, size)
    else:
        frames = read_video(path, size)
    frames = frames[:, -p:]
    if frames.shape[1] < p:
        frames = frames[:, :1].repeat(1, p, 1, 1)
    latents = autoencoder.encode(frames[None])
    return latents.expand(batch, -1, -1, -1, -1).to(model.device, model.dtype)


def load_clip(path, model: Backbone, batch: int, autoencoder, fps: float | None = None):
    """A video that a stream continues: its frames resampled to ``fps``, resized to the model's frame
    size and encoded, split into the first frames (B, C, p, H, W) (None for a model without them)
    and the whole chunks after them (B, C, n * l, H, W); a trailing partial chunk is dropped."""
    from .video import read_video

    cfg = model.config
    size = pixel_size(model, autoencoder, "--continue")
    if not Path(path).is_file():
        raise FileNotFoundError(f"video to continue not found: {path}")
    p, l = cfg.prefix_frames, cfg.chunk_frames
    clip = read_video(path, size, fps=fps)  # (3, F, h, w)
    n = (clip.shape[1] - p) // l * l
    if n < l:
        raise ValueError(f"{path}: {clip.shape[1]} frames at {fps} fps; continuing needs at least {p + l} "
                         f"({p} first + one chunk of {l})")
    latents = autoencoder.encode(clip[None, :, :p + n]).expand(batch, -1, -1, -1, -1).to(model.device, model.dtype)
    return (latents[:, :, :p] if p else None), latents[:, :, p:]


def generate_to_files(checkpoint, frames, prompts=None, label=None, negative=None, first_frame=None,
                      guidance=None, steps=None, seed=0, cache="shared", out="outputs/video.mp4", save_latents=None,
                      device="cpu", dtype="float32", extra_outputs=(), fps=8, scale=4, step_cache=None,
                      progress=True, levels=None, continue_from=None) -> dict:
    """Load a checkpoint, generate, append each chunk to the output file(s) as it completes.

    continue_from: a video file whose frames (resampled to ``fps``, resized, whole chunks after the
    first frames) start every video and enter the context (``StreamSession.extend``); ``frames``
    more frames follow them. The output holds the clip's frames as the model saw them, then the
    continuation. Without it, ``frames`` counts the given first frames too.

    prompts: a list of prompts (one video each, one batch) for a text model; label: an int for a
    class model. One file per video per output: ``name.mp4``, or ``name_0.mp4``, ``name_1.mp4``, ...
    for a batch. save_latents: also write the raw output (key ``latents``, (B, C, F, H, W), in ``dtype``)
    as safetensors. steps / levels / guidance: default the checkpoint's recommendation
    (``checkpoint.sampling_for``). Returns {"paths", "seconds", "stats", "frames", "batch",
    "step_cache", "sampling"}.
    """
    from .autoencoder import load_autoencoder
    from .checkpoint import load_checkpoint, read_config, sampling_for
    from .video import VideoWriter

    sampling = sampling_for(checkpoint, steps, levels, guidance)
    steps, levels, guidance = sampling["steps"], sampling["levels"], sampling["guidance"]
    model = load_checkpoint(checkpoint, device=device, dtype=getattr(torch, dtype))
    cfg = model.config
    autoencoder = load_autoencoder(read_config(checkpoint).get("autoencoder", "pixel"), device)
    if step_cache and cache != "shared":
        raise ValueError(f"--step-cache works inside the shared-cache loop; it cannot be used with --cache {cache}")
    if frames < cfg.prefix_frames + cfg.chunk_frames:
        raise ValueError(f"--frames {frames} is less than one chunk: this model needs at least "
                         f"{cfg.prefix_frames + cfg.chunk_frames} ({cfg.prefix_frames} given + {cfg.chunk_frames})")
    if prompts is not None and cfg.conditioning != "text":
        raise ValueError(f"this model is {cfg.conditioning}-conditioned; it takes no --prompt"
                         + (" (use --label)" if cfg.conditioning == "class" else ""))
    if label is not None and cfg.conditioning != "class":
        raise ValueError(f"this model has conditioning={cfg.conditioning!r}; it takes no --label")
    if prompts is None and label is None and cfg.conditioning == "text":
        raise ValueError("this model is text-conditioned: give --prompt or --prompts-file")
    batch = len(prompts) if prompts else 1
    if cfg.conditioning == "none":
        guidance = 1.0
    if first_frame and continue_from:
        raise ValueError("--first-frame and --continue both give the first frames; use one of them")
    first = load_first_frames(first_frame, model, batch, autoencoder) if first_frame else None
    given = None
    if continue_from:
        first, given = load_clip(continue_from, model, batch, autoencoder, fps)
        frames += cfg.prefix_frames + given.shape[2]
    if cfg.prefix_frames and first is None:
        raise ValueError(f"this model continues {cfg.prefix_frames} given frame(s): pass --first-frame or --continue")
    prompt = neg = labels = None
    if prompts is not None:
        from .text import get_text_encoder

        enc = get_text_encoder("cpu")
        prompt = Text(*enc.encode(prompts))
        if negative:
            neg = Text(*enc.encode([negative] * len(prompts)))
    elif label is not None:
        labels = torch.tensor([label])

    def per_video(path):  # one file per video: name_0.mp4, name_1.mp4, ... for a batch
        path = Path(path)
        return [path] if batch == 1 else [path.with_name(f"{path.stem}_{b}{path.suffix}") for b in range(batch)]

    groups = [per_video(o) for o in (out, *extra_outputs)]  # (outputs, videos)
    paths = [q for group in groups for q in group]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    writers = [[VideoWriter(q, fps=fps, scale=scale) for q in group] for group in groups]
    stats, latents = GenerationStats(), []
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=frames, unit="frame", desc="generating", file=sys.stderr)
        except ImportError:
            pass
    t0 = time.perf_counter()
    try:
        for chunk in generate(model, frames, first_frames=first, prompt=prompt, negative_prompt=neg, labels=labels,
                              steps=steps, levels=levels, guidance=guidance, seed=seed,
                              mode=cache, batch=batch, step_cache=step_cache or None, stats=stats, given=given):
            video = autoencoder.decode(chunk.float()).clamp(-1, 1).cpu()
            for group in writers:
                for b, w in enumerate(group):
                    w.write(video[b])
            if save_latents:
                latents.append(chunk.cpu())  # in the generation dtype
            if bar:
                bar.update(chunk.shape[2])
                bar.set_postfix(chunks=stats.chunks, fps=f"{bar.n / (time.perf_counter() - t0):.1f}")
    finally:
        if bar:
            bar.close()
        for group in writers:
            for w in group:
                w.close()
    seconds = time.perf_counter() - t0
    if save_latents:
        from safetensors.torch import save_file

        Path(save_latents).parent.mkdir(parents=True, exist_ok=True)
        save_file({"latents": torch.cat(latents, dim=2).contiguous()}, str(save_latents))
    return dict(paths=paths, seconds=seconds, stats=stats, frames=frames, batch=batch, step_cache=step_cache,
                sampling=sampling)


def video_to_video_files(checkpoint, source, prompt, strength: float, out="outputs/v2v.mp4", steps=None, levels=None,
                         guidance=None, seed=0, fps=8, scale=4, device="cpu", dtype="float32", max_frames=None,
                         progress=True) -> dict:
    """Streaming video-to-video (CausVid): read ``source`` as it plays (any length, resampled to
    ``fps``, resized and cropped to the model's frames), and re-draw it chunk by chunk under
    ``prompt``: each source chunk is noised to the level ``strength`` maps to
    (``StreamSession.start_step``) and denoised against the cache of the output so far; every
    output chunk is appended to ``out`` as soon as it exists. A model that takes given first
    frames takes the source's first frames as they are. The last, partial chunk is padded with its
    last frame and trimmed. steps / levels / guidance: default the checkpoint's recommendation.
    Returns {"path", "seconds", "frames", "stats", "sampling", "start_step"}."""
    from .autoencoder import load_autoencoder
    from .checkpoint import load_checkpoint, read_config, sampling_for
    from .text import get_text_encoder
    from .video import VideoWriter, video_chunks

    sampling = sampling_for(checkpoint, steps, levels, guidance)
    model = load_checkpoint(checkpoint, device=device, dtype=getattr(torch, dtype))
    cfg = model.config
    if cfg.conditioning != "text":
        raise ValueError(f"video-to-video is prompted: this model is {cfg.conditioning}-conditioned, not text")
    if not Path(source).is_file():
        raise FileNotFoundError(f"input video not found: {source}")
    autoencoder = load_autoencoder(read_config(checkpoint).get("autoencoder", "pixel"), device)
    size = pixel_size(model, autoencoder, "--input")
    p, l = cfg.prefix_frames, cfg.chunk_frames
    reader = video_chunks(source, 1, size, max_frames, fps)

    def take(n):  # the next n source frames, encoded: (1, C, <= n, H, W), or None at the end
        got = [f for _, f in zip(range(n), reader)]
        return autoencoder.encode(torch.cat(got, dim=1)[None]).to(model.device, model.dtype) if got else None

    first = take(p) if p else None
    nxt = take(l)
    if nxt is None or (p and first.shape[2] < p):
        raise ValueError(f"{source}: too short; video-to-video needs at least {p + 1} frames at {fps} fps")
    session = StreamSession(model, first_frames=first, prompt=Text(*get_text_encoder("cpu").encode([prompt])),
                            steps=sampling["steps"], levels=sampling["levels"], guidance=sampling["guidance"], seed=seed)
    start = session.start_step(strength)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    writer, frames, t0 = VideoWriter(out, fps=fps, scale=scale), 0, time.perf_counter()
    try:
        if p:
            writer.write(autoencoder.decode(session.next_chunk().float()).clamp(-1, 1)[0].cpu())
            frames += p
        while nxt is not None:
            cur, nxt = nxt, take(l)
            keep, cur = cur.shape[2], pad_chunk(cur, l)
            chunk = session.next_chunk(source=cur, strength=strength, last=nxt is None, frames=keep)
            writer.write(autoencoder.decode(chunk.float()).clamp(-1, 1)[0].cpu())
            frames += keep
            if progress:
                print_progress(frames, t0)
    finally:
        writer.close()
        if progress:
            print(file=sys.stderr)
    return dict(path=Path(out), seconds=time.perf_counter() - t0, frames=frames, stats=session.stats,
                sampling=sampling, start_step=start)


def pad_chunk(frames: torch.Tensor, length: int) -> torch.Tensor:
    """A clip's last, short piece (B, C, F < length, H, W) padded to a whole chunk with its last frame
    (the caller keeps only the real frames of what comes back); a whole chunk as it is."""
    short = length - frames.shape[2]
    return torch.cat([frames, frames[:, :, -1:].expand(-1, -1, short, -1, -1)], dim=2) if short > 0 else frames


def print_progress(frames: int, t0: float) -> None:
    """Frames written so far and their rate since ``t0`` (``time.perf_counter``), on one stderr line."""
    print(f"\r  {frames} frames ({frames / (time.perf_counter() - t0):.1f} frames/s)", end="", file=sys.stderr,
          flush=True)


@torch.no_grad()
def write_sample_gif(model: Backbone, items: list[dict], path, frames: int, encode=None,
                     guidance: float = 4.0, **sampling) -> Path | None:
    """Sample videos side by side in one GIF (a training run's progress picture): one video per
    conditioning item ({"caption"?, "label"?, "video"?: source of the first frames}), seeds 0, 1, ...
    ``encode(captions) -> Text`` for text models; ``sampling``: ``generate``'s steps or levels. A
    bidirectional model samples one whole clip each (``generate_clip``, ``steps`` default 20).
    Returns the path, or None for a model whose frames are not RGB pixels."""
    from .video import VideoWriter

    cfg = model.config
    if cfg.in_channels != 3 or not items:
        return None
    kw = dict(sampling, seed=list(range(len(items))), batch=len(items))
    if cfg.prefix_frames:
        kw["first_frames"] = torch.stack([it["video"][:, :cfg.prefix_frames] for it in items]).to(model.device)
    if cfg.conditioning == "text":
        kw["prompt"], kw["guidance"] = encode([it["caption"] for it in items]), guidance
    elif cfg.conditioning == "class":
        kw["labels"], kw["guidance"] = torch.tensor([it["label"] for it in items]), guidance
    if cfg.temporal == "bidirectional":  # a whole clip; its length is the model's
        steps = kw.pop("steps", None) or len(kw.pop("levels", None) or []) or 20
        kw.pop("levels", None)
        video = generate_clip(model, steps=steps, **kw)
    else:
        video = generate_video(model, max(frames, cfg.prefix_frames + cfg.chunk_frames), **kw)
    video = video.float().clamp(-1, 1).cpu()  # (n, C, F, H, W)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = VideoWriter(path, fps=8, scale=4)
    try:
        writer.write(torch.cat(list(video), dim=-1))  # the videos side by side
    finally:
        writer.close()
    return path
