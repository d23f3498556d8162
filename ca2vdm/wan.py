"""A Wan-family transformer (Wan 2.1): full spatio-temporal self-attention, block-causal by chunk.

It computes what diffusers' ``WanTransformer3DModel`` and Wan's own code compute, with a frame
axis kept apart so that every frame carries its own diffusion time (as the causal Wan models,
Self-Forcing and LongLive, run it) and so that an engine can cache keys and values frame by frame:

    x (B, C, F, H, W) -> Conv3d patches (1, p, p) -> tokens h (B, F, S, D)
    t (B, F) -> float64 sinusoid -> MLP -> e (B, F, D) -> SiLU, Linear -> mod (B, F, 6, D)
    text (B, <=512, Dt) zero-padded to 512 -> MLP -> per block text K/V (once per prompt)
    every block, with (shift, scale, gate, c_shift, c_scale, c_gate) = block table + mod:
        h += gate * SelfAttn(norm1(h) * (1 + scale) + shift)       all tokens of the attention set
        h += CrossAttn(norm_cross(h), text K/V)                   all 512 positions, no mask
        h += c_gate * FFN(norm2(h) * (1 + c_scale) + c_shift)
    head: (shift, scale) = head table + e; Linear(norm(h) * (1 + scale) + shift) -> (B, C', F, H, W)

Self-attention normalises q and k with RMSNorm across all heads, then rotates them with Wan's 3-D
RoPE: each head's dimension split into a frame, a height and a width part, adjacent pairs rotated,
angles in float64 at absolute frame indices (``frames``), so keys written at frame n stay valid
for any later query. The attention set (``mask``) is None (every frame sees every frame: the
bidirectional teacher), ``"block-causal"`` (chunks of ``chunk_frames`` by absolute index, each
seeing itself whole and earlier frames within ``max_context_frames``, plus ``sink_frames``), or
any boolean (F, F) frame mask. Queries with the same set of key frames are attended together
without a mask, which is also what a cached chunk computes against [window || chunk].

Precision: the residual stream, the norms, the modulation and the time embedding run in the
model's dtype promoted to at least float32 (``compute_dtype``), never below and never
downcast from float64; linears and attention run in the parameter dtype. In float32 this is
diffusers' arithmetic except the sinusoid, which diffusers builds in float32 and Wan in float64.

Pieces an engine reuses (the forward is nothing but these): ``tokens``, ``modulation``,
``condition``, ``rope``, ``block_causal_mask`` / ``attention_groups``, each block (with
``keys``, a hook that may prepend cached frames to, or record, the block's rotated K/V), ``head``.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from .conditioning import Condition, Text
from .layers import Linear, attend


@dataclass
class WanConfig:
    """The architecture (diffusers' ``WanTransformer3DModel`` config, defaults: Wan 2.1 T2V 1.3B)
    and this library's chunk settings (defaults: Self-Forcing)."""

    patch_size: tuple = (1, 2, 2)      # (frames, height, width) per token; frames must be 1
    num_attention_heads: int = 12
    attention_head_dim: int = 128      # split into frame / height / width RoPE parts
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096               # width of the text encoder's states (umT5-XXL)
    freq_dim: int = 256                # sinusoid width of the time embedding
    ffn_dim: int = 8960
    num_layers: int = 30
    cross_attn_norm: bool = True       # affine LayerNorm before cross-attention (else none)
    qk_norm: str = "rms_norm_across_heads"
    eps: float = 1e-6
    rope_max_seq_len: int = 1024       # Wan's RoPE table: absolute positions stop at this frame
    chunk_frames: int = 3              # latent frames per chunk
    max_context_frames: int = 21       # latent frames a chunk's queries see, the chunk itself included
    sink_frames: int = 0               # first frames always seen (LongLive's attention sink), counted in the 21
    rope_positions: str = "absolute"   # "absolute" (Wan's, bit-compatible; frames < rope_max_seq_len) or
                                       # "rebased" (the sink at its own positions, the window right after it)
    text_len: int = 512                # text positions (zero-padded), all attended

    DIFFUSERS_KEYS = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                      "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps",
                      "rope_max_seq_len")
    UNSUPPORTED = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")  # image conditioning (I2V, VACE)

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        self.validate()

    def validate(self):
        def bad(name, why):
            raise ValueError(f"WanConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
                     "freq_dim", "ffn_dim", "num_layers", "rope_max_seq_len", "chunk_frames",
                     "max_context_frames", "text_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(name, "must be a positive integer")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            bad("patch_size", "must be three positive sizes (frames, height, width)")
        if self.patch_size[0] != 1:
            bad("patch_size", "must have 1 frame per token: timesteps, chunks and the cache are per latent frame")
        d = self.attention_head_dim
        if d % 2 or d < 6:
            bad("attention_head_dim", "must be even and at least 6 (RoPE's frame, height and width parts)")
        if self.freq_dim % 2:
            bad("freq_dim", "must be even (cos and sin halves)")
        if self.qk_norm != "rms_norm_across_heads":
            bad("qk_norm", "must be 'rms_norm_across_heads' (diffusers' Wan applies it whatever the setting)")
        if not isinstance(self.cross_attn_norm, bool):
            bad("cross_attn_norm", "must be true or false")
        if not self.eps > 0:
            bad("eps", "must be positive")
        if isinstance(self.sink_frames, bool) or not isinstance(self.sink_frames, int) or self.sink_frames < 0:
            bad("sink_frames", "must be 0 or more")
        if self.rope_positions not in ("absolute", "rebased"):
            bad("rope_positions", "must be 'absolute' or 'rebased'")
        if self.max_context_frames - self.sink_frames < self.chunk_frames:
            bad("max_context_frames", f"leaves fewer recent frames than one chunk ({self.chunk_frames}) "
                f"beside {self.sink_frames} sink frames: a chunk could not see itself")

    @property
    def hidden(self) -> int:
        """D, the model width."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Head-dimension parts rotated by frame, height and width (Wan's split)."""
        d = self.attention_head_dim
        hw = 2 * (d // 6)
        return d - 2 * hw, hw, hw

    # -- files -------------------------------------------------------------------------------------
    def to_diffusers(self) -> dict:
        """Keyword arguments of diffusers' ``WanTransformer3DModel`` (its config.json)."""
        d = {k: getattr(self, k) for k in self.DIFFUSERS_KEYS}
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_diffusers(cls, d: dict, **chunk_settings) -> "WanConfig":
        """From a diffusers config (``transformer/config.json``); this library's chunk settings
        (``chunk_frames``, ``max_context_frames``, ``sink_frames``, ``text_len``) as keywords."""
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        used = [k for k in cls.UNSUPPORTED if d.pop(k, None) is not None]
        if used:
            raise ValueError(f"the diffusers config sets {', '.join(used)}: image conditioning (I2V / VACE) "
                             "is not supported, only text-to-video Wan transformers")
        unknown = sorted(set(d) - set(cls.DIFFUSERS_KEYS))
        if unknown:
            raise ValueError(f"unknown WanTransformer3DModel config keys: {', '.join(unknown)}")
        if d.get("out_channels", 0) is None:  # diffusers: out_channels or in_channels
            d["out_channels"] = d.get("in_channels", cls.in_channels)
        ours = {f.name for f in fields(cls)} - set(cls.DIFFUSERS_KEYS)
        wrong = sorted(set(chunk_settings) - ours)
        if wrong:
            raise ValueError(f"not chunk settings of WanConfig: {', '.join(wrong)}")
        return cls(**d, **chunk_settings)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        if d["rope_positions"] == "absolute":  # configs (and saved streams) from before the setting stay equal
            del d["rope_positions"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "WanConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown WanConfig fields: {', '.join(unknown)}")
        return cls(**d)


PRESETS = {  # the released text-to-video transformers (their diffusers configs), by name
    "wan2.1-t2v-1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    "wan2.1-t2v-14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
}


def preset(name: str, **overrides) -> WanConfig:
    """``WanConfig`` of a released model by name (``PRESETS``), with overrides (chunk settings)."""
    if name not in PRESETS:
        raise ValueError(f"unknown Wan preset {name!r}; known: {', '.join(PRESETS)}")
    return WanConfig(**{**PRESETS[name], **overrides})


# -- numerics ------------------------------------------------------------------------------------
def upcast(dtype: torch.dtype) -> torch.dtype:
    """The dtype of norms and the residual stream for parameters in ``dtype``: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def linear_in(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` computed in x's dtype (weights cast up, autocast off): the time embedding and
    the modulation stay in float32 (or float64) whatever the parameters are stored in."""
    b = None if layer.bias is None else layer.bias.to(x.dtype)
    if x.device.type not in ("cpu", "cuda"):  # no autocast there (meta tensors: the hot-path test)
        return F.linear(x, layer.weight.to(x.dtype), b)
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x, layer.weight.to(x.dtype), b)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in at least float32; the result stays in that dtype (the residual's)."""

    def forward(self, x):
        up = upcast(x.dtype)
        w = None if self.weight is None else self.weight.to(up)
        b = None if self.bias is None else self.bias.to(up)
        return F.layer_norm(x.to(up), self.normalized_shape, w, b, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension (all heads together), computed in at least float32,
    returned in the input's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        up = upcast(x.dtype)
        return F.rms_norm(x.to(up), (x.shape[-1],), self.weight.to(up), self.eps).to(x.dtype)


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's time sinusoid, float64: t (...) -> [cos(t w), sin(t w)] (..., dim), w_i = 10000^(-i/(dim/2))."""
    half = dim // 2
    w = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.to(torch.float64)[..., None] * w
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_frequencies(dim: int, theta: float = 10000.0) -> torch.Tensor:
    """(dim/2,) float64 frequencies of one RoPE part: theta^(-2i/dim) (as Wan and diffusers)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x_2i, x_2i+1) of x (..., d) by angles given as cos, sin (..., d/2),
    in at least float32; the result in x's dtype."""
    up = upcast(x.dtype)
    x1, x2 = x.to(up).unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos.to(up), sin.to(up)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).to(x.dtype)


def attention_groups(mask: torch.Tensor) -> list | None:
    """A boolean frame mask (Fq, Fk) -> runs of query frames that see the same key frames:
    [(q_start, q_stop, keys)], keys a slice of key frames when contiguous, else their indices.
    None when every query sees every key (plain attention)."""
    rows = mask.cpu().tolist()
    if all(all(r) for r in rows):
        return None
    groups, q0 = [], 0
    for i in range(1, len(rows) + 1):
        if i < len(rows) and rows[i] == rows[q0]:
            continue
        keys = [j for j, seen in enumerate(rows[q0]) if seen]
        if not keys:
            raise ValueError(f"query frame {q0} attends to no frame")
        if keys[-1] - keys[0] + 1 == len(keys):
            groups.append((q0, i, slice(keys[0], keys[-1] + 1)))
        else:
            groups.append((q0, i, torch.tensor(keys, device=mask.device)))
        q0 = i
    return groups


# -- layers --------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """Attention over all tokens of the attention set, q and k RMS-normalised across heads and
    rotated by the 3-D RoPE. Split in two so that an engine can keep and prepend K/V:
    ``qkv`` (q, k, v for some frames) and ``attend`` (queries against any keys)."""

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = Linear(dim, dim), Linear(dim, dim), Linear(dim, dim), Linear(dim, dim)
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def qkv(self, x, rope):
        """x (B, F, S, D) -> q, k, v each (B, H, F, S, d); q and k normalised and rotated by
        ``rope`` (cos, sin), each (F, S, 1, d/2) or per row (B, F, S, 1, d/2)."""
        B, Fr, S, D = x.shape
        H = self.heads
        q = rotate(self.norm_q(self.q(x)).view(B, Fr, S, H, D // H), *rope)
        k = rotate(self.norm_k(self.k(x)).view(B, Fr, S, H, D // H), *rope)
        v = self.v(x).view(B, Fr, S, H, D // H)
        return tuple(a.permute(0, 3, 1, 2, 4) for a in (q, k, v))

    def attend(self, q, k, v, groups=None):
        """q (B, H, Fq, S, d) against k, v (B, H, Fk, S, d) -> (B, Fq, S, D), output projection
        applied. ``groups`` (``attention_groups``): which key frames each run of query frames sees,
        each optionally with a rotation of its first keys (``WanTransformer.sink_shifts``); None: all of them; a boolean tensor: a token mask broadcastable to (B, H, Fq*S, Fk*S) (streams
        of one batch whose windows differ in length)."""
        B, H, Fq, S, d = q.shape
        k, v = k.to(q.dtype), v.to(q.dtype)
        if groups is None or isinstance(groups, torch.Tensor):
            out = attend(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), groups).view(B, H, Fq, S, d)
        else:
            parts = []
            for q0, q1, keys, *shift in groups:
                keys = keys if isinstance(keys, slice) else keys.to(k.device)  # frame indices (host-built)
                kk = k[:, :, keys]
                if shift and shift[0] is not None:  # re-based RoPE: the group's sink keys moved
                    n, cos, sin = shift[0]
                    kk = torch.cat([rotate(kk[:, :, :n], cos, sin), kk[:, :, n:]], dim=2)
                parts.append(attend(q[:, :, q0:q1].flatten(2, 3), kk.flatten(2, 3),
                                    v[:, :, keys].flatten(2, 3)).view(B, H, q1 - q0, S, d))
            out = torch.cat(parts, dim=2)
        return self.o(out.permute(0, 2, 3, 1, 4).reshape(B, Fq, S, H * d))


class CrossAttention(nn.Module):
    """Attention from every token to the text positions (all of them, no mask). Text K/V are
    computed once per prompt by ``text_kv``."""

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = Linear(dim, dim), Linear(dim, dim), Linear(dim, dim), Linear(dim, dim)
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def text_kv(self, context):  # (B, N, D) -> k, v each (B, H, N, d)
        B, N, D = context.shape
        k = self.norm_k(self.k(context)).view(B, N, self.heads, D // self.heads).transpose(1, 2)
        v = self.v(context).view(B, N, self.heads, D // self.heads).transpose(1, 2)
        return k, v

    def forward(self, x, kv):  # x (B, F, S, D) -> (B, F, S, D)
        B, Fr, S, D = x.shape
        q = self.norm_q(self.q(x)).view(B, Fr * S, self.heads, D // self.heads).transpose(1, 2)
        out = attend(q, kv[0].to(q.dtype), kv[1].to(q.dtype))  # (B, H, F*S, d)
        return self.o(out.transpose(1, 2).reshape(B, Fr, S, D))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = Linear(dim, hidden), Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class WanBlock(nn.Module):
    """One Wan block (see the module docstring); its learned table (1, 6, D) is added to the
    shared per-frame modulation."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        D = cfg.hidden
        self.norm1 = LayerNorm(D, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(D, cfg.num_attention_heads, cfg.eps)
        self.norm_cross = LayerNorm(D, eps=cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(D, cfg.num_attention_heads, cfg.eps)
        self.norm2 = LayerNorm(D, eps=cfg.eps, elementwise_affine=False)
        self.ffn = FeedForward(D, cfg.ffn_dim)
        self.modulation = nn.Parameter(torch.randn(1, 6, D) / D ** 0.5)

    def forward(self, x, mod, text_kv, rope, groups=None,
                keys: Callable[[torch.Tensor, torch.Tensor], tuple] | None = None):
        """x (B, F, S, D) residual stream (compute dtype); mod (B, F, 6, D) these frames' modulation;
        text_kv this block's (k, v); rope (cos, sin); groups: the attention set (None: all keys).
        ``keys(k, v) -> (k, v)``: what the queries attend to, given this chunk's rotated K/V
        (B, H, F, S, d): an engine prepends its cached frames, or records them."""
        P = self.ffn.fc1.weight.dtype
        m = (self.modulation.to(mod.dtype) + mod)[:, :, :, None]  # (B, F, 6, 1, D)
        shift, scale, gate, c_shift, c_scale, c_gate = m.unbind(2)  # each (B, F, 1, D)
        q, k, v = self.self_attn.qkv((self.norm1(x) * (1 + scale) + shift).to(P), rope)
        if keys is not None:
            k, v = keys(k, v)
        x = x + self.self_attn.attend(q, k, v, groups).to(x.dtype) * gate
        x = x + self.cross_attn(self.norm_cross(x).to(P), text_kv).to(x.dtype)
        x = x + self.ffn((self.norm2(x) * (1 + c_scale) + c_shift).to(P)).to(x.dtype) * c_gate
        return x


class WanHead(nn.Module):
    """Final norm, per-frame shift / scale from its own table (1, 2, D) plus the time embedding,
    and the projection back to patches."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        D = cfg.hidden
        self.norm = LayerNorm(D, eps=cfg.eps, elementwise_affine=False)
        self.proj = Linear(D, cfg.out_channels * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, D) / D ** 0.5)

    def forward(self, x, e):  # x (B, F, S, D); e (B, F, D) -> (B, F, S, p*p*C')
        shift, scale = (self.modulation.to(e.dtype) + e[:, :, None]).unbind(2)  # each (B, F, D)
        y = self.norm(x) * (1 + scale[:, :, None]) + shift[:, :, None]
        return self.proj(y.to(self.proj.weight.dtype))


class TimeMLP(nn.Module):
    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.fc1, self.fc2 = Linear(freq_dim, dim), Linear(dim, dim)

    def forward(self, s):  # computed in s's dtype
        return linear_in(self.fc2, F.silu(linear_in(self.fc1, s)))


class TextMLP(nn.Module):
    def __init__(self, text_dim: int, dim: int):
        super().__init__()
        self.fc1, self.fc2 = Linear(text_dim, dim), Linear(dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# -- the model -----------------------------------------------------------------------------------
class WanTransformer(nn.Module):
    """Wan's transformer over per-frame timesteps; see the module docstring."""

    def __init__(self, config: WanConfig):
        super().__init__()
        cfg = self.config = config
        D = cfg.hidden
        self.patch_embed = nn.Conv3d(cfg.in_channels, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.time_embed = TimeMLP(cfg.freq_dim, D)
        self.time_proj = Linear(D, 6 * D)
        self.text_embed = TextMLP(cfg.text_dim, D)
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = WanHead(cfg)
        self.grad_checkpointing = False  # recompute each block's activations in backward (training only)
        self._freqs = {}  # device -> float64 RoPE frequencies of the frame, height and width parts (not
                          # buffers: model.to(dtype) would cast them; made on first use, also after meta init)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embed.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """Residual stream, norms and modulation: the parameter dtype, at least float32."""
        return upcast(self.dtype)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Tokens (h, w) of a latent frame of height x width."""
        _, ph, pw = self.config.patch_size
        if height % ph or width % pw:
            raise ValueError(f"frames of {height}x{width} are not divisible by the patch {ph}x{pw}")
        return height // ph, width // pw

    # -- pieces ------------------------------------------------------------------------------------
    def tokens(self, x):
        """Video x (B, C, F, H, W) -> tokens (B, F, S, D) in the compute dtype."""
        if x.dim() != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"video must be (batch, {self.config.in_channels}, frames, height, width), "
                             f"got shape {tuple(x.shape)}")
        self.grid(*x.shape[3:])
        h = self.patch_embed(x.to(self.dtype))  # (B, D, F, h, w)
        return h.flatten(3).permute(0, 2, 3, 1).to(self.compute_dtype)

    def modulation(self, t):
        """Per-frame times t (B, F) in [0, 1000] -> the time embedding e (B, F, D) (the head's input)
        and the shared modulation (B, F, 6, D) every block adds its table to; compute dtype."""
        if t.dim() != 2:
            raise ValueError(f"timesteps must be per frame, (batch, frames), got shape {tuple(t.shape)}")
        e = self.time_embed(sinusoid(t, self.config.freq_dim).to(self.compute_dtype))
        mod = linear_in(self.time_proj, F.silu(e))
        return e, mod.unflatten(-1, (6, self.config.hidden))

    def condition(self, text) -> Condition:
        """Text once per prompt set -> ``Condition`` whose ``kv`` holds every block's text K/V.

        ``text``: a ``Text`` (states whose masked positions are zeroed) or states (B, N, text_dim)
        with N <= text_len, zero-padded to text_len as Wan's pipeline does; every position is
        attended (``mask`` None)."""
        cfg = self.config
        if isinstance(text, Text):
            states = text.states * text.mask[..., None].to(text.states.dtype)
        else:
            states = text
        if states.dim() != 3 or states.shape[2] != cfg.text_dim or states.shape[1] > cfg.text_len:
            raise ValueError(f"text states must be (batch, <= {cfg.text_len}, {cfg.text_dim}), "
                             f"got {tuple(states.shape)}")
        states = F.pad(states.to(self.device, self.dtype), (0, 0, 0, cfg.text_len - states.shape[1]))
        context = self.text_embed(states)  # (B, text_len, D)
        return Condition(kv=[b.cross_attn.text_kv(context) for b in self.blocks], batch=states.shape[0])

    @staticmethod
    def frame_indices(frames, count: int) -> list[int]:
        """Absolute frame indices of ``count`` frames: ``frames`` an int (the first index) or the
        indices themselves."""
        if isinstance(frames, int):
            return list(range(frames, frames + count))
        frames = [int(f) for f in frames]
        if len(frames) != count:
            raise ValueError(f"{len(frames)} frame indices given for {count} frames")
        return frames

    def rope(self, frames: Sequence[int], height: int, width: int):
        """(cos, sin), each (F, S, 1, d/2) in the compute dtype, for frames at absolute indices
        ``frames`` and an h x w token grid (the RoPE of ``height`` x ``width`` latent frames).
        Angles are float64 products of integer positions: no float32 drift at large frame indices."""
        h, w = self.grid(height, width)
        dev = self.device
        self.check_positions(frames)
        if dev not in self._freqs:
            self._freqs[dev] = [rope_frequencies(n).to(dev) for n in self.config.rope_dims]
        ft, fh, fw = self._freqs[dev]
        pos = lambda n: torch.arange(n, dtype=torch.float64, device=dev)  # noqa: E731
        if isinstance(frames, range) and frames.step == 1:  # made on the device: no host-to-device copy
            idx = torch.arange(frames.start, frames.stop, dtype=torch.float64, device=dev)
        else:
            idx = torch.tensor(list(frames), dtype=torch.float64, device=dev)
        at = idx[:, None] * ft  # (F, t/2)
        ah, aw = pos(h)[:, None] * fh, pos(w)[:, None] * fw  # (h, hd/2), (w, wd/2)
        Fr = at.shape[0]
        ang = torch.cat([at[:, None, None].expand(Fr, h, w, -1), ah[None, :, None].expand(Fr, h, w, -1),
                         aw[None, None].expand(Fr, h, w, -1)], dim=-1).reshape(Fr, h * w, 1, -1)
        return torch.cos(ang).to(self.compute_dtype), torch.sin(ang).to(self.compute_dtype)

    def check_positions(self, frames: Sequence[int]) -> None:
        """Absolute positions end where Wan's RoPE table does (``rope_max_seq_len`` frames): a clear
        error past it. Re-based positions go on: only differences to the sink and within the window
        enter attention, and those stay inside the trained span (see ``sink_shifts``)."""
        cfg = self.config
        last = (frames.stop - 1) if isinstance(frames, range) else max(frames, default=0)
        if cfg.rope_positions == "absolute" and last >= cfg.rope_max_seq_len:
            raise ValueError(f"frame {last} is past the {cfg.rope_max_seq_len} absolute RoPE positions of Wan's "
                             "table (rope_max_seq_len); set rope_positions='rebased' to go on (the sink keeps its "
                             "positions, the window follows it)")

    def frame_shift(self, delta: int):
        """(cos, sin), each (d/2,) in the compute dtype: the rotation that moves a key's frame
        position by ``delta`` frames (the frame part of the head dimension; height and width parts
        unrotated). Angles in float64."""
        dev = self.device
        if dev not in self._freqs:
            self._freqs[dev] = [rope_frequencies(n).to(dev) for n in self.config.rope_dims]
        ft, fh, fw = self._freqs[dev]
        ang = torch.cat([delta * ft, torch.zeros_like(fh), torch.zeros_like(fw)])
        return torch.cos(ang).to(self.compute_dtype), torch.sin(ang).to(self.compute_dtype)

    def shift_frames(self, k: torch.Tensor, delta: int) -> torch.Tensor:
        """Keys k (..., d) rotated at frame n -> the same keys at frame n + delta."""
        return rotate(k, *self.frame_shift(delta))

    def sink_shifts(self, groups: list, q_frames: Sequence[int], k_frames: Sequence[int]) -> list:
        """Re-based RoPE for attention groups of a block-causal forward: each group (q0, q1, keys) ->
        (q0, q1, keys, shift) where ``shift`` = (n, cos, sin) rotates the group's first n keys, its
        sink frames, forward by the frames evicted before its chunk, or None.

        The rule (LongLive's relative RoPE): a chunk ending at frame e sees the sink frames at their
        own positions 0..s-1 and its window [e - (W - s), e) at positions s, s+1, ... (W: the
        window, ``max_context_frames``), so no position exceeds W - 1. Attention scores depend on
        positions only through query - key differences, so the same scores come from keeping the
        window's and the chunk's absolute positions and moving the sink by delta = e - W (the frames
        evicted): what the cache stores (its window keys never move) and what this computes."""
        cfg, out, plain = self.config, [], groups is None
        if plain:
            groups = [(0, len(q_frames), slice(0, len(k_frames)))]
        for q0, q1, keys in groups:
            end = (q_frames[q0] // cfg.chunk_frames + 1) * cfg.chunk_frames
            delta = end - cfg.max_context_frames
            kf = list(k_frames[keys]) if isinstance(keys, slice) else [k_frames[j] for j in keys.tolist()]
            n = sum(1 for f in kf if f < cfg.sink_frames)
            if delta <= 0 or n == 0:
                out.append((q0, q1, keys, None))
                continue
            if any(f < cfg.sink_frames for f in kf[n:]):
                raise ValueError("a group's sink keys must come first")
            out.append((q0, q1, keys, (n, *self.frame_shift(delta))))
        return None if plain and out[0][3] is None else out

    def block_causal_mask(self, q_frames: Sequence[int], k_frames: Sequence[int], device=None) -> torch.Tensor:
        """(Fq, Fk) bool: query frame i sees key frame j when j's chunk is not after i's and j is
        among the last ``max_context_frames - sink_frames`` frames up to the end of i's chunk, or
        is a sink frame. Chunks are runs of ``chunk_frames`` by absolute index, seen whole."""
        cfg = self.config
        q = torch.tensor(list(q_frames), device=device)
        k = torch.tensor(list(k_frames), device=device)[None]
        end = ((q.div(cfg.chunk_frames, rounding_mode="floor") + 1) * cfg.chunk_frames)[:, None]
        recent = cfg.max_context_frames - cfg.sink_frames
        return (k < end) & ((k >= end - recent) | (k < cfg.sink_frames))

    def head_output(self, h, e, height: int, width: int):
        """Tokens h (B, F, S, D) and time embedding e (B, F, D) -> the prediction (B, C', F, H, W)."""
        B, Fr, S, _ = h.shape
        (hh, ww), (_, ph, pw) = self.grid(height, width), self.config.patch_size
        out = self.head(h, e).view(B, Fr, hh, ww, ph, pw, self.config.out_channels)
        return out.permute(0, 6, 1, 2, 4, 3, 5).reshape(B, -1, Fr, hh * ph, ww * pw)

    # -- the forward -------------------------------------------------------------------------------
    def forward(self, x, t, text, mask=None, frames=0, keys: Callable | None = None,
                key_frames: Sequence[int] | None = None):
        """The flow prediction (B, C', F, H, W) for video x (B, C, F, H, W) at per-frame times
        t (B, F) in [0, 1000] under ``text`` (a ``Condition`` from ``condition``, a ``Text``, or
        states (B, <= text_len, text_dim)).

        mask: None (every frame sees every frame), ``"block-causal"`` (``block_causal_mask`` over
        the absolute frame indices) or a boolean (F, F) frame mask. frames: absolute index of x's
        first frame, or of every frame (RoPE positions and chunk membership). keys(block, k, v) ->
        (k, v): see ``WanBlock.forward``; with it, ``key_frames`` (the absolute frame of every key
        it returns) or ``mask`` must describe the keys it returns. With ``rope_positions='rebased'``
        and sink frames, each chunk sees the sink re-based (``sink_shifts``).
        """
        h = self.tokens(x)  # checks x
        B, _, Fr, H, W = x.shape
        if t.shape != (B, Fr):
            raise ValueError(f"timesteps must be per frame, shape ({B}, {Fr}), got {tuple(t.shape)}")
        cond = text if isinstance(text, Condition) else self.condition(text)
        if cond.batch != B:
            raise ValueError(f"conditioning is for batch {cond.batch}, video batch is {B}")
        idx = self.frame_indices(frames, Fr)
        kidx = idx if key_frames is None else [int(f) for f in key_frames]
        e, mod = self.modulation(t)
        rope = self.rope(idx, H, W)
        if isinstance(mask, str):
            if mask != "block-causal":
                raise ValueError(f"mask must be None, 'block-causal' or a boolean frame mask, got {mask!r}")
            mask = self.block_causal_mask(idx, kidx)
        if mask is not None and (mask.dim() != 2 or mask.shape[0] != Fr or mask.shape[1] != len(kidx)):
            raise ValueError(f"a frame mask for {Fr} frames and {len(kidx)} key frames is ({Fr}, {len(kidx)}), "
                             f"got {tuple(mask.shape)}")
        groups = None if mask is None else attention_groups(mask)
        if self.config.rope_positions == "rebased" and self.config.sink_frames and mask is not None:
            groups = self.sink_shifts(groups, idx, kidx)
        for i, block in enumerate(self.blocks):
            hook = None if keys is None else (lambda k, v, i=i: keys(i, k, v))
            if self.grad_checkpointing and self.training and torch.is_grad_enabled() and keys is None:
                h = torch.utils.checkpoint.checkpoint(block, h, mod, cond.kv[i], rope, groups, use_reentrant=False)
            else:
                h = block(h, mod, cond.kv[i], rope, groups, hook)
        return self.head_output(h, e, H, W)
