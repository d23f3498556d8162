"""A Wan pipeline's stream to pixels: each chunk decoded as soon as it exists, by the stream's own VAE caches.

``WanStream`` pairs a ``StreamSession`` over the pipeline's causal transformer with a
``wan_vae.StreamingWanDecoder`` (and, for video-to-video and continuing a clip, a
``StreamingWanEncoder``) that belong to this stream alone: the causal convolution caches live here,
never on the VAE, so any number of streams share one pipeline. Chunk k of l latent frames becomes
1 + 4 (l - 1) pixel frames for the first chunk and 4 l for every later one::

    pipe = load_pipeline("Wan2.1-T2V-1.3B-Diffusers", "self_forcing_dmd.pt")
    stream = WanStream(pipe, pipe.encode_prompt(["a wave breaks on the beach"]))
    first = stream.next_frames()       # (1, 3, 9, 480, 832) in [-1, 1]
    stream.save("wave.safetensors")    # the session, and the VAE caches beside it: one file
    later = WanStream.load("wave.safetensors", pipe).next_frames()   # bit for bit what it would have made

``generate_files`` and ``video_to_video_files`` are ``ca2vdm generate --pipeline`` and
``ca2vdm v2v --pipeline``: chunks written to an mp4 as they are decoded.
"""

import math
import sys
import time
from pathlib import Path

import torch

from .conditioning import Text
from .generate import pad_chunk, print_progress
from .stream import GenerationStats, StreamSession, read_stream
from .wan_vae import StreamingWanDecoder, StreamingWanEncoder

CACHE_KINDS = {"tensor": "t", "none": "-", "Rep": "r"}  # what a VAE cache slot holds, as saved


