"""The causal video DiT (Ca2-VDM idea 1) with one attention-set definition for training and inference.

Latent video (B, C, F, H, W) -> p x p patches -> S = HW/p^2 tokens per frame, hidden D.
Every frame has its own diffusion time, (B, F), driving adaLN shift/scale/gate. Each block:

    x += g1 * SpatialAttn(mod(norm1(x)))          within each frame (S tokens)
    x += PrefixAttn(norm_p(x), last R clean frames) optional "prefix enhancement"
    x += g_t * TemporalAttn(mod(norm_t(x)) + TPE)  across frames at each token, causal by chunk
    x += CrossAttn(norm_c(x), text)                optional text conditioning
    (mod/g: adaLN from the frame's time embedding, plus a class embedding or the pooled prompt)
    x += g2 * MLP(mod(norm2(x)))

The cyclic TPE rows (or RoPE rotations) enter every block's temporal attention, not only block 0's
as in STDiT: a stronger position signal, and exactness is unaffected.

Two ways to run the same weights:

* ``forward`` — a full-sequence forward over a clip, temporal attention masked by
  ``ChunkLayout.mask``: the training path and the exact oracle.
* ``forward_cached`` — one chunk against a ``KVCache``: a denoising step reads the cached window,
  a clean write pass (``write=True``) also pushes the chunk's K/V into the cache.

Because a clean frame's features depend only on itself, earlier frames in its attention set and
the conditioning, both compute the same numbers (tested to 1e-9 in float64).
"""

import functools
import math
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .cache import ChunkLayout, KVCache
from .diffusion import make_diffusion
from .positions import CyclicTPE, RoPE, sincos_2d
from .stepcache import StepCache, StepCacheConfig


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
def coerce_fields(cls, d: dict) -> dict:
    """Convert config values to their fields' scalar types (YAML reads '2e-4' as a string), or fail
    with a message naming the field."""
    types = {f.name: f.type for f in fields(cls)}
    out = {}
    for k, v in d.items():
        t = types.get(k)
        t = t if isinstance(t, str) else getattr(t, "__name__", str(t))
        try:
            if t.startswith("float") and isinstance(v, (str, int)) and not isinstance(v, bool):
                v = float(v)
            elif t.startswith("int") and isinstance(v, str):
                v = int(v)
            elif t.startswith("bool") and isinstance(v, str):
                if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(v)
                v = v.lower() in ("true", "1", "yes")
        except ValueError:
            raise ValueError(f"{cls.__name__}.{k}={v!r}: expected {t}") from None
        if t.startswith("int") and not t.startswith("int |") and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{cls.__name__}.{k}={v!r}: expected an integer")
        out[k] = v
    return out


