"""Video file I/O with PyAV: write generated clips as they stream out, read clips for training.

Videos in memory are (C, F, H, W) float tensors in [-1, 1] (C = 3 RGB, or C = 1 grey on write).

    with VideoWriter("out.mp4", fps=8, scale=8) as w:    # 32x32 frames -> 256x256 file
        for chunk in generator:                          # chunk: (3, F, 32, 32)
            w.write(chunk)

    video = read_video("clip.mp4", size=(32, 32), max_frames=16, fps=8)  # (3, 16, 32, 32)
    image = read_image("frame.png", size=(32, 32))                       # (3, 1, 32, 32)

    with open_video("clip.mp4") as (container, stream):                  # lower level: av frames
        for k, frame in resampled_frames(container, stream, fps=8):
            ...

Writing: every `write` encodes its frames at once and muxes whatever packets come out, with the
container flushing after each packet. A .gif can be watched while it grows (each frame gets its
own adaptive 256-colour palette). An .mp4 (H.264, yuv420p) only gets its index when closed, and
the encoder holds a few frames back for lookahead, so readers may only see it fully after close().
The file is created by the first write(); a writer closed without writing leaves no file.
"""

from __future__ import annotations

import contextlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

FORMATS = (".mp4", ".gif")


class _PyAV:
    """PyAV, imported on first use, so that everything that never touches a video file (a CUDA
    check, a benchmark, training on pre-encoded latents) runs where PyAV is not installed."""

    def __getattr__(self, name):
        try:
            import av
            import av.filter  # noqa: F401  (a submodule the writer uses)
        except ImportError as e:
            raise ImportError("reading or writing video files needs PyAV: pip install av") from e
        return getattr(av, name)


av = _PyAV()