class WanStream:
    """One Wan video (batch B) streamed to pixels. ``session``: the latent stream (built from the
    prompt and the pipeline's sampling, each overridable); ``decoder`` / ``encoder``: this stream's VAE caches."""

    def __init__(self, pipe, prompt: Text | None = None, negative_prompt: Text | None = None, seed=0,
                 steps: int | None = None, levels=None, guidance: float | None = None, stats=None,
                 session: StreamSession | None = None):
        self.pipe = pipe
        if session is None:
            s = dict(pipe.sampling)
            if steps is not None or levels is not None:
                s.update(steps=steps, levels=levels)
            if guidance is not None:
                s["guidance"] = guidance
            session = StreamSession(pipe.model, prompt=prompt, negative_prompt=negative_prompt, seed=seed,
                                    stats=stats, **s)
        self.session = session
        self.decoder = StreamingWanDecoder(pipe.vae)
        self.encoder = StreamingWanEncoder(pipe.vae)

    @property
    def stats(self) -> GenerationStats:
        return self.session.stats

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latent frames (B, C, f, h, w), the next of this stream, -> pixel frames (B, 3, F, H, W) float32."""
        return self.decoder.decode(latents).float()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixel frames (B, 3, F, H, W) in [-1, 1], the next of this stream's source, -> the latent
        frames of the groups (1, then 4 each) they complete, in the transformer's dtype (B, C, f, h, w)."""
        model = self.pipe.model
        return self.encoder.encode(pixels).to(model.device, model.dtype)

    def next_frames(self, last: bool = False, latent_frames: int | None = None, source: torch.Tensor | None = None,
                    strength: float | None = None) -> torch.Tensor:
        """The next chunk, generated then decoded: (B, 3, F, H, W) in [-1, 1]. last / latent_frames:
        ``StreamSession.next_chunk``'s ``last`` / ``frames`` (a trimmed last chunk). source, strength:
        video-to-video with a latent source chunk (B, C, l, h, w) (``encode``)."""
        z = self.session.next_chunk(last=last, frames=latent_frames, source=source, strength=strength)
        return self.decode(z)  # (B, C, f, h, w) -> (B, 3, F, H, W)

    def set_prompt(self, prompt: Text, **kwargs) -> None:
        """Switch the prompt between chunks (``StreamSession.set_prompt``: the window re-cached). The VAE
        caches go on: the decoder continues the same video."""
        self.session.set_prompt(prompt, **kwargs)

    def extend(self, pixels: torch.Tensor) -> torch.Tensor:
        """Continue a real clip: its pixel frames (B, 3, F, H, W), F = 1 + 4 (n - 1) with n a multiple of
        the chunk, are encoded and written into the context; returns them as the model saw them
        (decoded again, which also primes the decoder's caches for what follows)."""
        l, n = self.session.model.config.chunk_frames, self.pipe.latent_frames(pixels.shape[2])
        if self.session.chunk > 1 or self.decoder.calls:
            raise ValueError("a clip to continue starts the stream: this one has already made frames")
        if self.encoder.calls or pixels.shape[2] != self.pipe.pixel_frames(n) or n % l:
            raise ValueError(f"a clip to continue starts the stream and has 1 + 4 (n - 1) frames with n a multiple "
                             f"of {l} (e.g. {self.pipe.pixel_frames(l)}), got {pixels.shape[2]}")
        z = self.encode(pixels)
        self.session.extend(z)
        return self.decode(z)

    # -- saving ------------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """The session and both VAE caches (and the encoder's pending frames) in one safetensors file,
        atomically (``StreamSession.save``); ``WanStream.load`` continues it bit for bit."""
        tensors, meta = {}, {"kind": "wan-pipeline", "folder": str(self.pipe.folder)}
        for name, part in (("decoder", self.decoder), ("encoder", self.encoder)):
            kinds = []
            for i, c in enumerate(part.cache):
                if isinstance(c, torch.Tensor):
                    tensors[f"{name}.{i}"] = c
                    kinds.append(CACHE_KINDS["tensor"])
                elif c is None:
                    kinds.append(CACHE_KINDS["none"])
                elif c == "Rep":  # diffusers' marker: the first frame was repeated (upsampling's first call)
                    kinds.append(CACHE_KINDS["Rep"])
                else:
                    raise TypeError(f"the VAE's {name} cache holds a {type(c).__name__}; cannot save it")
            meta[name] = {"calls": part.calls, "cache": "".join(kinds)}
        if self.encoder.pending is not None:
            tensors["encoder.pending"] = self.encoder.pending
        return self.session.save(path, tensors, meta)

    @classmethod
    def load(cls, path, pipe) -> "WanStream":
        """A stream written by ``save`` over ``pipe`` (the same transformer config, dtype and VAE)."""
        session = StreamSession.load(path, pipe.model)
        tensors, meta = read_stream(path)
        extra = meta.get("extra") or {}
        if extra.get("kind") != "wan-pipeline":
            raise ValueError(f"{path}: a saved stream, but not a Wan pipeline's (no VAE caches): load it with "
                             f"StreamSession.load")
        stream = cls(pipe, session=session)
        dev = next(pipe.vae.parameters()).device
        for name, part in (("decoder", stream.decoder), ("encoder", stream.encoder)):
            kinds = extra[name]["cache"]
            if len(kinds) != len(part.cache):
                raise ValueError(f"{path}: the saved {name} cache has {len(kinds)} slots, this VAE's {len(part.cache)}")
            for i, k in enumerate(kinds):
                part.cache[i] = (tensors[f"extra.{name}.{i}"].to(dev) if k == CACHE_KINDS["tensor"]
                                 else "Rep" if k == CACHE_KINDS["Rep"] else None)
            part.calls = extra[name]["calls"]
        if "extra.encoder.pending" in tensors:
            stream.encoder.pending = tensors["extra.encoder.pending"].to(dev)
        return stream


# -- the commands --------------------------------------------------------------------------------
def _writer(out, pipe, scale: int):
    from .video import VideoWriter

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return VideoWriter(out, fps=pipe.fps, scale=scale)


def _timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def generate_files(pipe, prompt: str, frames: int, out="outputs/video.mp4", negative: str | None = None, seed=0,
                   steps=None, levels=None, guidance=None, continue_from=None, save_stream=None, resume=None,
                   scale: int = 1, progress: bool = True) -> dict:
    """Generate ``frames`` pixel frames with a loaded pipeline and write them to ``out`` chunk by chunk,
    each chunk decoded as soon as it is denoised (Wan rounds a length up to 1 + 4 k frames; later
    latent frames make 4 each). continue_from: a video whose first 1 + 4 (n - 1) frames (n whole
    chunks; resampled to the pipeline's fps, resized and cropped) start the output and the context,
    then ``frames`` more follow. save_stream: write the stream here at the end (its last chunk
    written into the context, so it can go on); resume: a stream saved so, continued for ``frames``
    more (then prompt, seed and sampling are the saved stream's). Returns {"path", "frames",
    "latent_frames", "seconds", "first_frame_seconds", "decode_seconds", "stats", "sampling"}."""
    model, l = pipe.model, pipe.model.config.chunk_frames
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    t0 = time.perf_counter()
    given = None
    if resume is not None:
        if continue_from is not None:
            raise ValueError("--resume continues a saved stream; --continue starts one from a clip: use one")
        stream = WanStream.load(resume, pipe)
        n = math.ceil(frames / pipe.temporal_ratio)  # every later latent frame makes 4
    else:
        text = pipe.encode_prompt([prompt])
        neg = pipe.encode_prompt([negative]) if negative else None
        stream = WanStream(pipe, text, neg, seed, steps, levels, guidance)
        if continue_from is not None:
            given = _read_clip(continue_from, pipe, l)
            n = math.ceil(frames / pipe.temporal_ratio)
        else:
            n = pipe.latent_frames(frames)
    s = stream.session
    n_chunks = math.ceil(n / l)
    if save_stream is not None and n % l:  # before any work: the stream could not be saved at the end
        raise ValueError(f"a saved stream continues after whole chunks: ask for a length of whole chunks "
                         f"of {l} latent frames (e.g. {pipe.pixel_frames(l) if resume is None else 4 * l} frames)")
    writer = _writer(out, pipe, scale)
    written, decode_s, first = 0, 0.0, None
    try:
        if given is not None:
            video = stream.extend(given)
            writer.write(video[0])
            written += video.shape[2]
        for k in range(n_chunks):
            keep = min(l, n - k * l)
            last = k == n_chunks - 1 and save_stream is None
            z = s.next_chunk(last=last, frames=keep if last else None)
            video, dt = _timed(stream.decode, z[:, :, :keep])
            decode_s += dt
            writer.write(video[0])
            written += video.shape[2]
            if first is None:
                first = time.perf_counter() - t0
            if progress:
                print_progress(written, t0)
    finally:
        writer.close()
        if progress:
            print(file=sys.stderr)
    if save_stream is not None:
        stream.save(save_stream)
    return dict(path=Path(out), frames=written, latent_frames=n, seconds=time.perf_counter() - t0,
                first_frame_seconds=first, decode_seconds=decode_s, stats=s.stats,
                sampling={"steps": None if s.sampler.predicts_x0 else len(s.sampler),
                          "levels": getattr(s.sampler, "levels", None), "guidance": s.guidance})


def _read_clip(path, pipe, l: int) -> torch.Tensor:
    """The first 1 + 4 (n - 1) frames of a video, n the most whole chunks it has: (1, 3, F, H, W)."""
    from .video import read_video

    if not Path(path).is_file():
        raise FileNotFoundError(f"video to continue not found: {path}")
    clip = read_video(path, pipe.size, fps=pipe.fps)  # (3, F, H, W)
    n = (1 + (clip.shape[1] - 1) // pipe.temporal_ratio) // l * l
    if n < l:
        raise ValueError(f"{path}: {clip.shape[1]} frames at {pipe.fps:g} fps; continuing needs at least "
                         f"{pipe.pixel_frames(l)} (one chunk of {l} latent frames)")
    return clip[None, :, :pipe.pixel_frames(n)]


def video_to_video_files(pipe, source, prompt: str, strength: float, out="outputs/v2v.mp4", seed=0, steps=None,
                         levels=None, guidance=None, max_frames=None, scale: int = 1, progress: bool = True) -> dict:
    """Streaming video-to-video with a loaded pipeline: ``source`` read as it plays (resampled to the
    pipeline's fps, resized and cropped), each group of pixel frames encoded by this stream's VAE
    encoder (1 then 4 per latent frame), each latent chunk noised to ``strength``'s level and
    denoised against the output so far, decoded and written at once. Pixel frames after the last
    whole group are dropped; a last partial chunk is padded with its last latent frame and trimmed.
    Returns {"path", "frames", "seconds", "first_frame_seconds", "stats", "start_step"}."""
    from .video import video_chunks

    if not Path(source).is_file():
        raise FileNotFoundError(f"input video not found: {source}")
    l, r = pipe.model.config.chunk_frames, pipe.temporal_ratio
    t0 = time.perf_counter()
    stream = WanStream(pipe, pipe.encode_prompt([prompt]), None, seed, steps, levels, guidance)
    start = stream.session.start_step(strength)
    reader = video_chunks(source, 1, pipe.size, max_frames, pipe.fps)

    def take(n):  # the next n pixel frames, encoded: (1, C, <= latent, h, w), or None at the end
        got = [f for _, f in zip(range(n), reader)]
        z = stream.encode(torch.cat(got, dim=1)[None]) if got else None
        return z if z is not None and z.shape[2] else None

    nxt = take(1 + r * (l - 1))
    if nxt is None:
        raise ValueError(f"{source}: no frames to re-draw")
    writer = _writer(out, pipe, scale)
    written, first = 0, None
    try:
        while nxt is not None:
            cur, nxt = nxt, take(r * l)
            keep, cur = cur.shape[2], pad_chunk(cur, l)  # the clip's end: only the real latent frames kept
            video = stream.next_frames(last=nxt is None, latent_frames=keep, source=cur, strength=strength)
            writer.write(video[0])
            written += video.shape[2]
            first = first or time.perf_counter() - t0
            if progress:
                print_progress(written, t0)
    finally:
        writer.close()
        if progress:
            print(file=sys.stderr)
    return dict(path=Path(out), frames=written, seconds=time.perf_counter() - t0, first_frame_seconds=first,
                stats=stream.stats, start_step=start)
