"""Real-video datasets read from folders: video files (``VideoFolder``) or frame images (``FrameFolder``).

    ds = VideoFolder("../shared/data/beach", frames=16, size=(32, 32), fps=8, clips_per_video=100)
    item = ds[0]  # video (3, 16, 32, 32) float32 in [-1, 1], caption, label 0, path

    sky = FrameFolder("sky_timelapse/", frames=16, size=(64, 64), stride=2)  # root/<class>/<video>/*.jpg

Both datasets hold the same items as ``MovingDigits`` (``video`` (C, F, H, W) float32 in [-1, 1],
``caption`` str, ``label`` int) plus ``path``, the source file or frame directory.

Construction probes every source and SKIPS (with a logged warning on the ``ca2vdm.data`` logger and
an entry in ``self.skipped``) files that are unreadable or too short for ``frames`` frames at
``stride``; if nothing usable is left it raises ValueError, so a bad data path fails before
training starts, not hours into it.

Item i is a pure function of (seed, epoch, i) (``set_epoch`` changes the epoch, 0 by default): it
shows video ``i % num_videos``, starting at a random offset. ``clips_per_video`` multiplies the
length, so random-index samplers see that many different clips of each video. A source that turns
unreadable after probing (deleted, truncated) is logged, marked bad and replaced by the next good
video in order, so one broken file cannot end an epoch.

Frames are decoded and resized exactly as ``ca2vdm.video.read_video`` does (same numbers), but only
the frames a clip needs are converted to tensors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..video import frame_period, open_video, read_image, resampled_frames, resize_crop

logger = logging.getLogger("ca2vdm.data")

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
CACHE_MAX_FILES = 64  # cache="auto" caches decoded clips for folders with fewer sources than this
CACHE_MAX_BYTES = 2 << 30  # stop caching once the cached tensors would pass 2 GiB


# --------------------------------------------------------------------------------------------
# Decoding and probing
# --------------------------------------------------------------------------------------------
def _frame_tensor(frame, size) -> Tensor:
    """One av.VideoFrame -> (3, H, W) float32 in [-1, 1], the same numbers as read_video."""
    x = torch.from_numpy(frame.to_ndarray(format="rgb24")).float()  # (H, W, 3); converting before
    x = x.permute(2, 0, 1).contiguous().div_(127.5).sub_(1)[None]  # permuting is faster, same values
    if size is not None:
        x = resize_crop(x, size).clamp(-1, 1)
    return x[0]


@contextlib.contextmanager
def _one_torch_thread():
    """Convert frames with one intra-op thread: per-frame ops on one image gain nothing from a thread
    pool and lose a lot on a busy machine (beach clips, 2 busy cores: 14.7 s to cache -> 2.8 s).
    The previous setting is restored; don't run torch work in other threads meanwhile."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def _resampled_count(duration: float, fps: float) -> int:
    """How many output frames k (at times k / fps) resampled_frames emits before ``duration``."""
    limit = duration - 1e-6
    k = max(0, math.floor(limit * fps) - 1)
    while k / fps < limit:  # the same float test as resampled_frames, so the counts agree exactly
        k += 1
    return k


def decode_clip(path: str | Path, size: tuple[int, int] | None = None, fps: float | None = None,
                indices=None) -> tuple[Tensor | None, int]:
    """Decode output frames ``indices`` (after resampling to ``fps``) of a video -> (clip, count).

    clip: (3, len(indices), H, W) float32 in [-1, 1], equal to ``read_video(path, size, fps=fps)[:,
    indices]``; frames the clip does not use are decoded but never converted. ``indices=None``
    returns every frame; ``indices=()`` only counts (clip None). count: the output frames seen,
    the real total when decoding reached the end (it stops after the last index asked for).
    If the video ends before an index, the clip holds fewer frames (or is None): compare with
    len(indices).
    Raises ValueError "cannot read video ..." for unreadable files.
    """
    with _one_torch_thread():
        return _decode_clip(path, size, fps, indices)


