"""Wan 2.1 run by the engine: a ``wan.WanTransformer`` as a ``backbone.Backbone``.

``CausalWan`` owns the transformer, the frame size its streams generate at, and the flow schedule
(Wan's timestep shift). It implements what the engine calls, from the transformer's pieces:

* ``forward`` (the oracle): the block-causal full-sequence forward over frames [start, start + F);
* ``forward_cached``: one chunk against a ``KVCache`` laid out (B, H, slots, S, d): every block
  stages the chunk's rotated K/V after the window and attends to the contiguous view
  [window ‖ chunk] (a chunk sees itself whole, as Wan's block-causal mask says); a write pass then
  commits them into the ring (oldest frames evicted, no copy of the window);
* ``fill_cache``: a re-cache, one block-causal forward over the kept frames whose K/V go into an
  empty cache.

Positions are absolute latent frame indices (RoPE angles in float64), so K/V written at frame n
stay valid for every later chunk. The cache window is Wan's attention window less the chunk: with
Self-Forcing's 21 latent frames and chunks of 3, the ring keeps 18 frames. With ``sink_frames``
(LongLive: a window of 12 with 3 sink frames) the sink keeps its own slots and only the rest
rotates; with ``rope_positions='rebased'`` the cache moves the sink's keys as frames are evicted
(``WanTransformer.sink_shifts`` states the rule).
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .cache import CacheBatch, KVCache
from .conditioning import Condition, Text
from .diffusion import FlowMatching
from .layout import ChunkLayout
from .wan import WanConfig, WanTransformer
from .wan_weights import load_wan


@dataclass(frozen=True)
class CausalWanConfig:
    """The engine's view of a Wan model (see ``backbone``): the transformer's config, the latent
    frame size streams are generated at, and the flow schedule's timestep shift."""

    wan: WanConfig
    frame_size: tuple = (60, 104)   # latent (H, W): 480 x 832 pixels through Wan's VAE (8x)
    flow_shift: float = 5.0         # Self-Forcing's and CausVid's timestep shift
    num_train_timesteps: int = 1000

    prefix_frames = 0               # a prompt alone starts the video
    conditioning = "text"
    temporal = "causal"
    positions = "rope"              # (training draws no cyclic-table shift)

    def __post_init__(self):
        object.__setattr__(self, "frame_size", tuple(int(s) for s in self.frame_size))
        _, ph, pw = self.wan.patch_size
        if len(self.frame_size) != 2 or self.frame_size[0] % ph or self.frame_size[1] % pw or min(self.frame_size) < 1:
            raise ValueError(f"frame_size {self.frame_size} must be two positive sizes divisible by the patch "
                             f"{ph}x{pw}")
        if self.wan.sink_frames and self.max_context_frames <= self.wan.sink_frames:
            raise ValueError(f"a window of {self.wan.max_context_frames} frames with {self.wan.sink_frames} sink frames "
                             f"and chunks of {self.chunk_frames} leaves no frame of the window to slide: make "
                             "max_context_frames larger than sink_frames + chunk_frames")
        if not self.flow_shift > 0:
            raise ValueError(f"flow_shift must be positive, got {self.flow_shift}")

    @property
    def chunk_frames(self) -> int:
        return self.wan.chunk_frames

    @property
    def max_context_frames(self) -> int:
        """P_max: the frames a chunk attends to besides its own (Wan's window less the chunk)."""
        return self.wan.max_context_frames - self.wan.chunk_frames

    @property
    def in_channels(self) -> int:
        return self.wan.in_channels

    @property
    def depth(self) -> int:
        return self.wan.num_layers

    @property
    def layout(self) -> ChunkLayout:
        """Chunks of ``chunk_frames`` from frame 0, each attending to the P_max frames before it (the
        sink frames and the most recent others)."""
        return ChunkLayout(0, self.chunk_frames, self.max_context_frames, self.wan.sink_frames)

    @property
    def tokens(self) -> int:
        _, ph, pw = self.wan.patch_size
        return (self.frame_size[0] // ph) * (self.frame_size[1] // pw)

    def to_dict(self) -> dict:
        return {"family": "wan", "wan": self.wan.to_dict(), "frame_size": list(self.frame_size),
                "flow_shift": self.flow_shift, "num_train_timesteps": self.num_train_timesteps}

    @classmethod
    def from_dict(cls, d: dict) -> "CausalWanConfig":
        d = dict(d)
        if d.pop("family", "wan") != "wan":
            raise ValueError("not a Wan model config")
        return cls(wan=WanConfig.from_dict(d.pop("wan")), **d)


class CausalWan(nn.Module):
    """A Wan transformer the engine runs chunk by chunk (``backbone.Backbone``), also several streams
    at different frames as one batched forward (a ``CacheBatch``), and trains with each block's
    activations recomputed in backward (``grad_checkpointing``, the full-sequence forwards). Not
    available: step caching (its policies read the factorized block's temporal-attention residual)."""

    features = frozenset({"batched-streams", "grad-checkpointing"})

    def __init__(self, config: CausalWanConfig, transformer: WanTransformer | None = None):
        super().__init__()
        self.config = config
        self.transformer = WanTransformer(config.wan) if transformer is None else transformer
        if self.transformer.config != config.wan:
            raise ValueError("the transformer's config differs from the one given")
        self.diffusion = FlowMatching(config.num_train_timesteps, config.flow_shift)
        self.layout = config.layout

    @property
    def grad_checkpointing(self) -> bool:
        """Recompute each block's activations in backward (training's full-sequence forwards only)."""
        return self.transformer.grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, on: bool) -> None:
        self.transformer.grad_checkpointing = bool(on)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def require_causal(self, what: str) -> None:
        """Always causal: chunk by chunk is what it runs."""

    # -- conditioning ----------------------------------------------------------------------------
    def condition(self, batch: int, text: Text | None = None, labels=None) -> Condition:
        """Every block's text K/V of ``text`` (zero-padded to 512 positions, all attended); None:
        the empty prompt, all 512 positions zero."""
        if labels is not None:
            raise ValueError("a Wan model is text-conditioned; it takes no class labels")
        if text is None:
            cfg = self.config.wan
            text = torch.zeros(batch, 1, cfg.text_dim, dtype=self.dtype, device=self.device)
        cond = self.transformer.condition(text)
        if cond.batch != batch:
            raise ValueError(f"text states are for batch {cond.batch}, expected {batch}")
        return cond

    def guided_condition(self, batch: int, text: Text | None = None, labels=None,
                         negative: Text | None = None) -> Condition:
        """The condition, then the negative prompt's (Wan's pipelines pass one; None: the empty prompt)."""
        return Condition.cat(self.condition(batch, text, labels), self.condition(batch, negative))

    @property
    def null_text(self) -> torch.Tensor:
        """(1, text_dim) zeros: the empty prompt (every position of its K/V from zero states), what a
        dropped caption becomes in training."""
        return torch.zeros(1, self.config.wan.text_dim, dtype=self.dtype, device=self.device)

    def modulation(self, t, cond: Condition):
        """(e, mod): the time embedding (B, F, D) and the shared modulation (B, F, 6, D) of times t."""
        return self.transformer.modulation(t)

    # -- the forwards ----------------------------------------------------------------------------
    def _x0(self, x, out, t, x0: bool):
        return self.diffusion.x0_from(x, out, t) if x0 else out

    def _check(self, x, t, cond):
        cfg = self.config
        if x.dim() != 5 or x.shape[1] != cfg.in_channels or tuple(x.shape[3:]) != cfg.frame_size:
            raise ValueError(f"video must be (B, {cfg.in_channels}, F, {cfg.frame_size[0]}, {cfg.frame_size[1]}), "
                             f"got {tuple(x.shape)}")
        if t.shape != x.shape[:1] + x.shape[2:3]:
            raise ValueError(f"timesteps must be per frame, shape ({x.shape[0]}, {x.shape[2]}), got {tuple(t.shape)}")
        return self.condition(x.shape[0]) if cond is None else cond

    def forward(self, x, t, cond: Condition | None = None, start: int = 0, x0: bool = False, tpe_shift: int = 0):
        """The oracle: frames [start, start + F) under Wan's block-causal mask (frames before
        ``start`` absent), the flow velocity (B, C, F, H, W), or with ``x0`` the clean frames. (RoPE:
        there is no cyclic table to shift, ``tpe_shift`` must be 0.)"""
        if tpe_shift:
            raise ValueError("a Wan model has RoPE positions: there is no cyclic table to shift")
        cond = self._check(x, t, cond)
        out = self.transformer(x, t, cond, mask="block-causal", frames=start)
        return self._x0(x, out.to(x.dtype), t, x0)

    def target(self, x0, noise, level):
        """What the network output is trained towards for frames noised to ``level`` (B, F): the
        flow velocity noise - x0."""
        return self.diffusion.target(x0, noise, level)

    def all_chunks_mask(self, frames: int, device=None) -> torch.Tensor:
        """(2F, 2F) frame mask of [clean frames 0..F-1 || noisy copies of them]: clean frames under
        Wan's block-causal mask; the noisy copy of a frame in chunk k sees the clean frames of chunk
        k's window (the P_max before it) and its own noisy chunk whole, exactly what the cached
        denoising step of chunk k sees; clean frames never see noisy ones (Self-Forcing's teacher
        forcing)."""
        idx = list(range(frames))
        clean = self.transformer.block_causal_mask(idx, idx, device)
        chunk = torch.arange(frames, device=device) // self.config.chunk_frames
        before = torch.arange(frames, device=device)[None] < (chunk * self.config.chunk_frames)[:, None]
        out = torch.zeros(2 * frames, 2 * frames, dtype=torch.bool, device=device)
        out[:frames, :frames] = clean
        out[frames:, :frames] = clean & before
        out[frames:, frames:] = chunk[:, None] == chunk[None]
        return out

    def forward_all_chunks(self, context, noisy, t_noisy, cond: Condition | None = None, tpe_shift: int = 0,
                           return_hidden: bool = False, x0: bool = False):
        """All chunks at once: clean frames context (B, C, F, H, W) (told time 0) and noisy copies of
        every one of them, noisy (B, C, F, H, W) at times t_noisy (B, F), each copy at its clean
        frame's RoPE position, under ``all_chunks_mask``: the prediction for the noisy frames, each
        chunk's equal to what its cached denoising step computes."""
        if tpe_shift or return_hidden:
            raise ValueError("a Wan model has RoPE positions (no cyclic shift) and no hidden-state taps")
        B, C, Fr = context.shape[:3]
        if noisy.shape != context.shape:
            raise ValueError(f"noisy copies must cover every context frame: expected {tuple(context.shape)}, "
                             f"got {tuple(noisy.shape)}")
        x = torch.cat([context, noisy], dim=2)
        t = torch.cat([t_noisy.new_zeros(B, Fr), t_noisy], dim=1)
        cond = self._check(x, t, cond)
        out = self.transformer(x, t, cond, mask=self.all_chunks_mask(Fr, x.device), frames=list(range(Fr)) * 2)
        return self._x0(noisy, out[:, :, Fr:].to(x.dtype), t_noisy, x0)

    def new_cache(self, batch: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache: per block a window of P_max frames (the sink's slots, then a ring) plus a
        chunk's staging slots, each frame all S tokens' K/V, laid out (B, H, slots, S, d); with
        re-based RoPE it moves the sink's keys as frames are evicted (``WanTransformer.shift_frames``)."""
        cfg = self.config
        rebase = self.transformer.shift_frames if cfg.wan.rope_positions == "rebased" else None
        return KVCache(self.layout, cfg.depth, batch, cfg.tokens, cfg.wan.num_attention_heads,
                       cfg.wan.attention_head_dim, dtype=dtype or self.dtype, device=self.device, frames_dim=2,
                       rebase=rebase)

    def forward_cached(self, x, t, cache: KVCache, cond: Condition | None = None, write: bool = False,
                       return_hidden: bool = False, x0: bool = False, modulation=None):
        """One chunk x (B, C, q, H, W) as the next frames after ``cache``: a denoising step, or with
        ``write`` the clean write pass (K/V committed into the ring, nothing returned)."""
        if return_hidden:
            raise ValueError("return_hidden is not available for a Wan model (step caching reads the "
                             "factorized model's blocks)")
        cond = self._check(x, t, cond)
        if cache.batch != x.shape[0]:
            raise ValueError(f"cache is for batch {cache.batch}, video batch is {x.shape[0]}")
        q = x.shape[2]
        cache.check_chunk(q)
        tr, (H, W) = self.transformer, self.config.frame_size
        h = tr.tokens(x)
        e, mod = tr.modulation(t) if modulation is None else modulation
        mask = None
        if isinstance(cache, CacheBatch):  # streams at different frames: positions per row, a key mask
            ropes = [tr.rope(range(c.frames_written, c.frames_written + q), H, W) for c in cache.caches]
            rope = tuple(torch.cat([r[j].expand(c.batch, *r[j].shape) for r, c in zip(ropes, cache.caches)])
                         for j in range(2))  # each (rows, q, S, 1, d/2)
            S, slots = h.shape[2], cache.capacity + q
            key_frame = torch.arange(slots * S, device=h.device) // S  # the slot of every key token
            mask = (key_frame[None] < (cache.window_lens() + q)[:, None])[:, None, None]  # (rows, 1, 1, L*S)
        else:
            rope = tr.rope(range(cache.frames_written, cache.frames_written + q), H, W)
        for i, block in enumerate(tr.blocks):
            h = block(h, mod, cond.kv[i], rope, mask, lambda k, v, i=i: cache.stage(i, k, v))
            if write:
                cache.commit(i, q)
        if write:
            cache.advance(q)
            return None
        return self._x0(x, tr.head_output(h, e, H, W).to(x.dtype), t, x0)

    def fill_cache(self, frames, cache: KVCache, cond: Condition | None = None, start=0) -> None:
        """Re-cache: clean frames [start, start + F) (``start`` a list: every frame's absolute index,
        e.g. the sink frames then the recent ones) through one block-causal forward over them alone;
        every block's K/V written into the empty ``cache``, which then continues after them. When the
        cache kept its sink (``KVCache.keep_sinks``), the frames attend to its K/V as well."""
        B, Fr = frames.shape[0], frames.shape[2]
        t = torch.zeros(B, Fr, dtype=torch.float64, device=frames.device)
        cond = self._check(frames, t, cond)
        idx = self.transformer.frame_indices(start, Fr)
        cache.check_fill(B, idx)
        kept = cache.sinks_kept

        def keep(i, k, v):
            cache.fill(i, k, v, idx)
            if not kept:
                return k, v
            sk, sv = cache.sink_kv(i)  # (B, H, s, S, d): the sink as written, before these frames
            return torch.cat([sk.to(k.dtype), k], dim=2), torch.cat([sv.to(v.dtype), v], dim=2)

        key_frames = list(range(cache.sink)) + idx if kept else None
        self.transformer(frames, t, cond, mask="block-causal", frames=idx, keys=keep,
                         key_frames=key_frames)  # its head's output unused
        cache.advance(idx[-1] + 1)


def load_causal_wan(path, config: WanConfig | str | None = None, frame_size=(60, 104), flow_shift: float = 5.0,
                    dtype: torch.dtype = torch.float32, device="cpu", **load_kwargs) -> CausalWan:
    """A ``CausalWan`` from weights where users have them (``wan_weights.load_wan``: a diffusers
    folder, or Wan's own layout as the causal checkpoints store it, a LoRA merged in), generating
    latent frames of ``frame_size`` with the flow schedule's ``flow_shift``. ``config``: the
    architecture of a file in Wan's own layout (a ``WanConfig``, a ``wan.PRESETS`` name or a diffusers
    config.json). load_kwargs:
    ``entry``, ``prefix``, ``lora``, ``lora_alpha``, ``lora_entry`` and the chunk settings
    ``chunk_frames``, ``max_context_frames`` (Wan's window, the chunk included), ``text_len``."""
    if isinstance(config, (str, Path)) and Path(config).is_file():  # a diffusers config.json
        import json

        config = WanConfig.from_diffusers(json.loads(Path(config).read_text()))
    transformer = load_wan(path, config, dtype=dtype, device=device, **load_kwargs)
    return CausalWan(CausalWanConfig(transformer.config, frame_size, flow_shift), transformer).eval()