@dataclass
class ModelConfig:
    """Everything that defines a CausalVideoDiT; saved as config.json beside the weights."""

    in_channels: int = 3            # latent (or pixel) channels C
    frame_size: tuple = (32, 32)    # latent frame (H, W)
    patch: int = 4                  # p: spatial patch size
    hidden: int = 128               # D
    depth: int = 4                  # number of blocks
    heads: int = 4
    mlp_ratio: float = 4.0
    chunk_frames: int = 4           # l: frames per generated chunk
    prefix_frames: int = 1          # given first frames (chunk 0); 0 = a prompt alone starts the video
    max_context_frames: int = 9     # P_max: cached frames a chunk attends to
    positions: str = "cyclic"       # "cyclic" (TPE table of cyclic_length rows) or "rope"
    cyclic_length: int | None = None  # L, default P_max + l
    rope_base: float = 10000.0
    conditioning: str = "none"      # "none", "class" or "text"
    num_classes: int = 0            # for "class"
    text_dim: int = 384             # width of text token states, for "text"
    pooled_text: bool = False       # "text": also add an MLP of the mean token state to the adaLN input
    prefix_enhance: bool = False    # extra spatial attention to the last R clean frames
    prefix_enhance_frames: int = 3  # R
    objective: str = "flow"         # "flow" (velocity, Euler) or "eps" (DDPM, DDIM)
    prediction: str = "native"      # "native": the network outputs the objective's target (velocity / noise);
                                    # "sample" (flow only): it outputs the clean frames x0, turned into a velocity
    sample_sigma_min: float = 0.05  # "sample": velocity = (x_sigma - x0_hat) / max(sigma, this)
    flow_shift: float = 1.0
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    ddim_spacing: str = "trailing"

    def __post_init__(self):
        if isinstance(self.frame_size, int):
            self.frame_size = (self.frame_size, self.frame_size)
        self.frame_size = tuple(int(s) for s in self.frame_size)
        if self.cyclic_length is None:
            self.cyclic_length = self.max_context_frames + self.chunk_frames
        self.validate()

    def validate(self):
        def bad(name, why):
            raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("in_channels", "patch", "hidden", "depth", "heads", "chunk_frames", "max_context_frames"):
            if getattr(self, name) < 1:
                bad(name, "must be at least 1")
        if len(self.frame_size) != 2 or min(self.frame_size) < 1:
            bad("frame_size", "must be (height, width) with positive sizes")
        if any(s % self.patch for s in self.frame_size):
            bad("frame_size", f"is not divisible by patch={self.patch}")
        if self.hidden % self.heads:
            bad("heads", f"does not divide hidden={self.hidden}")
        if self.hidden % 4:
            bad("hidden", "must be divisible by 4 (2-D sin-cos position embedding)")
        if self.mlp_ratio <= 0:
            bad("mlp_ratio", "must be positive")
        if self.prefix_frames < 0:
            bad("prefix_frames", "must be 0 or more")
        if self.max_context_frames < self.prefix_frames:
            bad("max_context_frames", f"is smaller than the {self.prefix_frames} given prefix frames")
        if self.positions not in ("cyclic", "rope"):
            bad("positions", "must be 'cyclic' or 'rope'")
        if self.positions == "cyclic" and self.cyclic_length < self.max_context_frames + self.chunk_frames:
            bad("cyclic_length", f"is shorter than max_context_frames + chunk_frames = "
                f"{self.max_context_frames + self.chunk_frames}: frames in one window would share a row")
        if self.positions == "rope" and (self.hidden // self.heads) % 2:
            bad("heads", "gives an odd head dimension, which RoPE cannot rotate")
        if self.conditioning not in ("none", "class", "text"):
            bad("conditioning", "must be 'none', 'class' or 'text'")
        if self.conditioning == "class" and self.num_classes < 1:
            bad("num_classes", "must be at least 1 for class conditioning")
        if self.conditioning == "text" and self.text_dim < 1:
            bad("text_dim", "must be at least 1 for text conditioning")
        if self.pooled_text and self.conditioning != "text":
            bad("pooled_text", f"needs conditioning 'text', got {self.conditioning!r}")
        if self.prefix_enhance and self.prefix_enhance_frames < 1:
            bad("prefix_enhance_frames", "must be at least 1 when prefix_enhance is on")
        if self.objective not in ("flow", "eps"):
            bad("objective", "must be 'flow' or 'eps'")
        if self.prediction not in ("native", "sample"):
            bad("prediction", "must be 'native' or 'sample'")
        if self.prediction == "sample" and self.objective != "flow":
            bad("prediction", "'sample' (x0 prediction) is defined for objective='flow' only")
        if not 0 < self.sample_sigma_min <= 1:
            bad("sample_sigma_min", "must be in (0, 1]")
        if self.ddim_spacing not in ("leading", "trailing"):
            bad("ddim_spacing", "must be 'leading' or 'trailing'")

    @property
    def tokens(self) -> int:
        """S, tokens per frame."""
        return (self.frame_size[0] // self.patch) * (self.frame_size[1] // self.patch)

    @property
    def layout(self) -> ChunkLayout:
        return ChunkLayout(self.prefix_frames, self.chunk_frames, self.max_context_frames)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["frame_size"] = list(self.frame_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        return cls(**coerce_fields(cls, d))


@dataclass
class Text:
    """Text token states (B, N, text_dim) with a boolean mask (B, N), True for real tokens."""

    states: torch.Tensor
    mask: torch.Tensor | None = None

    def __post_init__(self):
        if self.states.dim() != 3:
            raise ValueError(f"text states must be (batch, tokens, dim), got shape {tuple(self.states.shape)}")
        if self.mask is None:
            self.mask = torch.ones(self.states.shape[:2], dtype=torch.bool, device=self.states.device)
        if self.mask.shape != self.states.shape[:2]:
            raise ValueError(f"text mask shape {tuple(self.mask.shape)} does not match states {tuple(self.states.shape[:2])}")
        self.mask = self.mask.bool()

    @staticmethod
    def cat(texts: list["Text"]) -> "Text":
        """Stack along the batch, padding to the longest token count (padding masked out)."""
        n = max(t.states.shape[1] for t in texts)
        states = [F.pad(t.states, (0, 0, 0, n - t.states.shape[1])) for t in texts]
        masks = [F.pad(t.mask, (0, n - t.mask.shape[1]), value=False) for t in texts]
        return Text(torch.cat(states), torch.cat(masks))


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _causal_lower_right(lq: int, lk: int, device: torch.device) -> torch.Tensor:
    """(lq, lk) bool: query i sees keys up to lk - lq + i (queries are the last lq keys)."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(diagonal=lk - lq)


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
    ``causal_lower_right`` so fused kernels apply; on CPU a cached boolean mask. Under CPU bf16
    autocast the attention itself runs in float32 (bf16 SDPA is slow and loose on CPU).
    """
    if isinstance(mask, str):
        lq, lk = q.shape[-2], k.shape[-2]
        if q.is_cuda:
            from torch.nn.attention.bias import causal_lower_right
            mask = causal_lower_right(lq, lk)
        else:
            mask = _causal_lower_right(lq, lk, q.device)
    if q.device.type == "cpu" and _cpu_autocast_on():
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@dataclass
class FrameContext:
    """What a forward needs to know about the frames it processes.

    tpe: (F, D) cyclic rows or None. rope: (cos, sin) per frame or None. mask: (F, F) temporal
    attention set for a full-sequence forward. cache and write: the KV cache of a cached forward
    and whether this is the clean write pass.
    prefix_groups: full-sequence prefix enhancement, (query span, key span) in local indices.
    tap: a block whose gated temporal-attention residual is kept in ``tapped`` (step caching).
    """

    tpe: torch.Tensor | None = None
    rope: tuple | None = None
    mask: torch.Tensor | None = None
    cache: KVCache | None = None
    write: bool = False
    prefix_groups: list = field(default_factory=list)
    tap: int = -1
    tapped: torch.Tensor | None = None

    def rows(self, rows: list[int]) -> "FrameContext":
        """The context of a cached forward over some batch rows (positions are per frame)."""
        return replace(self, cache=self.cache.rows(rows), tapped=None)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class SpatialAttention(nn.Module):
    """Self-attention among the S tokens of each frame."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

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
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, h, ctx: FrameContext, block: int):  # h (B, F, S, D)
        B, Fr, S, D = h.shape
        H = self.heads
        q, k, v = self.qkv(h).view(B, Fr, S, 3, H, D // H).permute(3, 0, 2, 4, 1, 5)  # each (B, S, H, F, d)
        if ctx.rope is not None:  # keys are rotated at their absolute frame index before caching
            q, k = RoPE.rotate(q, *ctx.rope), RoPE.rotate(k, *ctx.rope)
        if ctx.cache is None:
            out = attend(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), ctx.mask)
        else:
            k, v = ctx.cache.stage(block, k, v)  # (B, S, H, n + F, d): window then this chunk
            k, v = k.to(q.dtype), v.to(q.dtype)  # no-op unless the cache has its own dtype
            out = attend(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), "causal")
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
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def keys(self, x):  # (B, F, S, D) -> k, v each (B, H, F, S, d)
        B, Fr, S, D = x.shape
        return self.kv(x).view(B, Fr, S, 2, self.heads, D // self.heads).permute(3, 0, 4, 1, 2, 5)

    def attend_to(self, x, k, v):  # x (B, F, S, D); k, v (B, H, m*S, d) -> (B, F, S, D)
        B, Fr, S, D = x.shape
        q = self.q(x).view(B, Fr * S, self.heads, D // self.heads).transpose(1, 2)
        out = attend(q, k, v)  # (B, H, F*S, d)
        return self.proj(out.transpose(1, 2).reshape(B, Fr, S, D))

    def forward(self, x, ctx: FrameContext, block: int):
        if ctx.cache is None:
            k, v = self.keys(x)
            out = torch.zeros_like(x)
            for (q0, q1), (k0, k1) in ctx.prefix_groups:
                kk, vv = k[:, :, k0:k1].flatten(2, 3), v[:, :, k0:k1].flatten(2, 3)
                out[:, q0:q1] = self.attend_to(x[:, q0:q1], kk, vv)
            return out
        cached = ctx.cache.prefix(block)
        out = self.attend_to(x, *(c.to(x.dtype) for c in cached)) if cached is not None else torch.zeros_like(x)
        if ctx.write:  # after reading: this chunk's frames become the prefix of the next ones
            ctx.cache.write_prefix(block, *self.keys(x))
        return out


class CrossAttention(nn.Module):
    """Attention from every token to the text tokens. Text K/V come precomputed (once per prompt)."""

    def __init__(self, dim, text_dim, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(text_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

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
        self.mlp = nn.Sequential(nn.Linear(D, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, D))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(D, 9 * D))

    def forward(self, x, c, cond, ctx: FrameContext, index: int):
        # x (B, F, S, D); c (B, F, D) per-frame time (+ label / pooled text) embedding
        s1, sc1, g1, st, sct, gt, s2, sc2, g2 = self.adaLN(c)[:, :, None].chunk(9, dim=-1)  # (B, F, 1, D)
        x = x + g1 * self.spatial(modulate(self.norm1(x), s1, sc1))
        if self.prefix is not None:
            x = x + self.prefix(self.norm_p(x), ctx, index)
        h = modulate(self.norm_t(x), st, sct)
        if ctx.tpe is not None:
            h = h + ctx.tpe[:, None, :]  # (F, 1, D)
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
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        dtype = self.mlp[0].weight.dtype
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
        args = t.to(torch.float64)[..., None] * freqs
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype)
        return self.mlp(emb)


@dataclass
class Condition:
    """Conditioning prepared once per prompt set: per-block text K/V and one vector per sample that is
    added to the timestep embedding (the adaLN input): the class embedding, or the pooled prompt."""

    kv: list | None = None           # per block (k, v), each (B, H, N, d)
    mask: torch.Tensor | None = None  # (B, 1, 1, N) bool
    vector: torch.Tensor | None = None  # (B, D)
    batch: int = 0

    def rows(self, rows: list[int]) -> "Condition":
        """The conditioning of some batch rows."""
        pick = (lambda t: None if t is None else t[rows])
        kv = None if self.kv is None else [(k[rows], v[rows]) for k, v in self.kv]
        return Condition(kv, pick(self.mask), pick(self.vector), len(rows))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class CausalVideoDiT(nn.Module):
    """Causal spatio-temporal DiT for autoregressive chunk-by-chunk video diffusion."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        cfg = self.config = config
        D, p, C = cfg.hidden, cfg.patch, cfg.in_channels
        self.layout = cfg.layout
        self.grid = (cfg.frame_size[0] // p, cfg.frame_size[1] // p)
        self.patch_embed = nn.Linear(C * p * p, D)
        self.register_buffer("spatial_pos", sincos_2d(*self.grid, D).float(), persistent=False)
        self.time_embed = TimestepEmbedder(D)
        self.label_embed = nn.Embedding(cfg.num_classes + 1, D) if cfg.conditioning == "class" else None
        self.null_text = nn.Parameter(torch.randn(1, cfg.text_dim) * 0.02) if cfg.conditioning == "text" else None
        self.text_pool = (nn.Sequential(nn.Linear(cfg.text_dim, D), nn.SiLU(), nn.Linear(D, D))
                          if cfg.pooled_text else None)
        self.tpe = CyclicTPE(cfg.cyclic_length, D) if cfg.positions == "cyclic" else None
        self.rope = RoPE(D // cfg.heads, cfg.rope_base) if cfg.positions == "rope" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.final_proj = nn.Linear(D, C * p * p)
        self.grad_checkpointing = False  # recompute block activations in backward (training only)
        self.step_cache: StepCache | None = None  # see enable_step_cache
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

    @staticmethod
    def cat_conditions(a: Condition, b: Condition) -> Condition:
        """Stack two conditions along the batch (guidance runs both branches as one 2B batch)."""
        out = Condition(batch=a.batch + b.batch)
        if a.vector is not None:
            out.vector = torch.cat([a.vector, b.vector])
        if a.kv is not None:
            n = max(a.mask.shape[-1], b.mask.shape[-1])
            pad = lambda t, n=n: F.pad(t, (0, 0, 0, n - t.shape[2]))  # noqa: E731  (B, H, N, d) tokens
            out.kv = [(torch.cat([pad(ka), pad(kb)]), torch.cat([pad(va), pad(vb)]))
                      for (ka, va), (kb, vb) in zip(a.kv, b.kv)]
            out.mask = torch.cat([F.pad(a.mask, (0, n - a.mask.shape[-1])), F.pad(b.mask, (0, n - b.mask.shape[-1]))])
        return out

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

    # -- shared pieces of both forwards -------------------------------------------------------
    def _check_input(self, x, t, cond):
        cfg = self.config
        if x.dim() != 5:
            raise ValueError(f"video must be (batch, channels, frames, height, width), got shape {tuple(x.shape)}")
        B, C, Fr, H, W = x.shape
        if C != cfg.in_channels or (H, W) != cfg.frame_size:
            raise ValueError(f"video has {C} channels of {H}x{W}; the model expects "
                             f"{cfg.in_channels} channels of {cfg.frame_size[0]}x{cfg.frame_size[1]}")
        if t.shape != (B, Fr):
            raise ValueError(f"timesteps must be per frame, shape ({B}, {Fr}), got {tuple(t.shape)}")
        if cond is not None and cond.batch != B:
            raise ValueError(f"conditioning is for batch {cond.batch}, video batch is {B}")

    def _embed(self, x, t, cond):
        """Tokens (B, F, S, D) and per-frame adaLN input c (B, F, D)."""
        tokens = self.patch_embed(self.patchify(x)) + self.spatial_pos.to(self.dtype)
        c = self.time_embed(t)
        if cond is not None and cond.vector is not None:
            c = c + cond.vector[:, None]
        return tokens, c

    def _positions(self, frames, shift: int):
        tpe = self.tpe(frames, shift).to(self.dtype) if self.tpe is not None else None
        rope = self.rope.angles(frames, self.dtype, self.device) if self.rope is not None else None
        return tpe, rope

    def _run(self, x, t, cond, ctx, return_hidden, skip_output=False):
        if cond is None:
            cond = self.condition(x.shape[0])
        h, c = self._embed(x, t, cond)
        hidden = []
        sc = self.step_cache
        if sc is not None and sc.active and ctx.cache is not None and not ctx.write and not return_hidden:
            h = self._blocks_step_cached(h, c, cond, ctx, sc)
        else:
            for i, block in enumerate(self.blocks):
                if self.grad_checkpointing and self.training and torch.is_grad_enabled() and ctx.cache is None:
                    h = torch.utils.checkpoint.checkpoint(block, h, c, cond, ctx, i, use_reentrant=False)
                else:
                    h = block(h, c, cond, ctx, i)
                if return_hidden:
                    hidden.append(h)
        if skip_output:
            out = None
        else:
            shift, scale = self.final_adaLN(c)[:, :, None].chunk(2, dim=-1)
            out = self.unpatchify(self.final_proj(modulate(self.final_norm(h), shift, scale)))
            if self.config.prediction == "sample":
                out = self.velocity_from_sample(x, out, t)
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

    def _blocks_step_cached(self, h, c, cond, ctx, sc: StepCache):
        """The block stack of a denoising step under step caching. h (B, F, S, D) embeddings.

        Rows the policy marks as due run the (skippable part of the) stack and their residual is
        kept; the other rows add the residual kept on their last computed step.
        """
        B = h.shape[0]
        sc.count_step(B)
        if sc.start:  # first-block: block 0 always runs, its residual decides
            h0, h = h, self.blocks[0](h, c, cond, ctx, 0)
            rows = sc.rows_after_first_block(h - h0)
        else:
            rows = sc.rows_to_compute()
        if not rows:
            return h + sc.residual.to(h.dtype)
        part = len(rows) < B
        hr, cr = (h[rows], c[rows]) if part else (h, c)
        ctx_r, cond_r = (ctx.rows(rows), cond.rows(rows)) if part else (ctx, cond)
        ctx_r.tap = -1 if sc.tap_block is None else sc.tap_block
        out = hr
        for i in range(sc.start, len(self.blocks)):
            out = self.blocks[i](out, cr, cond_r, ctx_r, i)
        sc.keep(rows, out - hr, ctx_r.tapped)
        if not part:
            return out
        h = h + sc.residual.to(h.dtype)
        h[rows] = out
        return h

    def enable_step_cache(self, config: "str | StepCacheConfig" = "adacache") -> StepCache:
        """Turn on training-free step caching for cached generation (``generate`` in ``shared`` mode).

        config: a ``StepCacheConfig`` or a spec string — ``adacache``, ``adacache-moreg``,
        ``fixed:N`` or ``first-block:THRESHOLD``. Returns the ``StepCache`` (its counters tell how
        many denoising steps ran the block stack). Write passes and plain forwards are unaffected.
        """
        self.step_cache = StepCache(StepCacheConfig.parse(config), self.config.depth)
        return self.step_cache

    def disable_step_cache(self) -> None:
        """Back to computing every denoising step."""
        self.step_cache = None

    # -- the two forwards ----------------------------------------------------------------------
    def forward(self, x, t, cond: Condition | None = None, start: int = 0, tpe_shift: int = 0,
                return_hidden: bool = False):
        """Full-sequence forward over frames [start, start + F) of a video.

        x: (B, C, F, H, W); t: (B, F) network time per frame (0 = clean). Temporal attention uses
        ``ChunkLayout.mask`` over these frames: frames before ``start`` are simply absent (the
        recompute-window baseline runs a window this way). ``tpe_shift`` rotates cyclic rows
        (training augmentation). Returns the prediction (B, C, F, H, W) [and per-block hidden].
        """
        self._check_input(x, t, cond)
        Fr = x.shape[2]
        frames = range(start, start + Fr)
        tpe, rope = self._positions(frames, tpe_shift)
        ctx = FrameContext(tpe, rope, mask=self.layout.mask(frames, frames, x.device))
        if self.config.prefix_enhance:
            ctx.prefix_groups = self.prefix_groups(frames)
        return self._run(x, t, cond, ctx, return_hidden)

    def forward_teacher_forcing(self, clean, noisy, t_noisy, cond: Condition | None = None, tpe_shift: int = 0,
                                return_hidden: bool = False):
        """All chunks at once: a clean clip and noisy copies of its generated frames in one pass.

        clean: (B, C, F, H, W) clean frames 0..F-1 (told time 0). noisy: (B, C, F - p, H, W) noisy
        copies of frames p..F-1 with network times ``t_noisy`` (B, F - p). Each noisy chunk attends to
        the clean frames of its window and causally to its own noisy frames (``teacher_forcing_mask``),
        so its prediction equals what the cached denoising step of that chunk computes.
        Returns the prediction for the noisy frames (B, C, F - p, H, W).
        """
        B, C, Fr = clean.shape[:3]
        p = min(self.config.prefix_frames, Fr)
        if noisy.shape[2] != Fr - p or noisy.shape[:2] != clean.shape[:2]:
            raise ValueError(f"noisy copies must cover frames {p}..{Fr - 1}: expected {Fr - p} frames, "
                             f"got shape {tuple(noisy.shape)}")
        x = torch.cat([clean, noisy], dim=2)
        t = torch.cat([t_noisy.new_zeros(B, Fr), t_noisy], dim=1)
        self._check_input(x, t, cond)
        frames = list(range(Fr)) + list(range(p, Fr))  # a noisy copy sits at its clean frame's position
        tpe, rope = self._positions(frames, tpe_shift)
        ctx = FrameContext(tpe, rope, mask=self.layout.teacher_forcing_mask(Fr, x.device))
        if self.config.prefix_enhance:
            noisy_groups = [((q0 + Fr, q1 + Fr), ks) for (q0, q1), ks in self.prefix_groups(range(p, Fr), 0)]
            ctx.prefix_groups = self.prefix_groups(range(Fr)) + noisy_groups  # noisy copies read clean keys
        result = self._run(x, t, cond, ctx, return_hidden)
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

    def forward_cached(self, x, t, cache: KVCache, cond: Condition | None = None, write: bool = False,
                       return_hidden: bool = False):
        """One chunk against the KV cache; the chunk's frames are the next ones after the cache.

        ``write=False``: a denoising step — the chunk attends to the cached window and to itself.
        ``write=True``: the clean write pass (t = 0) — the same attention, then the chunk's K/V are
        pushed into the cache (oldest frames evicted) and the frame counter advances; the network
        output is not needed and not computed. Returns the prediction (None when writing).
        """
        self._check_input(x, t, cond)
        if cache.batch != x.shape[0]:
            raise ValueError(f"cache is for batch {cache.batch}, video batch is {x.shape[0]}")
        Fr = x.shape[2]
        cache.check_chunk(Fr)
        frames = range(cache.frames_written, cache.frames_written + Fr)
        tpe, rope = self._positions(frames, 0)
        ctx = FrameContext(tpe, rope, cache=cache, write=write)
        result = self._run(x, t, cond, ctx, return_hidden, skip_output=write)
        if write:
            cache.advance(Fr)
        return result

    def new_cache(self, batch: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for ``batch`` videos (2x the videos with classifier-free guidance)."""
        cfg = self.config
        return KVCache(self.layout, cfg.depth, batch, cfg.tokens, cfg.heads, cfg.hidden // cfg.heads,
                       cfg.prefix_enhance_frames if cfg.prefix_enhance else 0,
                       dtype=dtype or self.dtype, device=self.device)