def _decode_clip(path, size, fps, indices) -> tuple[Tensor | None, int]:
    wanted = None if indices is None else sorted({int(k) for k in indices})
    stop = None if not wanted else wanted[-1] + 1
    keep = {} if wanted is None else dict.fromkeys(wanted)
    count, last = 0, None  # output frames seen; (frame, tensor) of the last conversion
    with open_video(path) as (container, stream):
        for k, frame in resampled_frames(container, stream, fps, stop):
            count = k + 1
            if indices is None or k in keep:
                if last is None or last[0] is not frame:  # repeated frames (upsampling) convert once
                    last = (frame, _frame_tensor(frame, size))
                keep[k] = last[1]
    if count == 0:
        raise ValueError(f"cannot read video {path}: no frames decoded")
    if indices is not None and not wanted:
        return None, count
    if indices is None:
        return torch.stack([keep[k] for k in range(count)], dim=1), count
    if any(keep[k] is None for k in wanted):  # the video ended first: the frames it has, sorted
        got = [keep[k] for k in wanted if keep[k] is not None]
        return (torch.stack(got, dim=1) if got else None), count
    return torch.stack([keep[int(k)] for k in indices], dim=1), count  # the caller's order


def probe_video(path: str | Path, fps: float | None = None) -> int:
    """Frame count of a video after resampling to ``fps``, from packet timestamps (no full decode).

    Decodes only the first frame, to check the stream is decodable. Agrees with read_video for
    ordinary files; a file whose decoder drops packets can yield fewer frames, which the
    datasets notice (and correct) when they read it. Raises ValueError "cannot read video ...".
    """
    with open_video(path) as (container, stream):
        period = frame_period(stream)
        n, pts, decoded = 0, [], False
        for packet in container.demux(stream):
            if not decoded:  # decode until the first frame comes out (includes the flush packet)
                decoded = bool(stream.decode(packet))
            if packet.size == 0:  # the demuxer's final flush packet
                continue
            n += 1
            if packet.pts is not None:
                pts.append(packet.pts)
    if not decoded or n == 0:
        raise ValueError(f"cannot read video {path}: no frames decoded")
    if fps is None:
        return n
    if len(pts) == n:  # presentation span of the frames, + the last frame's period
        tb = stream.time_base
        duration = max(float(p * tb) for p in pts) - min(float(p * tb) for p in pts) + period
    else:
        duration = n * period
    return _resampled_count(duration, fps)


def _read_frame(path: Path, size) -> Tensor:
    """One image -> (3, H, W) float32 in [-1, 1] (read_image, one torch thread)."""
    with _one_torch_thread():
        return read_image(path, size)[:, 0]


