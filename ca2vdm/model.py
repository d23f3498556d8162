"""The causal video DiT (Ca2-VDM idea 1): one network, two ways to run it over the same attention set.

Latent video (B, C, F, H, W) -> p x p patches -> S = HW/p^2 tokens per frame, hidden D. Every frame
has its own diffusion time, (B, F), which drives adaLN shift/scale/gate in every block (plus a class
embedding or the pooled prompt). The blocks are ``layers.Block``; the cyclic TPE rows (or RoPE
rotations) enter every block's temporal attention, not only block 0's as in STDiT: a stronger
position signal, and exactness is unaffected.

Ways to run the same weights:

* ``forward`` — a full-sequence forward over a clip, temporal attention masked by
  ``ChunkLayout.mask``: the training path and the exact oracle. A ``temporal='bidirectional'``
  model (a teacher for distillation) has only this forward, unmasked over a clip of ``clip_length``.
* ``forward_all_chunks`` — a context clip and noisy copies of all its chunks in one pass, each noisy
  chunk seeing exactly what its cached denoising step sees (teacher forcing when the context is
  ground truth).
* ``forward_cached`` — one chunk against a ``KVCache``: a denoising step reads the cached window,
  a clean write pass (``write=True``) also pushes the chunk's K/V into the cache.

Each forward is ``tokens`` and ``modulation`` -> blocks -> ``head``; a caller that changes how the blocks run (step
caching) composes these pieces itself, so the model holds no per-generation state. Because a clean
frame's features depend only on itself, earlier frames in its attention set and the conditioning,
the forwards compute the same numbers (tested to 1e-9 in float64).
"""

import torch
import torch.nn as nn
import torch.utils.checkpoint

from .cache import CacheBatch, KVCache
from .conditioning import Condition, Text
from .config import ModelConfig
from .diffusion import make_diffusion
from .layers import Block, FrameContext, Linear, TimestepEmbedder, modulate
from .positions import CyclicTPE, RoPE, sincos_2d