def to_uint8(frames: Tensor) -> np.ndarray:
    """(C, F, H, W) float in [-1, 1], C in {1, 3} -> (F, H, W, 3) uint8."""
    if not isinstance(frames, Tensor) or frames.ndim != 4 or frames.shape[0] not in (1, 3):
        shape = tuple(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__
        raise ValueError(f"frames must be a (C, F, H, W) tensor with C = 3 (RGB) or 1 (grey), got {shape}")
    if not frames.is_floating_point():
        raise ValueError(f"frames must be float in [-1, 1], got dtype {frames.dtype}")
    x = ((frames.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.expand(3, -1, -1, -1)  # grey -> RGB
    return x.permute(1, 2, 3, 0).contiguous().numpy()  # (F, H, W, 3)


class VideoWriter:
    """Append (C, F, H, W) chunks to an .mp4 (H.264) or .gif file; `scale` = nearest upscaling."""

    def __init__(self, path: str | Path, fps: float = 8, scale: int = 1, crf: int = 18):
        self.path = Path(path)
        self.ext = self.path.suffix.lower()
        if self.ext not in FORMATS:
            raise ValueError(f"unsupported video extension {self.path.suffix!r} for {self.path}; "
                             f"use one of {', '.join(FORMATS)}")
        if int(scale) != scale or scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale}")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps = Fraction(fps).limit_denominator(10_000)
        self.scale, self.crf = int(scale), crf
        self.size = None  # (H, W) of the frames given to write(), fixed by the first chunk
        self.frames_written = 0
        self.stream = self.graph = None
        # flush_packets: push every muxed packet to disk at once, so the file grows as we go
        self.container = av.open(str(self.path), "w", options={"flush_packets": "1"})

    def _open_stream(self, h: int, w: int):
        """Create the video stream for frames of size (h, w) (after scaling and padding)."""
        if self.ext == ".mp4":
            codec = "libx264" if "libx264" in av.codecs_available else "h264"
            self.stream = self.container.add_stream(codec, rate=self.fps, options={"crf": str(self.crf)})
            self.stream.pix_fmt = "yuv420p"
        else:  # gif: per-frame palette (palettegen/paletteuse), far better than the fixed rgb8 one
            self.stream = self.container.add_stream("gif", rate=self.fps)
            self.stream.pix_fmt = "pal8"
            g = self.graph = av.filter.Graph()
            src = g.add_buffer(width=w, height=h, format="rgb24", time_base=1 / self.fps)
            split, gen = g.add("split"), g.add("palettegen", "stats_mode=single")
            use, sink = g.add("paletteuse", "new=1"), g.add("buffersink")
            src.link_to(split)
            split.link_to(use, 0, 0)
            split.link_to(gen, 1, 0)
            gen.link_to(use, 0, 1)
            use.link_to(sink)
            g.configure()
        self.stream.width, self.stream.height = w, h
        self.stream.time_base = 1 / self.fps

    def _encode(self, frame):
        """Encode one frame (None = flush the encoder) and mux the packets that come out."""
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def _filter(self, frame):
        """GIF only: push one rgb24 frame (None = end) through the palette graph, encode outputs."""
        self.graph.push(frame)
        while True:
            try:
                out = self.graph.pull()
            except (av.error.BlockingIOError, av.error.EOFError):
                return
            self._encode(out)

    def write(self, frames: Tensor):
        """Append frames (C, F, H, W) float in [-1, 1]; they are encoded and written immediately."""
        if self.container is None:
            raise ValueError(f"VideoWriter for {self.path} is closed")
        x = to_uint8(frames)  # (F, H, W, 3)
        size = x.shape[1:3]
        if self.size is None:
            self.size = size
        elif size != self.size:
            raise ValueError(f"frame size changed from {self.size} to {size} while writing {self.path}")
        if self.scale > 1:  # nearest-neighbour upscaling, for tiny frames
            x = x.repeat(self.scale, axis=1).repeat(self.scale, axis=2)
        if self.ext == ".mp4":  # yuv420p needs even sizes: replicate the last row / column
            pad_h, pad_w = x.shape[1] % 2, x.shape[2] % 2
            if pad_h or pad_w:
                x = np.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        if self.stream is None:
            self._open_stream(x.shape[1], x.shape[2])
        for image in x:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts, frame.time_base = self.frames_written, 1 / self.fps
            self.frames_written += 1
            if self.graph is not None:
                self._filter(frame)
            else:
                self._encode(frame)

    def close(self):
        """Flush the encoder and finish the file (writes the mp4 index). Safe to call twice."""
        if self.container is None:
            return
        try:
            if self.stream is not None:
                if self.graph is not None:
                    self._filter(None)
                self._encode(None)
        finally:
            self.container.close()
            self.container = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def resize_crop(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, C, H, W) -> (N, C, h, w): resize (antialiased bilinear) to cover (h, w), then center-crop."""
    h, w = size
    H, W = x.shape[-2:]
    s = max(h / H, w / W)
    rh, rw = max(h, round(H * s)), max(w, round(W * s))
    if (rh, rw) != (H, W):
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (rh - h) // 2, (rw - w) // 2
    return x[..., top:top + h, left:left + w]


@contextlib.contextmanager
def open_video(path: str | Path):
    """Open a video (or image) file, yield (container, its first video stream), close it after.

    Raises ValueError "cannot read video {path}: ..." when the file cannot be opened, has no video
    stream, or an FFmpeg error comes up inside the with block (demuxing, decoding).
    """
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as e:
        raise ValueError(f"cannot read video {path}: {e}") from e
    try:
        if not container.streams.video:
            raise ValueError(f"cannot read video {path}: no video stream")
        yield container, container.streams.video[0]
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot read video {path}: {e}") from e
    finally:
        container.close()


def frame_period(stream) -> float:
    """Seconds per source frame of a video stream (25 fps when the file does not say)."""
    return 1 / float(stream.average_rate or stream.guessed_rate or 25)


def resampled_frames(container, stream, fps: float | None = None, stop: int | None = None):
    """Decode ``stream`` (threaded) and yield (k, av.VideoFrame) for output frames k = 0, 1, 2, ...

    fps None: every decoded frame once. fps: resample by timestamp: output frame k at time k / fps
    (from the first frame) shows the source frame on screen at that time, so frames are dropped, or
    repeated (the same object) when upsampling; the last frame lasts one source period. Frames
    without a timestamp are placed at their index times the period.
    stop: yield at most this many output frames.
    """
    stream.thread_type = "AUTO"
    period = frame_period(stream)
    start, prev, k, index = None, None, 0, 0  # k: next output frame index

    def full():
        return stop is not None and k >= stop

    for frame in container.decode(stream):
        if full():
            break
        if fps is None:
            yield k, frame
            k += 1
            continue
        t = frame.time if frame.time is not None else index * period
        index += 1
        start = t if start is None else start
        t -= start
        # the previous frame is on screen until this one: emit it for every target time before t
        while prev is not None and k / fps < t - 1e-6 and not full():
            yield k, prev
            k += 1
        prev = frame
    if fps is not None and prev is not None and not full():  # the last frame lasts one period
        t_end = (prev.time - start if prev.time is not None else (index - 1) * period) + period
        while k / fps < t_end - 1e-6 and not full():
            yield k, prev
            k += 1


def video_chunks(path: str | Path, chunk: int, size: tuple[int, int] | None = None, max_frames: int | None = None,
                 fps: float | None = None):
    """Decode a video (or image) file as it plays, yielding (C=3, f, H, W) float32 in [-1, 1] pieces
    of ``chunk`` frames (the last may be shorter): a clip of any length in bounded memory.

    size: (h, w) -> resize the shorter side (so the frame covers h x w), then center-crop.
    max_frames: stop after this many (output) frames.
    fps: resample to this frame rate by timestamp: output frame k at time k / fps shows the
         source frame on screen at that time (drops frames, or repeats them when upsampling).
    A file that cannot be read, or that holds no frame, is a ValueError "cannot read video ...".
    """
    out, any_frame = [], False  # list of (3, H, W) float
    with open_video(path) as (container, stream):
        for _, frame in resampled_frames(container, stream, fps, stop=max_frames):
            x = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)  # (3, H, W) uint8
            x = x.float().div(127.5).sub(1)[None]  # (1, 3, H, W) in [-1, 1]
            if size is not None:
                x = resize_crop(x, size).clamp(-1, 1)
            out.append(x[0])
            if len(out) == chunk:
                any_frame = True
                yield torch.stack(out, dim=1)
                out = []
    if out:
        yield torch.stack(out, dim=1)
    elif not any_frame:
        raise ValueError(f"cannot read video {path}: no frames decoded")


def read_video(path: str | Path, size: tuple[int, int] | None = None, max_frames: int | None = None,
               fps: float | None = None) -> Tensor:
    """Decode a whole video (or image) file to (C=3, F, H, W) float32 in [-1, 1] (``video_chunks``'
    size, max_frames and fps)."""
    return torch.cat(list(video_chunks(path, 1 << 30, size, max_frames, fps)), dim=1)


def read_image(path: str | Path, size: tuple[int, int] | None = None) -> Tensor:
    """Decode a png/jpg (any image PyAV can open) to (3, 1, H, W) float32 in [-1, 1]."""
    return read_video(path, size=size, max_frames=1)