def _natural_key(name: str):
    """'f2.jpg' < 'f10.jpg': digit runs compare as numbers (zero-padded names sort as usual)."""
    return [(0, int(t), t) if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------
@dataclass
class Source:
    """One usable video: where it is, its frame count and what an item says about it."""

    path: Path
    name: str  # path relative to the dataset root
    count: int  # frames (after fps resampling for video files)
    caption: str
    label: int = 0
    frames: list = field(default_factory=list)  # FrameFolder: the image files, in order
    clip: Tensor | None = None  # cached (3, count, H, W) when caching


class _ClipFolder(torch.utils.data.Dataset):
    """Shared logic: skip bookkeeping, random clips per (seed, epoch, i), fallback on bad sources."""

    kind = "videos"

    def __init__(self, root, frames: int, size, stride: int, seed: int, clips_per_video: int):
        self.root = Path(root)
        if isinstance(size, int):
            size = (size, size)
        self.size = (int(size[0]), int(size[1]))
        if frames < 1 or stride < 1 or clips_per_video < 1 or min(self.size) < 1:
            raise ValueError(f"need frames, stride, clips_per_video and size >= 1, got frames={frames}, "
                             f"stride={stride}, clips_per_video={clips_per_video}, size={size}")
        if not self.root.is_dir():
            raise ValueError(f"no usable videos in {self.root}: not a directory")
        self.frames, self.stride, self.seed, self.clips_per_video = int(frames), int(stride), seed, int(clips_per_video)
        self.span = (self.frames - 1) * self.stride + 1  # source frames one clip covers
        self.videos: list[Source] = []
        self.skipped: list[tuple[str, str]] = []  # (name, reason), at construction and later
        self.bad: set[int] = set()  # indices into self.videos found unreadable after probing
        self.epoch = 0
        self._cached_bytes = 0

    # -- construction helpers ---------------------------------------------------------------
    def _skip(self, name: str, reason: str):
        self.skipped.append((name, reason))
        logger.warning("%s: skipping %s: %s", self.root, name, reason)

    def _too_short(self, count: int, unit: str = "frames") -> str:
        return (f"too short: {count} {unit}, a clip needs {self.span} "
                f"(frames={self.frames}, stride={self.stride})")

    def _cache(self, source: Source, clip: Tensor):
        nbytes = clip.numel() * clip.element_size()
        if self._cached_bytes + nbytes <= CACHE_MAX_BYTES:
            source.clip = clip.contiguous()
            self._cached_bytes += nbytes
        elif self._cached_bytes <= CACHE_MAX_BYTES:  # log once, then read the rest from disk
            logger.info("%s: cache full (%d MiB); reading %s and later sources from disk",
                        self.root, self._cached_bytes >> 20, source.name)
            self._cached_bytes = CACHE_MAX_BYTES + 1

    def _finish(self, found: int):
        if not self.videos:
            if not self.skipped:
                detail = f"no {self.kind} found"
            else:
                shown = "; ".join(f"{n}: {r}" for n, r in self.skipped[:10])
                more = f"; ... and {len(self.skipped) - 10} more" if len(self.skipped) > 10 else ""
                detail = f"all {len(self.skipped)} skipped: {shown}{more}"
            raise ValueError(f"no usable videos in {self.root} ({detail})")
        logger.info("%s: %d usable %s of %d found, %d skipped", self.root, len(self.videos), self.kind,
                    found, len(self.skipped))

    # -- items ------------------------------------------------------------------------------
    def set_epoch(self, epoch: int):
        """Draw different clip offsets: item i depends on (seed, epoch, i)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.videos) * self.clips_per_video

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"item {i} out of range for {n} items")
        u = np.random.default_rng([self.seed, self.epoch, i]).random()  # offset, as a fraction
        first = i % len(self.videos)
        for step in range(len(self.videos)):  # the video itself, else the next good one in order
            v = (first + step) % len(self.videos)
            if v in self.bad:
                continue
            source = self.videos[v]
            try:
                clip = self._clip(source, u)
            except ValueError as e:
                self.bad.add(v)
                self._skip(source.name, f"unreadable after probing: {e}")
                continue
            return {"video": clip, "caption": source.caption, "label": source.label, "path": str(source.path)}
        raise RuntimeError(f"every video in {self.root} became unreadable: "
                           + ", ".join(self.videos[v].name for v in sorted(self.bad)))

    def opening(self, v: int) -> dict:
        """The clip that starts at the first frame of video ``v`` (for evaluating continuations)."""
        source = self.videos[v]
        return {"video": self._clip(source, 0.0), "caption": source.caption, "label": source.label,
                "path": str(source.path)}

    def _clip(self, source: Source, u: float) -> Tensor:
        """(3, frames, H, W) of ``source`` at offset fraction u; ValueError if it cannot be read."""
        while source.count >= self.span:
            offset = min(int(u * (source.count - self.span + 1)), source.count - self.span)
            index = offset + self.stride * np.arange(self.frames)
            if source.clip is not None:
                return source.clip[:, index].contiguous()
            count = source.count
            clip = self._read(source, index)  # None: it corrected source.count downwards, retry
            if clip is not None:
                return clip.contiguous()
            if source.count >= count:
                raise ValueError(f"{source.name}: fewer frames than probed")
        raise ValueError(self._too_short(source.count))

    def _read(self, source: Source, index: np.ndarray) -> Tensor | None:
        """Frames ``index`` of an uncached source; None after correcting ``source.count``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.root)!r}, {len(self.videos)} {self.kind}, "
                f"{len(self.skipped)} skipped, frames={self.frames}, stride={self.stride}, size={self.size})")


