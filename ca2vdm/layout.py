"""The temporal attention set: who attends to whom across frames (Ca2-VDM idea 1's one definition).

Frames come in chunks: chunk 0 holds the ``prefix_frames`` given frames (it is empty when a prompt
alone starts the video), chunk k >= 1 holds ``chunk_frames`` (l) frames. A frame of chunk k attends to

* the most recent ``max_context_frames`` (P_max) frames before chunk k — the cache window — and
* the frames of chunk k up to and including itself.

With ``sink_frames`` (s > 0, LongLive's attention sink) the window is the first s frames of the
video, which never leave it, plus the most recent P_max - s frames before chunk k: P_max frames
in all, as without a sink, and the same set until the window first slides past the sink.

Training applies it as a boolean mask over a whole clip (``mask``, ``all_chunks_mask``); inference
keeps exactly that window in ``cache.KVCache``. Both read their chunk arithmetic from here.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChunkLayout:
    """Chunk structure and temporal attention set of a video.

    prefix_frames: given frames forming chunk 0 (0: a prompt alone starts the video).
    chunk_frames: l, frames per generated chunk.
    max_context_frames: P_max, frames before a chunk that it may attend to (sink frames included).
    sink_frames: s, first frames of the video that every later chunk attends to (0: none).
    """

    prefix_frames: int
    chunk_frames: int
    max_context_frames: int
    sink_frames: int = 0

    def __post_init__(self):
        if self.sink_frames < 0 or (self.sink_frames and self.sink_frames >= self.max_context_frames):
            raise ValueError(f"sink_frames={self.sink_frames} must be 0, or fewer than max_context_frames="
                             f"{self.max_context_frames} (the window needs room for recent frames)")

    @property
    def recent_frames(self) -> int:
        """P_max - s: the window's frames that slide (the most recent before the chunk)."""
        return self.max_context_frames - self.sink_frames

    def chunk_of(self, frame: int) -> int:
        """Index of the chunk that holds absolute frame ``frame``."""
        if frame < self.prefix_frames:
            return 0
        return 1 + (frame - self.prefix_frames) // self.chunk_frames

    def chunk_start(self, k: int) -> int:
        """First absolute frame of chunk k."""
        return 0 if k == 0 else self.prefix_frames + (k - 1) * self.chunk_frames

    def chunk_len(self, k: int) -> int:
        return self.prefix_frames if k == 0 else self.chunk_frames

    def chunks(self, start: int, stop: int) -> list[tuple[int, int]]:
        """Spans (first, end) of the chunk pieces that cover frames [start, stop), in order."""
        spans, f = [], start
        while f < stop:
            k = self.chunk_of(f)
            end = min(stop, self.chunk_start(k) + self.chunk_len(k))
            spans.append((f, end))
            f = end
        return spans

    def window(self, k: int) -> list[int]:
        """Frames before chunk k that chunk k attends to (the cache window), in order."""
        return self.window_before(self.chunk_start(k))

    def window_before(self, end: int) -> list[int]:
        """The window a chunk starting at frame ``end`` attends to: the sink frames and the most
        recent P_max - s frames before it (what the cache holds after ``end`` frames)."""
        first_recent = max(0, end - self.recent_frames)
        return list(range(min(self.sink_frames, first_recent))) + list(range(first_recent, end))

    def attends(self, i: int, j: int) -> bool:
        """Does frame i attend to frame j? (The scalar definition; ``mask`` vectorises it.)"""
        k = self.chunk_of(i)
        s = self.chunk_start(k)
        return s <= j <= i or (j < s and (j >= s - self.recent_frames or j < self.sink_frames))

    def _sets(self, q_frames, k_frames, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(own, past), each (Fq, Fk) bool: key in the query's chunk up to the query / in its window."""
        q = torch.tensor(list(q_frames), device=device)
        k = torch.tensor(list(k_frames), device=device)
        qs = torch.tensor([self.chunk_start(self.chunk_of(f)) for f in q_frames], device=device)
        own = (k[None, :] >= qs[:, None]) & (k[None, :] <= q[:, None])
        past = (k[None, :] < qs[:, None]) & ((k[None, :] >= qs[:, None] - self.recent_frames)
                                             | (k[None, :] < self.sink_frames))
        return own, past

    def mask(self, q_frames: range, k_frames: range, device=None) -> torch.Tensor:
        """Boolean (Fq, Fk) mask, True where query frame attends to key frame."""
        own, past = self._sets(q_frames, k_frames, device)
        return own | past

    def all_chunks_mask(self, frames: int, device=None) -> torch.Tensor:
        """Mask for the all-chunks-at-once layout [context frames 0..F-1 || noisy copies of frames p..F-1].

        The context frames are clean (ground truth in teacher forcing, a rollout's own frames in
        distillation) and attend as in ``mask``. The noisy copy of a frame in chunk k attends to the clean
        frames of chunk k's window and to the noisy copies of chunk k up to itself — exactly the set a
        denoising step of chunk k sees in cached inference. Context frames never see noisy ones.
        """
        clean, noisy = range(frames), range(min(self.prefix_frames, frames), frames)
        n = len(clean)
        out = torch.zeros(n + len(noisy), n + len(noisy), dtype=torch.bool, device=device)
        out[:n, :n] = self.mask(clean, clean, device)
        if len(noisy):
            out[n:, :n] = self._sets(noisy, clean, device)[1]  # clean frames of the window
            out[n:, n:] = self._sets(noisy, noisy, device)[0]  # own noisy chunk, causally
        return out
