"""The layers of the causal video DiT: the attention helper, its sub-layers and one Block.

Each block, on tokens (B, F, S, D) with a per-frame adaLN input c (B, F, D)::

    x += g1 * SpatialAttn(mod(norm1(x)))          within each frame (S tokens)
    x += PrefixAttn(norm_p(x), last R clean frames) optional "prefix enhancement"
    x += g_t * TemporalAttn(mod(norm_t(x)) + TPE)  across frames at each token, causal by chunk
    x += CrossAttn(norm_c(x), text)                optional text conditioning
    x += g2 * MLP(mod(norm2(x)))

``FrameContext`` tells a block what it needs about the frames it processes: positions, the
temporal mask of a full-sequence forward, or the KV cache of a cached forward.
"""

import functools
import math
import weakref
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import KVCache
from .config import ModelConfig
from .positions import RoPE


@functools.lru_cache(maxsize=64)
def _causal_lower_right(lq: int, lk: int, device: torch.device) -> torch.Tensor:
    """(lq, lk) bool: query i sees keys up to lk - lq + i (queries are the last lq keys)."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(diagonal=lk - lq)


CPU_AUTOCAST_ATTENTION = "float32"  # "float32" | "compute": attention's dtype under CPU autocast (see ``attend``)


def _cpu_autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 signature
        return torch.is_autocast_cpu_enabled()


def attend(q, k, v, mask=None):
    """Scaled dot-product attention over (N, H, L, d) tensors.

    ``mask`` is None, a boolean tensor broadcastable to (N, H, Lq, Lk), or ``"causal"`` for
    causal attention aligned bottom-right (queries are the last Lq of the Lk keys, as with a
    cache; SDPA's ``is_causal`` would align top-left). On CUDA the causal case uses
    ``causal_lower_right`` so fused kernels apply; on CPU a cached boolean mask. Under CPU
    autocast the attention itself runs in float32 unless ``CPU_AUTOCAST_ATTENTION`` is
    ``"compute"`` (then in the autocast dtype: since torch 2.x bf16 SDPA is as fast as float32 on
    CPU and saves the three casts up and one down, at bf16's error; ``bench --settings`` measures it).
    """
    if isinstance(mask, str):
        lq, lk = q.shape[-2], k.shape[-2]
        if q.is_cuda:
            from torch.nn.attention.bias import causal_lower_right
            mask = causal_lower_right(lq, lk)
        else:
            mask = _causal_lower_right(lq, lk, q.device)
    if q.device.type == "cpu" and CPU_AUTOCAST_ATTENTION == "float32" and _cpu_autocast_on():
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@dataclass
class FrameContext:
    """What a forward needs to know about the frames it processes.

    tpe: (F, D) cyclic rows, (B, F, D) per batch row (streams at different frames), or None.
    rope: (cos, sin) per frame, (F, d/2) or (B, 1, 1, F, d/2) per row, or None. mask: (F, F)
    temporal attention set for a full-sequence forward. cache and write: the KV cache of a cached
    forward and whether this is the clean write pass. fill: a full-sequence forward over clean
    frames at absolute indices ``fill`` that also writes their K/V into the empty ``cache`` (a
    re-cache; when the cache kept its sink, the sink's K/V are read too and ``mask`` covers them).
    prefix_groups: full-sequence prefix enhancement, (query span, key span) in local indices.
    tap: a block whose gated temporal-attention residual is kept in ``tapped`` (step caching).
    """

    tpe: torch.Tensor | None = None
    rope: tuple | None = None
    mask: torch.Tensor | None = None
    cache: KVCache | None = None
    write: bool = False
    fill: list | None = None
    prefix_groups: list = field(default_factory=list)
    tap: int = -1
    tapped: torch.Tensor | None = None

    def rows(self, rows: list[int]) -> "FrameContext":
        """The context of a cached forward over some batch rows (positions are per frame)."""
        return replace(self, cache=self.cache.rows(rows), tapped=None)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The lower-precision dtype of the autocast region we are in on ``device_type``, or None."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def versions(tensors) -> tuple | None:
    """The version counters of ``tensors`` (None entries skipped), which every in-place change bumps:
    the key of a result kept while they are unchanged. None where one is an inference tensor, which
    has no counter, so a change to it could not be seen and nothing may be kept."""
    tensors = [x for x in tensors if x is not None]
    if any(x.is_inference() for x in tensors):
        return None
    return tuple(x._version for x in tensors)


class Linear(nn.Linear):
    """``nn.Linear`` that, under autocast, keeps one low-precision copy of its weight and bias.

    Autocast casts a weight to bf16/fp16 on every call unless autograd needs the cast (it caches
    only leaves that require grad, and only within one autocast region), so an inference forward
    spends as much time copying weights as multiplying with them. Here the cast copy is kept and
    reused while the weight is unchanged: the same Parameter object, storage and version counter (an
    optimizer step, ``load_state_dict`` and ``load_state_dict(..., assign=True)`` all make a fresh
    one). The result is bitwise what autocast computes. When autograd must reach the weight (grad
    enabled and ``requires_grad``) autocast's own path runs, and under ``torch.compile`` too (a
    frozen graph folds the cast into a constant itself).

    Not seen: a change through ``weight.data`` (``p.data.copy_(...)``, ``p.data += ...``), which
    bypasses the version counter by design. After such an edit call ``drop_low_precision(model)``.
    """

    keep_low_precision = True  # False: autocast's cast on every call (what ``bench --settings`` compares)
    _low = None  # (weakref to the weight, key, weight, bias) in the autocast dtype; not a buffer, never saved

    def forward(self, x):
        w = self.weight
        dtype = autocast_dtype(w.device.type)
        if (not self.keep_low_precision or dtype is None or w.dtype == dtype or not w.is_floating_point()
                or (torch.is_grad_enabled() and w.requires_grad) or torch.compiler.is_compiling()):
            return super().forward(x)
        b = self.bias
        seen = versions((w, b))
        if seen is None:  # an inference-mode weight: no copy may be kept
            return super().forward(x)
        key = (w.data_ptr(), seen, dtype)
        if self._low is None or self._low[0]() is not w or self._low[1] != key:
            with torch.inference_mode(False), torch.no_grad():
                self._low = (weakref.ref(w), key, w.detach().to(dtype), None if b is None else b.detach().to(dtype))
        return F.linear(x.to(dtype), self._low[2], self._low[3])


def drop_low_precision(module: nn.Module) -> None:
    """Drop every low-precision weight copy ``Linear`` keeps in ``module``: needed after a change
    through ``p.data``, which no version counter records; the next call under autocast casts afresh."""
    for m in module.modules():
        if isinstance(m, Linear):
            m._low = None


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class SpatialAttention(nn.Module):
    """Self-attention among the S tokens of each frame."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)

    def forward(self, x):  # (B, F, S, D)
        B, Fr, S, D = x.shape
        q, k, v = self.qkv(x).view(B * Fr, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        out = attend(q, k, v)  # (B*F, H, S, d)
        return self.proj(out.transpose(1, 2).reshape(B, Fr, S, D))


class TemporalAttention(nn.Module):
    """Attention across frames at each spatial token, restricted to the chunked attention set."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)

    def forward(self, h, ctx: FrameContext, block: int):  # h (B, F, S, D)
        B, Fr, S, D = h.shape
        H = self.heads
        q, k, v = self.qkv(h).view(B, Fr, S, 3, H, D // H).permute(3, 0, 2, 4, 1, 5)  # each (B, S, H, F, d)
        if ctx.rope is not None:  # keys are rotated at their absolute frame index before caching
            q, k = RoPE.rotate(q, *ctx.rope), RoPE.rotate(k, *ctx.rope)
        if ctx.cache is None or ctx.fill is not None:
            kk, vv = k, v
            if ctx.fill is not None and ctx.cache.sinks_kept:  # a re-cache that keeps the sink: read it too
                sk, sv = ctx.cache.sink_kv(block)
                kk, vv = torch.cat([sk.to(k.dtype), k], dim=3), torch.cat([sv.to(v.dtype), v], dim=3)
            out = attend(q.flatten(0, 1), kk.flatten(0, 1), vv.flatten(0, 1), ctx.mask)
            if ctx.fill is not None:  # a re-cache: these clean frames' K/V become the window
                ctx.cache.fill(block, k, v, ctx.fill)
        else:
            k, v = ctx.cache.stage(block, k, v)  # (B, S, H, n + F, d): window then this chunk
            k, v = k.to(q.dtype), v.to(q.dtype)  # no-op unless the cache has its own dtype
            out = attend(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), ctx.cache.attention_mask(Fr))
            if ctx.write:
                ctx.cache.commit(block, Fr)
        out = out.view(B, S, H, Fr, D // H).permute(0, 3, 1, 2, 4).reshape(B, Fr, S, D)
        return self.proj(out)


class PrefixAttention(nn.Module):
    """Prefix enhancement: every frame of chunk k attends to the tokens of the last R clean frames
    before chunk k (fewer when fewer exist). Zero-initialised output, so it starts as a no-op."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q = Linear(dim, dim)
        self.kv = Linear(dim, 2 * dim)
        self.proj = Linear(dim, dim)

    def keys(self, x):  # (B, F, S, D) -> k, v each (B, H, F, S, d)
        B, Fr, S, D = x.shape
        return self.kv(x).view(B, Fr, S, 2, self.heads, D // self.heads).permute(3, 0, 4, 1, 2, 5)

    def attend_to(self, x, k, v):  # x (B, F, S, D); k, v (B, H, m*S, d) -> (B, F, S, D)
        B, Fr, S, D = x.shape
        q = self.q(x).view(B, Fr * S, self.heads, D // self.heads).transpose(1, 2)
        out = attend(q, k.to(q.dtype), v.to(q.dtype))  # (B, H, F*S, d); no-op when the cache is in q's dtype
        return self.proj(out.transpose(1, 2).reshape(B, Fr, S, D))

    def forward(self, x, ctx: FrameContext, block: int):
        if ctx.cache is None or ctx.fill is not None:
            k, v = self.keys(x)
            out = torch.zeros_like(x)
            for (q0, q1), (k0, k1) in ctx.prefix_groups:
                kk, vv = k[:, :, k0:k1].flatten(2, 3), v[:, :, k0:k1].flatten(2, 3)
                out[:, q0:q1] = self.attend_to(x[:, q0:q1], kk, vv)
            if ctx.fill is not None:  # a re-cache: the last R of these frames are the next prefix
                ctx.cache.write_prefix(block, k, v, start=ctx.fill[0])
            return out
        cached = ctx.cache.prefix(block)
        out = self.attend_to(x, *cached) if cached is not None else torch.zeros_like(x)
        if ctx.write:  # after reading: this chunk's frames become the prefix of the next ones
            ctx.cache.write_prefix(block, *self.keys(x))
        return out


class CrossAttention(nn.Module):
    """Attention from every token to the text tokens. Text K/V come precomputed (once per prompt)."""

    def __init__(self, dim, text_dim, heads):
        super().__init__()
        self.heads = heads
        self.q = Linear(dim, dim)
        self.kv = Linear(text_dim, 2 * dim)
        self.proj = Linear(dim, dim)

    def text_kv(self, states):  # (B, N, Dt) -> k, v each (B, H, N, d)
        B, N, _ = states.shape
        D = self.proj.in_features
        return self.kv(states).view(B, N, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x, kv, mask):  # x (B, F, S, D); mask (B, 1, 1, N)
        B, Fr, S, D = x.shape
        q = self.q(x).view(B, Fr * S, self.heads, D // self.heads).transpose(1, 2)
        out = attend(q, kv[0], kv[1], mask)
        return self.proj(out.transpose(1, 2).reshape(B, Fr, S, D))


class Block(nn.Module):
    """One STDiT-style block (see the module docstring for the order of sub-layers)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.hidden
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.spatial = SpatialAttention(D, cfg.heads)
        self.norm_p = nn.LayerNorm(D, eps=1e-6) if cfg.prefix_enhance else None
        self.prefix = PrefixAttention(D, cfg.heads) if cfg.prefix_enhance else None
        self.norm_t = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.temporal = TemporalAttention(D, cfg.heads)
        self.norm_c = nn.LayerNorm(D, eps=1e-6) if cfg.conditioning == "text" else None
        self.cross = CrossAttention(D, cfg.text_dim, cfg.heads) if cfg.conditioning == "text" else None
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        hidden = int(D * cfg.mlp_ratio)
        self.mlp = nn.Sequential(Linear(D, hidden), nn.GELU(approximate="tanh"), Linear(hidden, D))
        self.adaLN = nn.Sequential(nn.SiLU(), Linear(D, 9 * D))

    def forward(self, x, c, cond, ctx: FrameContext, index: int, mod=None):
        # x (B, F, S, D); c (B, F, D) per-frame time (+ label / pooled text) embedding; mod: adaLN(c)
        # (B, F, 9D) when already computed (``CausalVideoDiT.modulation``)
        mod = self.adaLN(c) if mod is None else mod
        s1, sc1, g1, st, sct, gt, s2, sc2, g2 = mod[:, :, None].chunk(9, dim=-1)  # (B, F, 1, D)
        x = x + g1 * self.spatial(modulate(self.norm1(x), s1, sc1))
        if self.prefix is not None:
            x = x + self.prefix(self.norm_p(x), ctx, index)
        h = modulate(self.norm_t(x), st, sct)
        if ctx.tpe is not None:  # (F, 1, D), or (B, F, 1, D) when every row has its own frames
            h = h + (ctx.tpe[:, None, :] if ctx.tpe.dim() == 2 else ctx.tpe[:, :, None, :])
        r = gt * self.temporal(h, ctx, index)
        if ctx.tap == index:
            ctx.tapped = r
        x = x + r
        if self.cross is not None:
            x = x + self.cross(self.norm_c(x), cond.kv[index], cond.mask)
        x = x + g2 * self.mlp(modulate(self.norm2(x), s2, sc2))
        return x


class TimestepEmbedder(nn.Module):
    """Per-frame diffusion time (B, F) -> (B, F, D): sinusoidal features, then an MLP (as DiT)."""

    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(Linear(freq_dim, dim), nn.SiLU(), Linear(dim, dim))

    def forward(self, t):
        dtype = self.mlp[0].weight.dtype
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
        args = t.to(torch.float64)[..., None] * freqs
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype)
        return self.mlp(emb)
