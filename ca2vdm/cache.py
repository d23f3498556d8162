"""The KV-cache queue (Ca2-VDM ideas 2 and 3): the temporal K/V of the window, shared by every step.

``KVCache`` holds, per block, a preallocated ring of P_max frame slots with the temporal K/V of
clean frames, followed by l staging slots where the chunk being denoised puts its own K/V, so
attention reads one contiguous slice ``[0, n + q)`` with no concatenation. Keys are order-free
(positions are already inside them), so a write that wraps around the ring needs no reordering.
The frame counter is a host integer: no ``torch.roll``, no ``.item()``, no copy of the cache.
Which frames the window holds is ``layout.ChunkLayout``'s definition; with sink frames the first s
slots hold them for good and the ring is the P_max - s slots after them.
"""

from collections.abc import Callable, Sequence

import torch

from .layout import ChunkLayout


class KVCache:
    """K/V of clean frames for every block, a ring of P_max frame slots per block.

    Layout per block: ``k[b]``, ``v[b]`` of shape (B, S, H, P_max + l, d) (``frames_dim`` 3: the
    factorized backbone's temporal attention, per token), or (B, H, P_max + l, S, d) (``frames_dim``
    2: full spatio-temporal attention, where a chunk attends to every token of the window): slots
    [0, P_max) are the window, slot of absolute frame n is ``slot_of(n)``: n mod P_max, or with
    ``sink_frames`` s, n for a sink frame (n < s, never evicted) and s + (n - s) mod (P_max - s) for
    the others; slots [n_valid, n_valid + q) stage the chunk being denoised.

    Re-based RoPE (``rebase``, a function moving keys by a number of frames): the sink's keys as
    written are kept in ``sink_k[b]`` and the sink slots hold them moved forward by the frames
    evicted so far (``sink_shift``), re-made once per chunk, so that every chunk sees the sink right
    before its window (``wan.WanTransformer.sink_shifts`` states the rule). With prefix enhancement, ``pk[b]``, ``pv[b]`` of shape (B, H, R, S, d)
    hold the spatial K/V of the last R clean frames (a ring of R slots, no staging needed).

    One clean write pass per chunk fills it (``stage`` then ``commit`` in every block, then
    ``advance``); every denoising step of the next chunks reads it. With classifier-free guidance
    the batch is 2B: the unconditional branch has its own half of every buffer and is written by
    the same pass. Under autograd (a training rollout through the cache) every write is out of
    place, so gradients flow through any number of chunks and evictions (``differentiable``).
    """

    def __init__(self, layout: ChunkLayout, depth: int, batch: int, tokens: int, heads: int,
                 head_dim: int, prefix_enhance_frames: int = 0, dtype=torch.float32, device=None,
                 frames_dim: int = 3, rebase: Callable[[torch.Tensor, int], torch.Tensor] | None = None):
        self.layout = layout
        self.capacity = layout.max_context_frames
        self.sink = layout.sink_frames
        self.ring = self.capacity - self.sink  # slots that rotate
        self.staging = max(layout.chunk_frames, layout.prefix_frames)
        self.batch, self.tokens, self.heads, self.head_dim = batch, tokens, heads, head_dim
        self.dtype = dtype
        slots = self.capacity + self.staging
        if frames_dim not in (2, 3):
            raise ValueError(f"frames_dim must be 2 (B, H, slots, S, d) or 3 (B, S, H, slots, d), got {frames_dim}")
        self.dim = frames_dim
        shape = (batch, heads, slots, tokens, head_dim) if frames_dim == 2 else (batch, tokens, heads, slots, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.rebase = rebase if self.sink else None
        sshape = shape[:frames_dim] + (self.sink,) + shape[frames_dim + 1:]
        self.sink_k = [torch.zeros(sshape, dtype=dtype, device=device) for _ in range(depth)] if self.rebase else []
        self.prefix_capacity = prefix_enhance_frames
        pshape = (batch, heads, prefix_enhance_frames, tokens, head_dim)  # (B, H, R, S, d)
        self.pk = [torch.zeros(pshape, dtype=dtype, device=device) for _ in range(depth)] if prefix_enhance_frames else []
        self.pv = [torch.zeros(pshape, dtype=dtype, device=device) for _ in range(depth)] if prefix_enhance_frames else []
        self.frames_written = 0  # host integer: clean frames written so far (absolute index of the next)
        self._staged = {}        # block -> the chunk's (k, v), staged out of place under autograd
        self.sinks_kept = False  # an empty cache whose sink slots were taken from another (``keep_sinks``)

    # -- bookkeeping (host integers only) ------------------------------------------------------
    @property
    def window_len(self) -> int:
        """Number of valid frames in the ring (the window the next chunk attends to)."""
        return min(self.frames_written, self.capacity)

    def slot_of(self, frame: int) -> int:
        """The window slot of absolute frame ``frame``."""
        if frame < self.sink:
            return frame
        return self.sink + (frame - self.sink) % self.ring

    @property
    def sink_shift(self) -> int:
        """Frames evicted so far: how far re-based RoPE moves the sink's keys."""
        return max(0, self.frames_written - self.capacity)

    def _placements(self, frames: Sequence[int], src0: int, in_place: bool) -> list[tuple[int, int, int]]:
        """Runs (src, dst, length) that put frames[i] (staged at src0 + i) into its window slot:
        frames that a later one of them evicts are skipped, and in place ones that are already there."""
        last = frames[-1] if frames else 0
        runs = []
        for i, f in enumerate(frames):
            if f >= self.sink and f + self.ring <= last:  # evicted again by a later frame of these
                continue
            src, dst = src0 + i, self.slot_of(f)
            if in_place and src == dst:
                continue
            if runs and runs[-1][0] + runs[-1][2] == src and runs[-1][1] + runs[-1][2] == dst:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((src, dst, 1))
        return runs

    @property
    def prefix_len(self) -> int:
        return min(self.frames_written, self.prefix_capacity)

    def next_chunk(self) -> int:
        """Index of the chunk whose frames come next."""
        n = self.frames_written
        k = self.layout.chunk_of(n)
        if self.layout.chunk_start(k) != n:
            raise RuntimeError(f"cache holds {n} frames, which is not a chunk boundary")
        return k

    def check_chunk(self, q: int) -> int:
        """Check that q frames form the next chunk; return its index."""
        k = self.next_chunk()
        if k == 0 and self.layout.prefix_frames == 0:
            k = 1
        if q != self.layout.chunk_len(k):
            raise ValueError(f"chunk {k} has {self.layout.chunk_len(k)} frames, got {q}")
        return k

    @staticmethod
    def attention_mask(q: int) -> str:
        """What the staged chunk's q queries see of the (n + q) staged keys: the window and their own
        chunk causally, i.e. ``"causal"`` aligned bottom-right (see ``layers.attend``)."""
        return "causal"

    def rows(self, rows: list[int]) -> "CacheRows":
        """The cache restricted to some batch rows, for a denoising step run on part of the batch
        (step caching): read and staged into, never committed. Nothing is copied up front."""
        return CacheRows(self, rows)

    # -- temporal K/V ------------------------------------------------------------------------
    @staticmethod
    def differentiable(buf: torch.Tensor) -> bool:
        """Whether a cache buffer must be written out of place: autograd is recording, or the buffer
        already carries a graph. In-place ``copy_`` into the preallocated buffers (the fast path of
        generation) would overwrite tensors that a later backward needs."""
        return torch.is_grad_enabled() or buf.requires_grad

    def slots(self, buf: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Frame slots [start, stop) of a buffer laid out as this cache's (a view)."""
        return buf.narrow(self.dim, start, stop - start)

    def stage(self, block: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Put the chunk's K/V (q frames on the frames axis) after the valid window; return the view
        of n + q frames. Out of place under autograd: the window and the chunk's K/V concatenated,
        the K/V kept for ``commit``."""
        n, q, d = self.window_len, k.shape[self.dim], self.dim
        if self.differentiable(self.k[block]):
            self._staged[block] = (k, v)
            return (torch.cat([self.slots(self.k[block], 0, n), k.to(self.dtype)], dim=d),
                    torch.cat([self.slots(self.v[block], 0, n), v.to(self.dtype)], dim=d))
        self._staged.pop(block, None)  # what an earlier differentiable step staged is stale now
        self.slots(self.k[block], n, n + q).copy_(k)
        self.slots(self.v[block], n, n + q).copy_(v)
        return self.slots(self.k[block], 0, n + q), self.slots(self.v[block], 0, n + q)

    def commit(self, block: int, q: int) -> None:
        """Move the staged chunk's K/V into the ring (FIFO, oldest frames evicted).

        Staged frame i sits in slot n + i and belongs in ``slot_of(frames_written + i)``. Before the
        window is full those are equal; the rest form at most two contiguous runs, copied from the
        staging area (disjoint from the window, so no transient copy).
        """
        c, n = self.frames_written, self.window_len
        frames = list(range(c, c + q))
        if block in self._staged:  # out of place: fresh buffers, the old ones stay as autograd saw them
            k, v = self._staged.pop(block)
            new_k, new_v = self.k[block].clone(), self.v[block].clone()
            for src, dst, length in self._placements(frames, 0, in_place=False):
                self.slots(new_k, dst, dst + length).copy_(self.slots(k, src, src + length))
                self.slots(new_v, dst, dst + length).copy_(self.slots(v, src, src + length))
            self.k[block], self.v[block] = new_k, new_v
        else:
            for src, dst, length in self._placements(frames, n, in_place=True):
                for buf in (self.k[block], self.v[block]):
                    self.slots(buf, dst, dst + length).copy_(self.slots(buf, src, src + length))
        if self.rebase and c < self.sink:  # sink keys as written (no frame evicted yet: the slots hold them)
            self._keep_sink_keys(block)

    def _keep_sink_keys(self, block: int) -> None:
        """Copy the sink slots' keys, as written, into ``sink_k`` (while no frame is evicted)."""
        keys = self.slots(self.k[block], 0, self.sink)
        self.sink_k[block] = keys.clone() if self.differentiable(keys) else self.sink_k[block].copy_(keys)

    def _shift_sinks(self) -> None:
        """Re-make every block's sink slots: the kept sink keys moved by ``sink_shift`` frames."""
        for b in range(len(self.k)):
            K = self.k[b]
            if self.differentiable(K):
                K = self.k[b] = K.clone()
            self.slots(K, 0, self.sink).copy_(self.rebase(self.sink_k[b], self.sink_shift))

    # -- prefix-enhancement K/V ---------------------------------------------------------------
    def prefix(self, block: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Spatial K/V of the last R clean frames, (B, H, m*S, d) each, or None when none exist."""
        m = self.prefix_len
        if m == 0:
            return None
        k, v = self.pk[block][:, :, :m].flatten(2, 3), self.pv[block][:, :, :m].flatten(2, 3)
        if torch.is_grad_enabled():  # autograd keeps what attention read: a copy, not the ring a later write reuses
            k, v = k.clone(), v.clone()
        return k, v

    def write_prefix(self, block: int, k: torch.Tensor, v: torch.Tensor, start: int | None = None) -> None:
        """Push the prefix K/V (B, H, q, S, d) of frames [start, start + q) into the R-slot ring (call
        after reading); ``start`` defaults to the next frame (``frames_written``)."""
        q, cap = k.shape[2], self.prefix_capacity
        c = self.frames_written if start is None else start
        first = max(0, q - cap)
        if self.differentiable(self.pk[block]):  # out of place, as in ``commit``
            self.pk[block], self.pv[block] = self.pk[block].clone(), self.pv[block].clone()
        for src, dst, length in _ring_runs(first, (c + first) % cap, q - first, cap):
            self.pk[block][:, :, dst:dst + length] = k[:, :, src:src + length]
            self.pv[block][:, :, dst:dst + length] = v[:, :, src:src + length]

    # -- re-cache: the whole window at once ------------------------------------------------------
    def check_fill(self, batch: int, frames: Sequence[int]) -> None:
        """Check that a re-cache of ``batch`` rows, clean frames at absolute indices ``frames``
        (ascending), fits this empty cache: the same batch, the frames end at a chunk boundary and
        cover the window they leave behind (``layout.window_before``; the sink frames may come from
        ``keep_sinks`` instead)."""
        if self.batch != batch:
            raise ValueError(f"cache is for batch {self.batch}, video batch is {batch}")
        if self.frames_written:
            raise RuntimeError("a re-cache writes a whole window into an empty cache; this one holds frames already")
        frames = list(frames)
        end = frames[-1] + 1
        if frames != sorted(set(frames)):
            raise ValueError("re-cached frames must be distinct and in order")
        if self.layout.chunk_start(self.layout.chunk_of(end)) != end:
            raise ValueError(f"a re-cache must end at a chunk boundary; frame {end} is not one")
        if self.sinks_kept and frames[0] < self.sink:
            raise ValueError("this cache kept its sink: re-cache the frames after it")
        have = set(frames) | (set(range(self.sink)) if self.sinks_kept else set())
        missing = [f for f in self.layout.window_before(end) if f not in have]
        if missing:
            raise ValueError(f"a re-cache must cover the window it leaves: frames {missing} of the window before "
                             f"frame {end} are not given")

    def fill(self, block: int, k: torch.Tensor, v: torch.Tensor, frames: int | Sequence[int]) -> None:
        """Write the K/V (F frames on the frames axis) of clean frames at absolute indices ``frames``
        (or F consecutive frames from ``frames``), computed together by one masked forward (a
        re-cache), into the window: each frame of the window they leave behind to its slot, the
        earlier ones dropped. ``check_fill`` first; ``advance`` to the end once every block is filled."""
        K, V = self.k[block], self.v[block]
        if isinstance(frames, int):
            frames = range(frames, frames + k.shape[self.dim])
        window = set(self.layout.window_before(frames[-1] + 1))
        if self.differentiable(K):
            K, V = K.clone(), V.clone()
            self.k[block], self.v[block] = K, V
        keep = [i for i, f in enumerate(frames) if f in window]
        for i in keep:  # one frame at a time: a re-cache, once per prompt switch
            dst = self.slot_of(frames[i])
            self.slots(K, dst, dst + 1).copy_(self.slots(k, i, i + 1))
            self.slots(V, dst, dst + 1).copy_(self.slots(v, i, i + 1))
        if self.rebase and not self.sinks_kept:
            self._keep_sink_keys(block)

    def keep_sinks(self, other: "KVCache") -> None:
        """Take the sink frames' K/V of ``other`` (a cache of the same stream, past its sink) into
        this empty one: a re-cache that keeps the sink as it was and re-encodes the rest."""
        if self.frames_written or other.frames_written < self.sink or not self.sink:
            raise RuntimeError("keep_sinks copies a written sink into an empty cache")
        for b in range(len(self.k)):
            keys = other.sink_k[b] if other.rebase else self.slots(other.k[b], 0, self.sink)
            self.slots(self.k[b], 0, self.sink).copy_(keys)
            self.slots(self.v[b], 0, self.sink).copy_(self.slots(other.v[b], 0, self.sink))
            if self.rebase:
                self.sink_k[b].copy_(keys)
        self.sinks_kept = True

    def sink_kv(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sink frames' K (as written, not moved) and V of one block."""
        keys = self.sink_k[block] if self.rebase else self.slots(self.k[block], 0, self.sink)
        return keys, self.slots(self.v[block], 0, self.sink)

    def copy_rows(self, other: "KVCache", rows: int) -> None:
        """Take the first ``rows`` batch rows of every buffer from ``other`` (the same window): a
        conditional half kept when the unconditional half is re-cached or dropped."""
        if other.frames_written != self.frames_written:
            raise RuntimeError(f"caches hold {other.frames_written} and {self.frames_written} frames")
        for mine, theirs in zip(self.k + self.v + self.pk + self.pv + self.sink_k,
                                other.k + other.v + other.pk + other.pv + other.sink_k):
            mine[:rows].copy_(theirs[:rows])

    def buffers(self) -> dict[str, torch.Tensor]:
        """Every K/V buffer by name (``k.0``, ``v.0``, ``pk.0``, ``sk.0``, ...): what a saved stream stores."""
        out = {}
        for name, bufs in (("k", self.k), ("v", self.v), ("pk", self.pk), ("pv", self.pv), ("sk", self.sink_k)):
            out.update({f"{name}.{i}": b for i, b in enumerate(bufs)})
        return out

    def advance(self, q: int) -> None:
        """Count q newly written clean frames (after every block has committed them); with re-based
        RoPE, move the sink's keys when frames were evicted."""
        shift = self.sink_shift
        self.frames_written += q
        self.sinks_kept = False
        if self.rebase and self.sink_shift != shift:
            self._shift_sinks()

    # -- size ------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held by the cache: every K/V buffer, staging slots and prefix ring included."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.pk + self.pv + self.sink_k)

    def formula_bytes(self) -> int:
        """The same size from the formula: depth x S x 2*hidden x bytes per frame, times frames.

        Frames = B x (P_max + staging) for the temporal ring plus B x R for the prefix ring, where
        B already includes the factor 2 of classifier-free guidance; with re-based RoPE, plus the
        sink's keys as written (K only: half a frame each, B x s of them).
        """
        depth, hidden = len(self.k), self.heads * self.head_dim
        per_frame = depth * self.tokens * 2 * hidden * torch.empty((), dtype=self.dtype).element_size()
        frames = self.batch * (self.capacity + self.staging + self.prefix_capacity)
        sink_keys = self.batch * self.sink * per_frame // 2 if self.rebase else 0
        return per_frame * frames + sink_keys

    def window_bytes(self) -> int:
        """The paper's figure, the window alone (docs/CONCEPTS.md §4):
        B x P_max x depth x S x 2*hidden x bytes."""
        depth, hidden = len(self.k), self.heads * self.head_dim
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.batch * self.capacity * depth * self.tokens * 2 * hidden * itemsize


class CacheRows:
    """Some batch rows of a ``KVCache`` as a cache for one denoising step (step caching computes
    only the rows that are due). It owns no K/V: a contiguous run of rows stages into the parent's
    own staging slots and reads views of it; other selections gather one block's window at a time,
    when that block attends, so at most one block's window of those rows is ever copied."""

    def __init__(self, cache: KVCache, rows: list[int]):
        self.cache, self.batch = cache, len(rows)
        contiguous = rows == list(range(rows[0], rows[-1] + 1))
        self.sel = slice(rows[0], rows[-1] + 1) if contiguous else torch.tensor(rows, device=cache.k[0].device)
        self.contiguous = contiguous
        self.layout, self.frames_written = cache.layout, cache.frames_written
        self.window_len, self.prefix_len = cache.window_len, cache.prefix_len

    nbytes = 0  # it holds no buffer of its own
    attention_mask = staticmethod(KVCache.attention_mask)

    def check_chunk(self, q: int) -> int:
        return self.cache.check_chunk(q)

    def rows(self, rows: list[int]) -> "CacheRows":
        raise RuntimeError("a row view of a cache cannot be narrowed again")

    def stage(self, block: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The window of these rows followed by the chunk's K/V (q frames on the cache's frames axis)."""
        c = self.cache
        n, q = self.window_len, k.shape[c.dim]
        K, V = c.k[block], c.v[block]
        if self.contiguous:  # the parent's staging slots of these rows are free scratch space
            c.slots(K[self.sel], n, n + q).copy_(k)
            c.slots(V[self.sel], n, n + q).copy_(v)
            return c.slots(K[self.sel], 0, n + q), c.slots(V[self.sel], 0, n + q)
        window = lambda buf: c.slots(buf, 0, n).index_select(0, self.sel)  # noqa: E731  n frames
        return (torch.cat([window(K), k.to(K.dtype)], dim=c.dim), torch.cat([window(V), v.to(V.dtype)], dim=c.dim))

    def commit(self, block: int, q: int) -> None:
        raise RuntimeError("a row view of a cache is only read: write passes run on the whole cache")

    def prefix(self, block: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        full = self.cache.prefix(block)
        if full is None:
            return None
        if self.contiguous:
            return full[0][self.sel], full[1][self.sel]
        return full[0].index_select(0, self.sel), full[1].index_select(0, self.sel)

    def write_prefix(self, block: int, k: torch.Tensor, v: torch.Tensor) -> None:
        raise RuntimeError("a row view of a cache is only read: write passes run on the whole cache")


class CacheBatch:
    """Several streams' caches as one batch, so that streams at different frames run one batched
    forward (a server's compatible sessions): rows are the caches' rows in order.

    Each cache keeps its own frame counter and ring; nothing is shared or moved. Staging puts every
    stream's chunk into its own staging slots; attention reads the first P_max + q slots of every
    cache concatenated, with a per-row mask (``attention_mask``) that admits a row's valid window
    (its slots [0, n_i)) and its own chunk causally (slots [n_i, n_i + q)): a key-padding mask for
    streams whose window is not yet full. Positions are per row (``frames_written`` is a list).
    Generation only: under autograd use one cache per forward.
    """

    def __init__(self, caches: list[KVCache]):
        first = caches[0]
        layout = lambda c: (c.layout, c.capacity, c.staging, c.tokens, c.heads, c.head_dim, c.dtype,  # noqa: E731
                            c.prefix_capacity)
        if any(layout(c) != layout(first) for c in caches[1:]):
            raise ValueError("caches of one batch must come from one model with one cache dtype")
        if first.prefix_capacity and len({c.prefix_len for c in caches}) > 1:
            raise ValueError("with prefix enhancement, streams batched together must have the same prefix length")
        self.caches, self.layout, self.capacity = caches, first.layout, first.capacity
        self.splits = [c.batch for c in caches]
        self.batch, self.dtype = sum(self.splits), first.dtype
        self._masks = {}

    @property
    def frames_written(self) -> list[int]:
        """Each stream's frame counter (the absolute index of its next frame)."""
        return [c.frames_written for c in self.caches]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    def check_chunk(self, q: int) -> list[int]:
        return [c.check_chunk(q) for c in self.caches]

    def rows(self, rows):
        raise RuntimeError("a batch of caches runs whole (step caching runs one stream at a time)")

    def window_lens(self) -> torch.Tensor:
        """(rows,) each row's valid window length, made on the device (a fill, not a copy of a list)."""
        dev = self.caches[0].k[0].device
        return torch.cat([torch.full((c.batch,), c.window_len, device=dev) for c in self.caches])

    def attention_mask(self, q: int) -> torch.Tensor:
        """(rows * S, 1, q, P_max + q) bool: row r's query i sees its window and its chunk up to frame i."""
        key = (q, tuple(c.window_len for c in self.caches))
        if key not in self._masks:
            dev = self.caches[0].k[0].device
            n = self.window_lens()[:, None, None]
            j = torch.arange(self.capacity + q, device=dev)[None, None, :]
            i = torch.arange(q, device=dev)[None, :, None]
            mask = (j < n) | ((j >= n) & (j <= n + i))  # (rows, q, L)
            S = self.caches[0].tokens  # attention runs per token: rows x S queries of q frames
            self._masks[key] = mask[:, None, None].expand(-1, S, 1, -1, -1).flatten(0, 1)  # (rows*S, 1, q, L)
        return self._masks[key]

    def stage(self, block: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stream's chunk K/V into its own staging slots; the (rows, S, H, P_max + q, d) keys and
        values that ``attention_mask`` goes with."""
        if torch.is_grad_enabled():
            raise RuntimeError("a batch of caches is for generation; run it under torch.no_grad()")
        end = self.capacity + k.shape[self.caches[0].dim]
        for c, kc, vc in zip(self.caches, k.split(self.splits), v.split(self.splits)):
            c.stage(block, kc, vc)
        return (torch.cat([c.slots(c.k[block], 0, end) for c in self.caches]),
                torch.cat([c.slots(c.v[block], 0, end) for c in self.caches]))

    def commit(self, block: int, q: int) -> None:
        for c in self.caches:
            c.commit(block, q)

    def prefix(self, block: int):
        parts = [c.prefix(block) for c in self.caches]
        if parts[0] is None:
            return None
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def write_prefix(self, block: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for c, kc, vc in zip(self.caches, k.split(self.splits), v.split(self.splits)):
            c.write_prefix(block, kc, vc)

    def advance(self, q: int) -> None:
        for c in self.caches:
            c.advance(q)


def _ring_runs(src: int, dst: int, length: int, cap: int) -> list[tuple[int, int, int]]:
    """Split a copy of ``length`` frames to ring slot ``dst`` (mod cap) into contiguous runs."""
    if length <= 0:
        return []
    head = min(length, cap - dst)
    runs = [(src, dst, head)]
    if length > head:
        runs.append((src + head, 0, length - head))
    return runs