class VideoFolder(_ClipFolder):
    """Clips of the video files under ``root`` (recursive, sorted): mp4, avi, mov, mkv, webm, gif.

    frames, stride: a clip is ``frames`` frames ``stride`` apart (after resampling to ``fps``, when
        given), at a random offset; videos with fewer than (frames - 1) * stride + 1 are skipped.
    size: (h, w) (or an int): resize the shorter side, center-crop.
    captions: a JSON-lines file in root (or a path), one {"video_fn": ..., "prompt": ...} per line;
        video_fn is matched against the path relative to root, then the file name. Other keys (the
        ``length`` hint) are ignored: frame counts always come from the file itself. A missing
        default file means no captions; videos without one get ``default_caption``.
    cache: keep every decoded, resized video in memory (exact frame counts; items never touch the
        disk again). None: only for folders with fewer than 64 files (``CACHE_MAX_FILES``).
    probe: without cache, how to count frames: "packets" (timestamps, no decoding: fast) or
        "decode" (decode every frame, without converting it: exact for any file).
    """

    def __init__(self, root, frames: int, size=(32, 32), fps: float | None = None, stride: int = 1,
                 captions: str | Path | None = "captions.jsonl", seed: int = 0, default_caption: str = "",
                 clips_per_video: int = 1, cache: bool | None = None, probe: str = "packets",
                 extensions=VIDEO_EXTENSIONS):
        super().__init__(root, frames, size, stride, seed, clips_per_video)
        if fps is not None and fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if probe not in ("packets", "decode"):
            raise ValueError(f"probe must be 'packets' or 'decode', got {probe!r}")
        self.fps, self.default_caption, self.probe = fps, default_caption, probe
        exts = tuple(e.lower() for e in extensions)
        files = sorted((p for p in self.root.rglob("*") if p.suffix.lower() in exts and p.is_file()),
                       key=lambda p: p.relative_to(self.root).as_posix())
        self.cache = len(files) < CACHE_MAX_FILES if cache is None else bool(cache)
        prompts = self._load_captions(captions, files)
        for path in files:
            name = path.relative_to(self.root).as_posix()
            try:
                if self.cache:
                    clip, count = decode_clip(path, self.size, fps)
                elif probe == "decode":
                    clip, count = decode_clip(path, None, fps, indices=())
                else:
                    clip, count = None, probe_video(path, fps)
            except ValueError as e:
                self._skip(name, str(e))
                continue
            if count < self.span:
                self._skip(name, self._too_short(count, "frames" if fps is None else f"frames at {fps} fps"))
                continue
            entry = prompts.get(name) or prompts.get(path.name) or {}
            caption = entry.get("prompt", entry.get("caption")) or default_caption
            if fps is None and entry.get("length") not in (None, count):
                logger.debug("%s: %s has %d frames (captions say %s: ignored)", self.root, name, count,
                             entry.get("length"))
            source = Source(path, name, count, str(caption))
            if clip is not None:
                self._cache(source, clip)
            self.videos.append(source)
        self._finish(len(files))

    def _load_captions(self, captions, files) -> dict:
        """{video_fn: entry} from the captions file (an absent default file: {})."""
        if captions is None:
            return {}
        path = Path(captions)
        path = path if path.is_absolute() else self.root / path
        if not path.is_file():
            if str(captions) != "captions.jsonl":
                raise ValueError(f"captions file {path} not found")
            return {}
        entries = {}
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not a JSON object: {e}") from e
                if not isinstance(entry, dict) or not isinstance(entry.get("video_fn"), str):
                    raise ValueError(f"{path}:{lineno}: expected an object with a 'video_fn' string")
                key = entry["video_fn"].replace("\\", "/")
                entries[key[2:] if key.startswith("./") else key] = entry
        names = {p.relative_to(self.root).as_posix() for p in files} | {p.name for p in files}
        unknown = [k for k in entries if k not in names]
        if unknown:
            logger.warning("%s: %d captions name no video file here: %s", path, len(unknown),
                           ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else ""))
        return entries

    def _read(self, source: Source, index: np.ndarray) -> Tensor | None:
        clip, count = decode_clip(source.path, self.size, self.fps, index)
        if clip is not None and clip.shape[1] == len(index):
            return clip
        logger.warning("%s: %s has %d frames, not the %d probed", self.root, source.name, count, source.count)
        source.count = count  # decoding reached the end: the real count
        return None