class CausalVideoDiT(nn.Module):
    """Causal spatio-temporal DiT for autoregressive chunk-by-chunk video diffusion."""

    features = frozenset({"batched-streams", "step-cache", "grad-checkpointing"})  # what the engine may ask of it (``backbone``)

    def __init__(self, config: ModelConfig):
        super().__init__()
        cfg = self.config = config
        D, p, C = cfg.hidden, cfg.patch, cfg.in_channels
        self.layout = cfg.layout
        self.grid = (cfg.frame_size[0] // p, cfg.frame_size[1] // p)
        self.patch_embed = Linear(C * p * p, D)
        self.register_buffer("spatial_pos", sincos_2d(*self.grid, D).float(), persistent=False)
        self.time_embed = TimestepEmbedder(D)
        self.label_embed = nn.Embedding(cfg.num_classes + 1, D) if cfg.conditioning == "class" else None
        self.null_text = nn.Parameter(torch.randn(1, cfg.text_dim) * 0.02) if cfg.conditioning == "text" else None
        self.text_pool = (nn.Sequential(Linear(cfg.text_dim, D), nn.SiLU(), Linear(D, D))
                          if cfg.pooled_text else None)
        self.tpe = CyclicTPE(cfg.cyclic_length, D) if cfg.positions == "cyclic" else None
        self.rope = RoPE(D // cfg.heads, cfg.rope_base) if cfg.positions == "rope" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), Linear(D, 2 * D))
        self.final_proj = Linear(D, C * p * p)
        self.grad_checkpointing = False  # recompute block activations in backward (training only)
        self.diffusion = make_diffusion(cfg.objective, cfg.num_train_timesteps, cfg.flow_shift,
                                        cfg.beta_start, cfg.beta_end, cfg.ddim_spacing)
        self.initialize_weights()

    def initialize_weights(self):
        """Xavier linears, then adaLN-Zero: every residual branch and the output start at zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.weight, std=0.02)
        zero = [self.final_adaLN[1], self.final_proj]
        zero += [self.text_pool[2]] if self.text_pool is not None else []
        for b in self.blocks:
            zero.append(b.adaLN[1])
            zero += [b.prefix.proj] if b.prefix is not None else []
            zero += [b.cross.proj] if b.cross is not None else []
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embed.weight.device

    # -- conditioning ------------------------------------------------------------------------
    def null_text_for(self, batch: int) -> Text:
        """The learned empty prompt, used for caption dropout and the unconditional branch."""
        return Text(self.null_text[None].expand(batch, -1, -1))

    def condition(self, batch: int, text: Text | None = None, labels: torch.Tensor | None = None) -> Condition:
        """Prepare conditioning once: text K/V for every block, the pooled prompt or the label embedding.

        ``text=None`` (text model) or ``labels`` entries equal to ``num_classes`` mean "no condition".
        """
        cfg = self.config
        cond = Condition(batch=batch)
        if cfg.conditioning == "text":
            text = text if text is not None else self.null_text_for(batch)
            if text.states.shape[0] != batch or text.states.shape[2] != cfg.text_dim:
                raise ValueError(f"text states must be ({batch}, tokens, {cfg.text_dim}), "
                                 f"got {tuple(text.states.shape)}")
            if not bool(text.mask.any(dim=1).all()):
                raise ValueError("every prompt needs at least one unmasked text token")
            states = text.states.to(self.device, self.dtype)
            cond.kv = [b.cross.text_kv(states) for b in self.blocks]
            mask = text.mask.to(self.device)
            cond.mask = mask[:, None, None, :]
            if self.text_pool is not None:  # the mean of the real tokens (B, Dt) -> (B, D)
                w = mask.to(states.dtype)[:, :, None]
                cond.vector = self.text_pool((states * w).sum(1) / w.sum(1))
        elif text is not None:
            raise ValueError(f"this model has conditioning={cfg.conditioning!r}; it takes no text prompt")
        if cfg.conditioning == "class":
            if labels is None:
                labels = torch.full((batch,), cfg.num_classes, dtype=torch.long)
            labels = torch.as_tensor(labels, device=self.device).long().reshape(-1)
            if labels.shape[0] != batch:
                raise ValueError(f"expected {batch} class labels, got {labels.shape[0]}")
            if bool((labels < 0).any() | (labels > cfg.num_classes).any()):
                raise ValueError(f"class labels must be in [0, {cfg.num_classes}] ({cfg.num_classes} = none)")
            cond.vector = self.label_embed(labels)
        elif labels is not None:
            raise ValueError(f"this model has conditioning={cfg.conditioning!r}; it takes no class labels")
        return cond

    def unconditional(self, batch: int, negative: Text | None = None) -> Condition:
        """The guidance branch's conditioning: the negative prompt if given, else the null condition."""
        if self.config.conditioning == "class":
            return self.condition(batch, labels=torch.full((batch,), self.config.num_classes))
        return self.condition(batch, text=negative)

    def guided_condition(self, batch: int, text: Text | None = None, labels=None, negative: Text | None = None) -> Condition:
        """Both branches of classifier-free guidance as one 2B batch: the condition, then ``unconditional``."""
        return Condition.cat(self.condition(batch, text, labels), self.unconditional(batch, negative))

    # -- patches -------------------------------------------------------------------------------
    def patchify(self, x):  # (B, C, F, H, W) -> (B, F, S, C*p*p)
        B, C, Fr, H, W = x.shape
        p, (h, w) = self.config.patch, self.grid
        x = x.reshape(B, C, Fr, h, p, w, p).permute(0, 2, 3, 5, 1, 4, 6)
        return x.reshape(B, Fr, h * w, C * p * p)

    def unpatchify(self, x):  # (B, F, S, C*p*p) -> (B, C, F, H, W)
        B, Fr, S, _ = x.shape
        p, (h, w), C = self.config.patch, self.grid, self.config.in_channels
        x = x.reshape(B, Fr, h, w, C, p, p).permute(0, 4, 1, 2, 5, 3, 6)
        return x.reshape(B, C, Fr, h * p, w * p)

    # -- the pieces every forward is made of ------------------------------------------------
    def check_input(self, x, t, cond: Condition | None) -> Condition:
        """Check a video (B, C, F, H, W) and its per-frame times (B, F); return the conditioning
        (the null condition when ``cond`` is None)."""
        cfg = self.config
        if x.dim() != 5:
            raise ValueError(f"video must be (batch, channels, frames, height, width), got shape {tuple(x.shape)}")
        B, C, Fr, H, W = x.shape
        if C != cfg.in_channels or (H, W) != cfg.frame_size:
            raise ValueError(f"video has {C} channels of {H}x{W}; the model expects "
                             f"{cfg.in_channels} channels of {cfg.frame_size[0]}x{cfg.frame_size[1]}")
        if t.shape != (B, Fr):
            raise ValueError(f"timesteps must be per frame, shape ({B}, {Fr}), got {tuple(t.shape)}")
        if cond is None:
            return self.condition(B)
        if cond.batch != B:
            raise ValueError(f"conditioning is for batch {cond.batch}, video batch is {B}")
        return cond

    def tokens(self, x):
        """Tokens h (B, F, S, D) of video x (B, C, F, H, W): patches plus the 2-D positions."""
        return self.patch_embed(self.patchify(x)) + self.spatial_pos.to(self.dtype)

    def embed(self, x, t, cond: Condition):
        """Tokens h (B, F, S, D) and the per-frame adaLN input c (B, F, D) of video x at times t."""
        return self.tokens(x), self.modulation(t, cond)[0]

    def head(self, h, c, x, t, x0: bool = False, mod=None):
        """The final layer: tokens h (B, F, S, D) -> the prediction (B, C, F, H, W) in the objective's
        parameterisation (a velocity for ``flow``, also when the network predicts x0), or with
        ``x0=True`` the clean-frame prediction: the x0 head itself for ``prediction='sample'`` (the
        clamped velocity is never inverted), else the objective's output turned into x0 exactly.
        ``mod``: final_adaLN(c) when already computed."""
        mod = self.final_adaLN(c) if mod is None else mod
        shift, scale = mod[:, :, None].chunk(2, dim=-1)
        out = self.unpatchify(self.final_proj(modulate(self.final_norm(h), shift, scale)))
        if self.config.prediction == "sample":
            return out.to(x.dtype) if x0 else self.velocity_from_sample(x, out, t)
        return self.diffusion.x0_from(x, out, t) if x0 else out

    def _positions(self, frames, shift: int):
        tpe = self.tpe(frames, shift).to(self.dtype) if self.tpe is not None else None
        rope = self.rope.angles(frames, self.dtype, self.device) if self.rope is not None else None
        return tpe, rope

    def modulation(self, t, cond: Condition) -> tuple[torch.Tensor, list]:
        """The per-frame embedding c (B, F, D) of times t (B, F) under ``cond`` and every adaLN output
        computed from it: each block's (B, F, 9D), then the final layer's (B, F, 2D).

        The model keeps nothing: a caller that calls the network many times at the same levels (a
        stream: its levels repeat in every chunk, its write pass is always t = 0) computes these once
        and hands them to ``forward_cached(..., modulation=...)`` (``StreamSession`` does)."""
        c = self.time_embed(t)
        if cond.vector is not None:
            c = c + cond.vector[:, None]
        return c, [b.adaLN(c) for b in self.blocks] + [self.final_adaLN(c)]

    def _run(self, x, t, cond, ctx, return_hidden, skip_output=False, x0=False, modulation=None):
        """embed -> every block -> head; the hidden state after each block with ``return_hidden``;
        ``modulation``: ``self.modulation(t, cond)`` when the caller already has it."""
        h = self.tokens(x)
        c, mods = self.modulation(t, cond) if modulation is None else modulation
        hidden = []
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled() and ctx.cache is None:
                h = torch.utils.checkpoint.checkpoint(block, h, c, cond, ctx, i, mods[i], use_reentrant=False)
            else:
                h = block(h, c, cond, ctx, i, mods[i])
            if return_hidden:
                hidden.append(h)
        out = None if skip_output else self.head(h, c, x, t, x0, mods[-1])
        return (out, hidden) if return_hidden else out

    def target(self, x0, noise, level):
        """What the network output is trained towards for frames noised to ``level`` (B, F).

        The objective's target (velocity or noise); with ``prediction='sample'`` the velocity is
        (x_sigma - x0) / max(sigma, sigma_min), which ``velocity_from_sample`` reaches exactly when
        x0_hat = x0, also below sigma_min (an unclamped target would be out of reach there).
        """
        target = self.diffusion.target(x0, noise, level)
        if self.config.prediction == "sample":
            ratio = level / level.clamp_min(self.config.sample_sigma_min)  # (B, F), 1 where sigma >= sigma_min
            target = target * ratio.to(target.dtype)[:, None, :, None, None]
        return target

    def velocity_from_sample(self, x, x0_hat, t):
        """x0 prediction -> flow velocity (x_sigma - x0_hat) / sigma, sigma clamped below at
        ``sample_sigma_min``. x, x0_hat: (B, C, F, H, W); t: (B, F) network time sigma * N.

        A small network predicts clean frames (a low-dimensional target) more easily than a velocity,
        which carries the input's noise through every block; the loss stays in velocity space
        (JiT, Li & He 2025), so only the parameterisation changes, not the weighting.
        """
        cfg = self.config
        sigma = (t / cfg.num_train_timesteps).clamp_min(cfg.sample_sigma_min)  # (B, F) float64
        return (x - x0_hat.to(x.dtype)) / sigma.to(x.dtype)[:, None, :, None, None]

    # -- the forwards ----------------------------------------------------------------------------
    def forward(self, x, t, cond: Condition | None = None, start: int = 0, tpe_shift: int = 0,
                return_hidden: bool = False, x0: bool = False):
        """Full-sequence forward over frames [start, start + F) of a video.

        x: (B, C, F, H, W); t: (B, F) network time per frame (0 = clean); ``start`` may instead list
        every frame's absolute index (a window with sink frames). Temporal attention uses
        ``ChunkLayout.mask`` over these frames: frames before ``start`` are simply absent (the
        recompute-window baseline runs a window this way). ``tpe_shift`` rotates cyclic rows
        (training augmentation). Returns the prediction (B, C, F, H, W) [and per-block hidden]; every
        forward takes ``x0=True`` for the clean-frame prediction instead (see ``head``).
        """
        cond = self.check_input(x, t, cond)
        Fr = x.shape[2]
        frames = range(start, start + Fr) if isinstance(start, int) else [int(f) for f in start]
        if len(frames) != Fr:
            raise ValueError(f"{len(frames)} frame indices given for {Fr} frames")
        if self.config.prefix_enhance and not isinstance(frames, range):
            raise ValueError("with prefix enhancement the frames of a forward must be consecutive")
        tpe, rope = self._positions(frames, tpe_shift)
        if self.config.temporal == "bidirectional":  # the ordinary video DiT: one clip, every frame sees all
            if Fr > self.config.clip_length:
                raise ValueError(f"a bidirectional model takes clips of at most {self.config.clip_length} frames, "
                                 f"got {Fr}")
            return self._run(x, t, cond, FrameContext(tpe, rope), return_hidden, x0=x0)
        ctx = FrameContext(tpe, rope, mask=self.layout.mask(frames, frames, x.device))
        if self.config.prefix_enhance:
            ctx.prefix_groups = self.prefix_groups(frames)
        return self._run(x, t, cond, ctx, return_hidden, x0=x0)

    def forward_all_chunks(self, context, noisy, t_noisy, cond: Condition | None = None, tpe_shift: int = 0,
                           return_hidden: bool = False, x0: bool = False):
        """All chunks at once: a clean context clip and noisy copies of its generated frames in one pass.

        context: (B, C, F, H, W) clean frames 0..F-1 (told time 0): ground truth in teacher forcing,
        a rollout's own frames in distillation. noisy: (B, C, F - p, H, W) noisy copies of frames
        p..F-1 with network times ``t_noisy`` (B, F - p). Each noisy chunk attends to the context
        frames of its window and causally to its own noisy frames (``ChunkLayout.all_chunks_mask``),
        so its prediction equals what the cached denoising step of that chunk computes.
        Returns the prediction for the noisy frames (B, C, F - p, H, W).
        """
        self.require_causal("the all-chunks layout")
        B, C, Fr = context.shape[:3]
        p = min(self.config.prefix_frames, Fr)
        if noisy.shape[2] != Fr - p or noisy.shape[:2] != context.shape[:2]:
            raise ValueError(f"noisy copies must cover frames {p}..{Fr - 1}: expected {Fr - p} frames, "
                             f"got shape {tuple(noisy.shape)}")
        x = torch.cat([context, noisy], dim=2)
        t = torch.cat([t_noisy.new_zeros(B, Fr), t_noisy], dim=1)
        cond = self.check_input(x, t, cond)
        frames = list(range(Fr)) + list(range(p, Fr))  # a noisy copy sits at its context frame's position
        tpe, rope = self._positions(frames, tpe_shift)
        ctx = FrameContext(tpe, rope, mask=self.layout.all_chunks_mask(Fr, x.device))
        if self.config.prefix_enhance:
            noisy_groups = [((q0 + Fr, q1 + Fr), ks) for (q0, q1), ks in self.prefix_groups(range(p, Fr), 0)]
            ctx.prefix_groups = self.prefix_groups(range(Fr)) + noisy_groups  # noisy copies read context keys
        result = self._run(x, t, cond, ctx, return_hidden, x0=x0)
        if return_hidden:
            return result[0][:, :, Fr:], result[1]
        return result[:, :, Fr:]

    def prefix_groups(self, frames: range, key_start: int | None = None) -> list:
        """For each chunk piece in ``frames``: its local span and the local span of its prefix frames."""
        R, out = self.config.prefix_enhance_frames, []
        ks = frames.start if key_start is None else key_start  # local index 0 of the keys' frames
        for first, end in self.layout.chunks(frames.start, frames.stop):
            s = self.layout.chunk_start(self.layout.chunk_of(first))
            k0 = max(ks, s - R)
            if k0 < s:
                out.append(((first - frames.start, end - frames.start), (k0 - ks, s - ks)))
        return out

    def cached_context(self, cache: KVCache, x) -> FrameContext:
        """The ``FrameContext`` of chunk x (B, C, q, H, W) as the next frames after ``cache``: checks
        that x is the next chunk for this cache; positions at its absolute frame indices."""
        self.require_causal("a KV cache")
        if cache.batch != x.shape[0]:
            raise ValueError(f"cache is for batch {cache.batch}, video batch is {x.shape[0]}")
        Fr = x.shape[2]
        cache.check_chunk(Fr)
        if isinstance(cache, CacheBatch):  # streams at different frames: positions per row
            return FrameContext(*self._row_positions(cache, Fr), cache=cache)
        tpe, rope = self._positions(range(cache.frames_written, cache.frames_written + Fr), 0)
        return FrameContext(tpe, rope, cache=cache)

    def _row_positions(self, batch: CacheBatch, Fr: int):
        """Per-row positions of the next Fr frames of every stream in ``batch``: TPE (rows, F, D),
        RoPE (cos, sin) each (rows, 1, 1, F, d/2)."""
        per = [self._positions(range(c.frames_written, c.frames_written + Fr), 0) for c in batch.caches]
        rows = lambda ts: torch.cat([t.expand(c.batch, *t.shape) for t, c in zip(ts, batch.caches)])  # noqa: E731
        tpe = rows([p[0] for p in per]) if self.tpe is not None else None
        rope = None
        if self.rope is not None:
            rope = tuple(rows([p[1][i] for p in per])[:, None, None] for i in range(2))
        return tpe, rope

    def forward_cached(self, x, t, cache: KVCache, cond: Condition | None = None, write: bool = False,
                       return_hidden: bool = False, x0: bool = False, modulation: tuple | None = None):
        """One chunk against the KV cache; the chunk's frames are the next ones after the cache.

        ``write=False``: a denoising step — the chunk attends to the cached window and to itself.
        ``write=True``: the clean write pass (t = 0) — the same attention, then the chunk's K/V are
        pushed into the cache (oldest frames evicted) and the frame counter advances; the network
        output is not needed and not computed. Returns the prediction (None when writing).
        ``modulation``: ``self.modulation(t, cond)``, computed by the caller for these very t and cond
        (a stream reuses it at every chunk); None computes it.
        """
        cond = self.check_input(x, t, cond)
        ctx = self.cached_context(cache, x)
        ctx.write = write
        result = self._run(x, t, cond, ctx, return_hidden, skip_output=write, x0=x0, modulation=modulation)
        if write:
            cache.advance(x.shape[2])
        return result

    def fill_cache(self, frames, cache: KVCache, cond: Condition | None = None, start=0) -> None:
        """Re-cache: the K/V of clean frames [start, start + F) (``start`` a list: the absolute index
        of every frame, e.g. the sink frames then the recent ones) computed by one masked forward
        over these frames alone (earlier frames absent, as ``forward(..., start=start)`` and a
        recompute-full stream whose history begins there), under ``cond``, written into the empty
        ``cache``, which then continues after the last. The frames must reach a chunk boundary and
        cover the window they leave (``KVCache.check_fill``); the first may sit mid-chunk. When the
        cache kept its sink (``KVCache.keep_sinks``) the frames attend to it as well. frames:
        (B, C, F, H, W)."""
        B, Fr = frames.shape[0], frames.shape[2]
        t = torch.zeros(B, Fr, dtype=torch.float64, device=frames.device)
        cond = self.check_input(frames, t, cond)
        idx = list(range(start, start + Fr)) if isinstance(start, int) else [int(f) for f in start]
        if len(idx) != Fr:
            raise ValueError(f"{len(idx)} frame indices given for {Fr} frames")
        cache.check_fill(B, idx)
        keys = list(range(cache.sink)) + idx if cache.sinks_kept else idx
        tpe, rope = self._positions(idx, 0)
        ctx = FrameContext(tpe, rope, mask=self.layout.mask(idx, keys, frames.device), cache=cache, fill=idx)
        if self.config.prefix_enhance:  # (no sink with prefix enhancement: the frames are consecutive)
            ctx.prefix_groups = self.prefix_groups(range(idx[0], idx[-1] + 1))
        self._run(frames, t, cond, ctx, False, skip_output=True)
        cache.advance(idx[-1] + 1)

    def require_causal(self, what: str) -> None:
        """A clear error when a bidirectional model is asked for what only the causal attention set has."""
        if self.config.temporal == "bidirectional":
            raise ValueError(f"this model attends bidirectionally over whole clips ({self.config.clip_length} "
                             f"frames): {what} needs the causal chunked attention set; sample whole clips with "
                             "generate.generate_clip")

    def new_cache(self, batch: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for ``batch`` videos (2x the videos with classifier-free guidance)."""
        self.require_causal("a KV cache")
        cfg = self.config
        return KVCache(self.layout, cfg.depth, batch, cfg.tokens, cfg.heads, cfg.hidden // cfg.heads,
                       cfg.prefix_enhance_frames if cfg.prefix_enhance else 0,
                       dtype=dtype or self.dtype, device=self.device)
