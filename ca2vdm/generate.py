"""Generation: a video of any length as a loop over a ``StreamSession``, streamed chunk by chunk.

* ``generate`` — yields each chunk (B, C, f, H, W) as soon as it exists; unbounded.
* ``generate_video`` — the whole video as one tensor.
* ``write_sample_gif`` — a few sample videos side by side in one GIF (training progress).
* ``generate_to_files`` — from a checkpoint directory to mp4 / gif files (and latents), each chunk
  appended as it is denoised: what ``ca2vdm generate`` and ``ca2vdm demo`` run.

The loop itself, its modes, noise and step caching are ``stream.StreamSession``'s.
"""

import math
import sys
import time
from pathlib import Path

import torch

from .conditioning import Text
from .model import CausalVideoDiT
from .stream import MODES, GenerationStats, StreamSession, chunk_noise

__all__ = ["generate", "generate_video", "generate_to_files", "load_first_frames", "write_sample_gif",
           "MODES", "GenerationStats", "StreamSession", "chunk_noise"]  # the last four: stream's, re-exported


def generate(model: CausalVideoDiT, num_frames: int, first_frames: torch.Tensor | None = None,
             prompt: Text | None = None, negative_prompt: Text | None = None, labels=None,
             steps: int | None = None, guidance: float = 1.0, seed: int | list[int] = 0, mode: str = "shared",
             batch: int | None = None, context_noise: float = 0.0, cache_dtype: torch.dtype | None = None,
             autocast: torch.dtype | None = None, step_cache=None, stats: GenerationStats | None = None,
             levels: list[float] | None = None):
    """Generate a video chunk by chunk, yielding each chunk (B, C, f, H, W) as soon as it exists.

    The first yield is the given first frames (chunk 0) when the model takes them; every later
    yield is one generated chunk of ``chunk_frames`` frames, the last one trimmed so that the
    frames yielded add up to ``num_frames``. Unbounded: memory in ``shared`` mode does not grow.
    The last chunk is not written into the cache (nothing follows it). Every other argument is
    ``StreamSession``'s: first_frames, prompt, negative_prompt, labels, steps (default 10) or levels
    (few-step noise levels), guidance, seed (an int: sample b uses seed + b; or one per sample), mode,
    batch, context_noise, cache_dtype, autocast, step_cache (a policy spec, ``StepCacheConfig`` or
    ``StepCache``), stats.
    """
    p, l = model.config.prefix_frames, model.config.chunk_frames
    if num_frames <= p:
        raise ValueError(f"num_frames={num_frames} must exceed the {p} given first frame(s)")
    session = StreamSession(model, first_frames, prompt, negative_prompt, labels, steps, guidance, seed, mode,
                            batch, context_noise, cache_dtype, autocast, step_cache, stats, levels)
    n_chunks = math.ceil((num_frames - p) / l)
    out = []
    if p:
        out.append(session.next_chunk())
        yield out.pop()  # the generator keeps no reference to what it yields
    for k in range(1, n_chunks + 1):
        keep = min(l, num_frames - p - (k - 1) * l)
        out.append(session.next_chunk(last=k == n_chunks, frames=keep))
        yield out.pop()


def generate_video(model: CausalVideoDiT, num_frames: int, **kwargs) -> torch.Tensor:
    """Run ``generate`` to the end and return the whole video (B, C, num_frames, H, W)."""
    return torch.cat(list(generate(model, num_frames, **kwargs)), dim=2)


# --------------------------------------------------------------------------------------------
# From a checkpoint to files
# --------------------------------------------------------------------------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_first_frames(path, model: CausalVideoDiT, batch: int, autoencoder) -> torch.Tensor:
    """An image, or a video's last frames, resized to the model's frame size and encoded by
    ``autoencoder``: (batch, C, prefix_frames, H, W). An image for a model that takes several
    frames is repeated."""
    from .video import read_image, read_video

    cfg = model.config
    if autoencoder.channels != cfg.in_channels:
        raise ValueError(f"this model works on {cfg.in_channels}-channel latents and its checkpoint names no "
                         f"autoencoder to encode --first-frame with")
    size = tuple(s * autoencoder.downsample for s in cfg.frame_size)
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


def generate_to_files(checkpoint, frames, prompts=None, label=None, negative=None, first_frame=None,
                      guidance=None, steps=None, seed=0, cache="shared", out="outputs/video.mp4", save_latents=None,
                      device="cpu", dtype="float32", extra_outputs=(), fps=8, scale=4, step_cache=None,
                      progress=True, levels=None) -> dict:
    """Load a checkpoint, generate, append each chunk to the output file(s) as it completes.

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
    first = load_first_frames(first_frame, model, batch, autoencoder) if first_frame else None
    if cfg.prefix_frames and first is None:
        raise ValueError(f"this model continues {cfg.prefix_frames} given frame(s): pass --first-frame")
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
                              mode=cache, batch=batch, step_cache=step_cache or None, stats=stats):
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


@torch.no_grad()
def write_sample_gif(model: CausalVideoDiT, items: list[dict], path, frames: int, encode=None,
                     guidance: float = 4.0, **sampling) -> Path | None:
    """Sample videos side by side in one GIF (a training run's progress picture): one video per
    conditioning item ({"caption"?, "label"?, "video"?: source of the first frames}), seeds 0, 1, ...
    ``encode(captions) -> Text`` for text models; ``sampling``: ``generate``'s steps or levels.
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
    frames = max(frames, cfg.prefix_frames + cfg.chunk_frames)
    video = generate_video(model, frames, **kw).float().clamp(-1, 1).cpu()  # (n, C, F, H, W)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = VideoWriter(path, fps=8, scale=4)
    try:
        writer.write(torch.cat(list(video), dim=-1))  # the videos side by side
    finally:
        writer.close()
    return path