class FrameFolder(_ClipFolder):
    """Clips of videos stored as frame images: ``root/<class>/<video>/*.jpg|jpeg|png`` (SkyTimelapse).

    Each <video> directory is one video, its frames sorted by name (digit runs compare as numbers,
    so f2.jpg < f10.jpg). label = index of <class> among the sorted class directories; caption =
    the class name with underscores as spaces. An unreadable image is skipped and logged (an entry
    in ``self.skipped``); the video keeps its longest run of consecutive readable frames, so clips
    never jump over a gap, and is skipped when that run is too short for a clip.

    cache: keep decoded, resized frames in memory (None: for fewer than 64 videos).
    verify: decode every image at construction to find unreadable ones (always so when caching,
        which decodes everything anyway). Otherwise only the first image of each video is decoded, and a
        bad image found later is handled when an item reads it.
    """

    kind = "frame videos"

    def __init__(self, root, frames: int, size=(32, 32), stride: int = 1, seed: int = 0,
                 clips_per_video: int = 1, cache: bool | None = None, verify: bool | None = None,
                 extensions=IMAGE_EXTENSIONS):
        super().__init__(root, frames, size, stride, seed, clips_per_video)
        exts = tuple(e.lower() for e in extensions)
        self.classes = sorted((d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                              key=_natural_key)
        dirs = []  # (class index, video dir)
        for label, cls in enumerate(self.classes):
            for entry in sorted((self.root / cls).iterdir(), key=lambda p: _natural_key(p.name)):
                if entry.is_dir() and not entry.name.startswith("."):
                    dirs.append((label, entry))
                elif entry.suffix.lower() in exts:
                    self._skip(entry.relative_to(self.root).as_posix(),
                               "image directly in a class directory (expected root/<class>/<video>/*.jpg)")
        self.cache = len(dirs) < CACHE_MAX_FILES if cache is None else bool(cache)
        self.verify = self.cache or bool(verify)  # caching decodes every image anyway
        for label, d in dirs:
            name = d.relative_to(self.root).as_posix()
            images = sorted((p for p in d.iterdir() if p.suffix.lower() in exts and p.is_file()),
                            key=lambda p: _natural_key(p.name))
            if len(images) < self.span:
                self._skip(name, self._too_short(len(images), "images"))
                continue
            source = Source(d, name, len(images), self.classes[label].replace("_", " "), label, images)
            decoded = {}  # position -> (3, H, W)
            check = range(len(images)) if self.verify else [0]
            bad = []
            for k in check:
                try:
                    decoded[k] = _read_frame(images[k], self.size)
                except ValueError as e:
                    bad.append(k)
                    self._skip(images[k].relative_to(self.root).as_posix(), str(e))
            if not self.verify and bad:  # first image bad: the others are unchecked, keep looking
                k = 1
                while k < len(images) and k - 1 in bad:
                    try:
                        decoded[k] = _read_frame(images[k], self.size)
                    except ValueError as e:
                        bad.append(k)
                        self._skip(images[k].relative_to(self.root).as_posix(), str(e))
                    k += 1
            lo, hi = self._longest_run(len(images), bad)
            if hi - lo < self.span:
                self._skip(name, self._too_short(hi - lo, "readable consecutive images"))
                continue
            if bad:
                logger.warning("%s: %s: using images %d..%d (%d of %d) around unreadable ones", self.root,
                               name, lo, hi - 1, hi - lo, len(images))
            source.frames, source.count = images[lo:hi], hi - lo
            if self.cache:
                clip = torch.stack([decoded[k] if k in decoded else _read_frame(images[k], self.size)
                                    for k in range(lo, hi)], dim=1)
                self._cache(source, clip)
            self.videos.append(source)
        self._finish(len(dirs))

    @staticmethod
    def _longest_run(n: int, bad) -> tuple[int, int]:
        """[lo, hi) of the longest stretch of range(n) without a bad position (the first, on ties)."""
        best, lo = (0, 0), 0
        for b in sorted(set(bad)) + [n]:
            if b - lo > best[1] - best[0]:
                best = (lo, b)
            lo = b + 1
        return best

    def _read(self, source: Source, index: np.ndarray) -> Tensor | None:
        out = []
        for k in index:
            try:
                out.append(_read_frame(source.frames[k], self.size))
            except ValueError as e:  # drop the image, keep the longer side, try again
                self._skip(source.frames[k].relative_to(self.root).as_posix(), str(e))
                lo, hi = self._longest_run(len(source.frames), [int(k)])
                source.frames, source.count = source.frames[lo:hi], hi - lo
                return None
        return torch.stack(out, dim=1)
