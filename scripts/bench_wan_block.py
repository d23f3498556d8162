"""One Wan-1.3B block at full shape: ours, Self-Forcing's and diffusers', call by call (issue 24, item 3).

Usage (the reference is a scratch checkout OUTSIDE this repository, as for the parity script)::

    PYTHONPATH=. python scripts/bench_wan_block.py --reference /tmp/sf-ref            # ~10 min on 2 cores
    PYTHONPATH=. python scripts/bench_wan_block.py --reference /tmp/sf-ref --small    # seconds: parity

What is timed. Wan 2.1 T2V 1.3B's block shape (D 1536, 12 heads x 128, FFN 8960, text 512 positions
of 4096-wide states, latent frames of 60 x 104 = 30 x 52 = 1560 tokens) at depth 1, float32, chunks
of 3 latent frames and a window of 21 (18 cached + the chunk), the window pre-filled with 18 frames
of random K/V (the same values on both cached sides). One denoising call and one write (the clean
pass that puts the chunk's K/V into the cache) per implementation, the implementations alternated
(A B C A B C), then a third, profiled round for the breakdown:

* ours: ``CausalWan.forward_cached`` on a ``KVCache`` (denoise: ``write=False``; write:
  ``write=True``). Every write is undone outside the timed region: the cache's buffers are saved
  once after the pre-fill and copied back, and ``frames_written`` reset to 18, after each write, so
  every timed call sees the same window fill.
* theirs: Self-Forcing's ``CausalWanModel`` (``--reference``, loaded with the parity script's
  patches, imported from ``scripts/self_forcing_parity.py``), its cache of [B, 21 * 1560, 12, 128]
  pre-filled to 18 frames (``global_end_index`` = ``local_end_index`` = 18 * 1560), its forward at
  ``current_start`` = 18 frames: their denoising call, and, with t = 0, the call their pipeline
  makes to write the clean chunk (the same forward: their cache is written by every call). Their
  two end indices (and, in a local window, their buffers) are restored before each call, untimed.
  Their cross-attention cache is filled by an untimed warm-up call, as by their first step.
* diffusers: ``WanTransformer3DModel`` (the same weights through ``wan_weights.original_to_diffusers``)
  recomputing [window || chunk] = 21 frames without a cache, one timestep for all of them (it takes
  neither per-frame times nor a frame mask): what a diffusers user runs today for every denoising
  step. At full shape one call takes minutes on 2 cores, so it is timed at HALF the tokens per
  frame (latents 60 x 52 = 30 x 26 tokens, labelled) and scaled to the full shape as an estimate:
  its measured self-attention kernel time x 4 (quadratic in tokens) plus everything else x 2
  (linear), the split taken from its profiled call. A step is 4 of its calls (nothing to write).

A step is 4 denoising calls + 1 write (Self-Forcing's 4-step sampler). Ratios come from this run.
Every call's wall seconds (the figures) and this process's CPU seconds (all threads) are recorded,
with the load averages: on a shared machine the CPU seconds show what waiting for a core added.

``--mode local12_sink3`` (LongLive's setting): theirs with ``local_attn_size`` 12 and ``sink_size``
3, a full cache of 12 frames [sink | the 3 frames their roll evicts | 6 recent]; ours
``WanConfig(max_context_frames=12, sink_frames=3)``, the same sink and recent frames in 3 sink
slots + a ring of 6 (+ 3 staging slots). The chunk is frames 18-20 on both sides. Their first call
of a chunk rolls their cache (a copy of the 6 recent frames) and is timed apart
(``denoise_evicting``); their calls 2-4 and the write find it rolled: their step is that first
call + 3 calls + the write. diffusers recomputes the 12 frames.

Breakdown (profiled round): ``torch.profiler`` CPU activity, every op's self time counted once, in
the category of its innermost enclosing marker: attention = the SDPA op with everything under it
(self- and cross-attention told apart by the key length); GEMMs = aten::addmm / mm / bmm / linear;
RoPE, cache write / roll and host syncs = ``record_function`` ranges put around, at run time:
ours ``wan.rotate`` and ``WanTransformer.rope`` (RoPE), ``KVCache.stage`` / ``commit`` (cache);
theirs ``causal_rope_apply`` (RoPE) and every ``__setitem__`` / ``clone`` on their K/V buffers (the
buffers we pass are a ``torch.Tensor`` subclass whose ``__torch_function__`` opens the range);
for both, ``Tensor.item`` and ``Tensor.tolist`` (host syncs, also counted). Everything else
(norms, modulation, GELU, residual adds, layout copies, patch embedding, head) is "other". These
hooks only add markers; the values computed are unchanged. The profiled call's own wall time is
reported beside the plain rounds' (the profiler's overhead).

Also reported: cache bytes (ours against ``KVCache.formula_bytes()`` / ``window_bytes()``, and
their preallocated [B, 21 * 1560, 12, 128] x 2 per block), the FLOPs of a call counted from the
shapes, and a roofline PROJECTION for the full 30-block model on one H100 (FLOPs per chunk over
989 TFLOP/s dense bf16 at an assumed MFU), beside Self-Forcing's published 17 FPS.

``--small``: a reduced shape (seconds) at which ours and theirs must agree to 1e-4 relative
(the denoising output, and the K/V each write leaves in its cache), and ours (full-sequence
forward, no mask) against diffusers: the timed calls compute the same thing.
"""

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import self_forcing_parity as sfp  # noqa: E402  (the reference's loader and its patches)

CHUNK, WINDOW, CACHED = 3, 21, 18          # latent frames: a chunk, the attention window, cached before it
T_DENOISE, T_WRITE = 937.5, 0.0           # a denoising level (exact in float32) and the clean write's
SHAPES = {  # the block shape; frame: latent (H, W); diffusers_frame: the latents its recompute is timed at
    "full": dict(dim=1536, heads=12, ffn=8960, text_dim=4096, text_len=512, frame=(60, 104),
                 diffusers_frame=(60, 52)),
    "small": dict(dim=128, heads=2, ffn=256, text_dim=64, text_len=32, frame=(8, 12), diffusers_frame=(8, 12)),
}
MODES = {"global": dict(local=-1, sink=0),          # their local_attn_size / sink_size
         "local12_sink3": dict(local=12, sink=3)}   # LongLive's setting: 3 sink frames + 6 recent + the chunk
H100_BF16_DENSE = 989e12                   # FLOP/s, NVIDIA's published dense bf16 (SXM)
SF_PUBLISHED_FPS = 17.0                    # Self-Forcing's paper: 17 FPS on one H100
PARITY_BOUND = 1e-4


# -- timing --------------------------------------------------------------------------------------
def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> tuple[float, float, object]:
    """(wall seconds, this process's CPU seconds, result) of one call, the device synchronised on
    both sides. CPU seconds count every thread: on a shared machine, wall much above CPU / threads
    means the call waited for a core."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, out


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- the three implementations -------------------------------------------------------------------
def random_weights(model: torch.nn.Module, seed: int) -> None:
    """Their init (xavier, zero biases and output layer; the caller seeds the global RNG) plus
    noise on every parameter, std 0.02 (vectors) or 0.5 / sqrt(fan_in) (matrices), so that nothing
    is zero; in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = 0.02 if p.dim() < 2 else p.shape[-1] ** -0.5 * 0.5
            p.add_(torch.randn(p.shape, generator=g) * scale)


def theirs_model(ref: dict, shape: dict, mode: dict, seed: int):
    """Their ``CausalWanModel`` at depth 1 and ``shape``, random weights, patch 5 applied."""
    torch.manual_seed(seed)
    model = ref["causal_model"].CausalWanModel(
        model_type="t2v", patch_size=(1, 2, 2), text_len=shape["text_len"], in_dim=16, dim=shape["dim"],
        ffn_dim=shape["ffn"], freq_dim=256, text_dim=shape["text_dim"], out_dim=16, num_heads=shape["heads"],
        num_layers=1, local_attn_size=mode["local"], sink_size=mode["sink"], qk_norm=True, cross_attn_norm=True,
        eps=1e-6)
    random_weights(model, seed)
    sfp.set_attention_sizes(model, mode["local"], tokens_per_frame(shape["frame"]))
    return model.eval()


def tokens_per_frame(frame) -> int:
    return (frame[0] // 2) * (frame[1] // 2)


def wan_config(shape: dict, mode: dict):
    from ca2vdm.wan import WanConfig

    window = WINDOW if mode["local"] == -1 else mode["local"]
    return WanConfig(num_attention_heads=shape["heads"], attention_head_dim=shape["dim"] // shape["heads"],
                     text_dim=shape["text_dim"], ffn_dim=shape["ffn"], num_layers=1, cross_attn_norm=True, eps=1e-6,
                     text_len=shape["text_len"], chunk_frames=CHUNK, max_context_frames=window,
                     sink_frames=mode["sink"])


def ours_model(theirs, shape: dict, mode: dict, tmp: Path):
    """Their weights written in Wan's own layout and read by ``load_wan`` (as the parity script does)."""
    from safetensors.torch import save_file

    from ca2vdm.causal_wan import CausalWan, CausalWanConfig
    from ca2vdm.wan_weights import load_wan

    cfg = wan_config(shape, mode)
    path = tmp / "block.safetensors"
    save_file({k: v.detach().contiguous() for k, v in theirs.state_dict().items()}, str(path))
    with contextlib.redirect_stderr(io.StringIO()):
        tr = load_wan(path, cfg, chunk_frames=cfg.chunk_frames, max_context_frames=cfg.max_context_frames,
                      sink_frames=cfg.sink_frames)
    path.unlink()
    return CausalWan(CausalWanConfig(cfg, frame_size=shape["frame"]), tr).eval()


def diffusers_model(theirs, shape: dict, mode: dict):
    """diffusers' ``WanTransformer3DModel`` with the same weights (key names converted by diffusers)."""
    from diffusers import WanTransformer3DModel

    from ca2vdm.wan_weights import original_to_diffusers

    model = WanTransformer3DModel(**wan_config(shape, mode).to_diffusers())
    model.load_state_dict(original_to_diffusers({k: v.detach().clone() for k, v in theirs.state_dict().items()}),
                          strict=True)
    return model.eval()


class Inputs:
    """Everything the calls read, from one seed: the chunk, the text states, the cached window K/V."""

    def __init__(self, shape: dict, seed: int, device, dtype, frames: int = WINDOW):
        g = torch.Generator().manual_seed(seed)
        H, W = shape["frame"]
        S, heads, d = tokens_per_frame(shape["frame"]), shape["heads"], shape["dim"] // shape["heads"]
        r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
        self.x = r(1, 16, CHUNK, H, W)
        self.states = r(1, shape["text_len"], shape["text_dim"])          # all 512 positions
        self.window_k = r(1, heads, CACHED, S, d)                          # (B, H, frames, S, d), rotated keys
        self.window_v = r(1, heads, CACHED, S, d)
        self.x_recompute = r(1, 16, frames, *shape["diffusers_frame"])  # [window || chunk]
        self.S, self.heads, self.d = S, heads, d


class Ours:
    """Our engine's two calls on a pre-filled cache; ``reset`` undoes a write (untimed)."""

    name = "ours"

    def __init__(self, model, inputs: Inputs):
        self.model, self.inp = model, inputs
        B = 1
        self.cache = c = model.new_cache(B)
        n = c.capacity  # window slots: 18 (global), or 3 sink + 6 recent (local 12 + sink 3)
        for k, v in zip(c.k, c.v):
            c.slots(k, 0, n).copy_(inputs.window_k[:, :, :n])
            c.slots(v, 0, n).copy_(inputs.window_v[:, :, :n])
        c.advance(CACHED)  # the chunk is frames 18-20, as theirs at current_start = 18 frames
        self.saved = [b.clone() for b in c.k + c.v + getattr(c, "sink_k", [])]
        self.counters = {k: v for k, v in vars(c).items() if isinstance(v, int)}
        self.cond = model.transformer.condition(inputs.states)  # text K/V: once per prompt
        dev, self.t = inputs.x.device, {}
        for name, t in (("denoise", T_DENOISE), ("write", T_WRITE)):
            self.t[name] = torch.full((B, CHUNK), t, dtype=torch.float64, device=dev)

    def denoise(self):
        return self.model.forward_cached(self.inp.x, self.t["denoise"], self.cache, self.cond)

    def write(self):
        return self.model.forward_cached(self.inp.x, self.t["write"], self.cache, self.cond, write=True)

    def reset(self, call: str = "denoise"):
        """Undo a write (untimed): the buffers copied back, the counters as after the pre-fill."""
        c = self.cache
        for b, s in zip(c.k + c.v + getattr(c, "sink_k", []), self.saved):
            b.copy_(s)
        vars(c).update(self.counters)
        c._staged.clear()

    def written(self):
        """The chunk's K/V as the write left them in the ring, in their layout (B, q*S, H, d)."""
        c = self.cache
        slot = getattr(c, "slot_of", lambda f: f % c.capacity)
        slots = [slot(CACHED + i) for i in range(CHUNK)]
        f = lambda buf: buf[:, :, slots].permute(0, 2, 3, 1, 4).flatten(1, 2)  # noqa: E731
        return f(c.k[0]), f(c.v[0])

    def cache_bytes(self) -> dict:
        c = self.cache
        return dict(nbytes=c.nbytes, formula_bytes=c.formula_bytes(), window_bytes=c.window_bytes(),
                    equal_to_formula=c.nbytes == c.formula_bytes())


class _CacheBuffer(torch.Tensor):
    """Their K/V buffer under a ``record_function`` range on writes (``__setitem__``) and rolls
    (``clone``) when ``MARK`` is set; every result is a plain tensor, values unchanged."""

    MARK = False

    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        mark = cls.MARK and func in (torch.Tensor.__setitem__, torch.Tensor.clone)
        with torch.profiler.record_function(CACHE_RANGE) if mark else contextlib.nullcontext():
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
        if func is torch.Tensor.__getitem__ and isinstance(out, torch.Tensor):  # a slice stays marked (the roll)
            return out.as_subclass(cls)
        return out


class Theirs:
    """Self-Forcing's forward on their cache pre-filled to 18 frames."""

    name = "theirs"

    def __init__(self, model, inputs: Inputs, mode: dict, dtype):
        self.model, self.inp = model, inputs
        S, dev = inputs.S, inputs.x.device
        self.kv = sfp.their_kv_cache(1, 1, mode["local"], S, inputs.heads, inputs.d, dtype, dev)
        to_theirs = lambda w: w.permute(0, 2, 3, 1, 4).flatten(1, 2)  # noqa: E731 (B,H,F,S,d) -> (B,F*S,H,d)
        self.local, sink = mode["local"], mode["sink"]
        for c in self.kv:
            for name, w in (("k", inputs.window_k), ("v", inputs.window_v)):
                if self.local == -1:  # global: 18 frames written, room for the chunk after them
                    c[name][:, :CACHED * S] = to_theirs(w)
                else:  # full: [sink | the chunk-long run their roll evicts | recent]; the same frames as ours
                    recent = self.local - CHUNK - sink
                    c[name][:, :sink * S] = to_theirs(w[:, :, :sink])
                    c[name][:, sink * S:(sink + CHUNK) * S] = to_theirs(w[:, :, -CHUNK:])  # evicted: any values
                    c[name][:, (self.local - recent) * S:] = to_theirs(w[:, :, sink:sink + recent])
            c["k"], c["v"] = c["k"].as_subclass(_CacheBuffer), c["v"].as_subclass(_CacheBuffer)
        self.saved = [(c["k"].clone().as_subclass(torch.Tensor), c["v"].clone().as_subclass(torch.Tensor))
                      for c in self.kv] if self.local != -1 else None
        heads, d, L = inputs.heads, inputs.d, model.text_len
        self.cross = [{"k": torch.zeros(1, L, heads, d, dtype=dtype, device=dev),
                       "v": torch.zeros(1, L, heads, d, dtype=dtype, device=dev), "is_init": False}]
        self.t = {name: torch.full((1, CHUNK), t, dtype=torch.float32, device=dev)
                  for name, t in (("denoise", T_DENOISE), ("write", T_WRITE))}
        self.start = CACHED * S
        self.reset("denoise_evicting")

    def _call(self, t):
        return self.model(self.inp.x, t=t, context=self.inp.states, seq_len=WINDOW * self.inp.S,
                          kv_cache=self.kv, crossattn_cache=self.cross, current_start=self.start)

    def denoise(self):
        """A denoising call; in a local window one of steps 2-4 (their cache already rolled)."""
        return self._call(self.t["denoise"])

    def denoise_evicting(self):
        """A local window's first denoising call of a chunk: it rolls their cache (evicts 3 frames)."""
        return self._call(self.t["denoise"])

    def write(self):
        """Their clean pass (context_noise = 0), its output unused; in a local window after the roll."""
        return self._call(self.t["write"])

    def reset(self, call: str = "denoise"):
        """The pre-filled state as ``call`` finds it: in a local window ``denoise_evicting`` (a chunk's
        first call) before their roll, ``denoise`` and ``write`` after it (their end indices at the
        chunk's end: no roll); in the global window every call finds the same state."""
        rolled = self.local != -1 and call != "denoise_evicting"
        for i, c in enumerate(self.kv):
            c["global_end_index"].fill_(self.start + (CHUNK * self.inp.S if rolled else 0))
            c["local_end_index"].fill_(min(self.start, c["k"].shape[1]))
            if self.saved is not None:
                with torch._C.DisableTorchFunctionSubclass():
                    c["k"].copy_(self.saved[i][0])
                    c["v"].copy_(self.saved[i][1])

    def written(self):
        end = int(self.kv[0]["local_end_index"])
        with torch._C.DisableTorchFunctionSubclass():
            return (self.kv[0]["k"][:, end - CHUNK * self.inp.S:end].clone(),
                    self.kv[0]["v"][:, end - CHUNK * self.inp.S:end].clone())

    def cache_bytes(self) -> dict:
        n = sum(c[k].numel() * c[k].element_size() for c in self.kv for k in ("k", "v"))
        return dict(nbytes=n, shape_per_block=list(self.kv[0]["k"].shape))


class Diffusers:
    """diffusers recomputing the 21-frame window with the chunk, no cache (its write: nothing)."""

    name = "diffusers"

    def __init__(self, model, inputs: Inputs, dtype):
        self.model, self.inp = model, inputs
        self.t = torch.full((1,), T_DENOISE, dtype=torch.float32, device=inputs.x.device)

    def denoise(self):
        return self.model(self.inp.x_recompute, self.t, self.inp.states, return_dict=False)[0]

    def reset(self, call: str = "denoise"):
        pass


# -- the breakdown -------------------------------------------------------------------------------
ROPE_RANGE, CACHE_RANGE, SYNC_RANGE = "bench: rope", "bench: cache write", "bench: host sync"
RANGES = {ROPE_RANGE: "rope", CACHE_RANGE: "cache write / roll", SYNC_RANGE: "host syncs"}
SDPA_OPS = {"aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_attention_math", "aten::_scaled_dot_product_efficient_attention",
            "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_cudnn_attention"}
GEMM_OPS = {"aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
            "aten::addmv", "aten::mv"}
SYNC_OPS = {"aten::item", "aten::_local_scalar_dense"}
CATEGORIES = ["attention (self)", "attention (cross)", "GEMMs (linears)", "rope", "cache write / roll",
              "host syncs", "other"]


def _ranged(name: str, fn):
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)
    wrapper.__wrapped__ = fn
    return wrapper


@contextlib.contextmanager
def markers(ref: dict, counts: dict):
    """The breakdown's ranges (see the module docstring), put in place for the profiled round only,
    and the host-sync counter: ``counts['item']`` / ``counts['tolist']`` calls."""
    import ca2vdm.wan as wan_mod
    from ca2vdm.cache import KVCache

    cm = ref["causal_model"]
    item, tolist = torch.Tensor.item, torch.Tensor.tolist

    def counted(kind, fn):
        def wrapper(self, *a, **kw):
            counts[kind] = counts.get(kind, 0) + 1
            with torch.profiler.record_function(SYNC_RANGE):
                return fn(self, *a, **kw)
        return wrapper

    saved = [(wan_mod, "rotate"), (wan_mod.WanTransformer, "rope"), (KVCache, "stage"), (KVCache, "commit"),
             (cm, "causal_rope_apply")]
    originals = [getattr(obj, attr) for obj, attr in saved]
    try:
        for (obj, attr), fn in zip(saved, originals):
            setattr(obj, attr, _ranged(CACHE_RANGE if obj is KVCache else ROPE_RANGE, fn))
        torch.Tensor.item, torch.Tensor.tolist = counted("item", item), counted("tolist", tolist)
        _CacheBuffer.MARK = True
        yield
    finally:
        for (obj, attr), fn in zip(saved, originals):
            setattr(obj, attr, fn)
        torch.Tensor.item, torch.Tensor.tolist = item, tolist
        _CacheBuffer.MARK = False


def categorize(events, text_len: int) -> dict:
    """Milliseconds of self time per category (see the module docstring); every op counted once."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for e in events:
        chain, node = [], e
        while node is not None:
            chain.append(node)
            node = node.cpu_parent
        sdpa = next((n for n in reversed(chain) if n.name in SDPA_OPS), None)  # the outermost SDPA op
        if sdpa is not None:
            keys = sdpa.input_shapes[1][-2] if sdpa.input_shapes and len(sdpa.input_shapes) > 1 \
                and sdpa.input_shapes[1] else -1
            cat = "attention (cross)" if keys == text_len else "attention (self)"
        elif any(n.name in SYNC_OPS for n in chain):
            cat = "host syncs"
        else:
            cat = next((RANGES[n.name] if n.name in RANGES else "GEMMs (linears)" for n in chain
                        if n.name in RANGES or n.name in GEMM_OPS), "other")
        out[cat] += e.self_cpu_time_total / 1e3
    return {k: round(v, 1) for k, v in out.items()}


def profiled(fn, ref: dict, text_len: int) -> dict:
    """One call under the CPU profiler and the markers: wall ms, the breakdown, host-sync counts."""
    from torch.profiler import ProfilerActivity, profile

    counts = {}
    with markers(ref, counts), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    breakdown = categorize(prof.events(), text_len)
    return dict(wall_ms=round(wall * 1e3, 1), breakdown_ms=breakdown,
                sum_ms=round(sum(breakdown.values()), 1),
                host_sync_calls=dict(item=counts.get("item", 0), tolist=counts.get("tolist", 0)))


# -- FLOPs and the projection --------------------------------------------------------------------
def call_flops(dim: int, ffn: int, tokens: int, keys: int, text_len: int, blocks: int = 1) -> dict:
    """Multiply-adds x 2 of one forward over ``tokens`` query tokens seeing ``keys`` self-attention
    keys: linears (q, k, v, o; cross q, o; FFN), self-attention (QK^T and PV), cross-attention over
    ``text_len`` positions (its text K/V are cached per prompt, not counted). Per block, x blocks."""
    lin = 2 * tokens * (6 * dim * dim + 2 * dim * ffn)
    self_attn = 4 * tokens * keys * dim
    cross = 4 * tokens * text_len * dim
    return {k: v * blocks for k, v in dict(linears=lin, self_attention=self_attn, cross_attention=cross,
                                            total=lin + self_attn + cross).items()}


def projection(mfu: float, window: int = WINDOW) -> dict:
    """Full 30-block Wan-1.3B on one H100, bf16: FLOPs per chunk (4 calls + 1 write) over 989 TFLOP/s
    x ``mfu``, chunks seeing ``window`` frames (themselves included). A PROJECTION, not a
    measurement; VAE decode and the text encoder not counted."""
    S, blocks = 1560, 30
    per_chunk = lambda window: 5 * call_flops(1536, 8960, CHUNK * S, window * S, 512, blocks)["total"]  # noqa: E731
    full = per_chunk(window)
    video = sum(per_chunk(min(CHUNK * (k + 1), window)) for k in range(7))  # 81 frames: chunks see 3, 6, ... frames
    rate = H100_BF16_DENSE * mfu
    return dict(label="PROJECTION (roofline, not measured)", blocks=blocks, mfu_assumed=mfu,
                peak_flops=H100_BF16_DENSE, tflop_per_chunk_full_window=round(full / 1e12, 1),
                seconds_per_chunk_full_window=round(full / rate, 3),
                fps_full_window=round(12 / (full / rate), 1),
                tflop_per_81_frame_video=round(video / 1e12, 1),
                fps_81_frame_video=round(81 / (video / rate), 1),
                self_forcing_published_fps=SF_PUBLISHED_FPS,
                note=f"12 pixel frames per chunk of 3 latent frames (Wan's VAE: 4x in time); the 81-frame video "
                     f"is 7 chunks seeing 3, 6, ... frames, at most {window}; VAE decode and the text encoder excluded")


# -- parity at --small ---------------------------------------------------------------------------
def rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def parity(ours: Ours, theirs: Theirs, diffusers: Diffusers, ours_model, inputs: Inputs) -> dict:
    """Ours against theirs (a chunk's first denoising output; the K/V its write leaves) and ours
    (full-sequence forward, no mask) against diffusers over the recomputed frames."""
    with torch.no_grad():
        ours.reset(), theirs.reset("denoise_evicting")
        out = dict(denoise=rel(ours.denoise(), theirs.denoise_evicting()))  # a chunk's first call
        ours.write(), theirs.write()  # theirs: as their pipeline, after its first call (rolled, if local)
        (ok_, ov), (tk, tv) = ours.written(), theirs.written()
        out["write_k"], out["write_v"] = rel(ok_, tk), rel(ov, tv)
        ours.reset(), theirs.reset()
        x = inputs.x_recompute
        t = torch.full(x.shape[:1] + x.shape[2:3], T_DENOISE, dtype=torch.float64, device=x.device)
        full = ours_model.transformer(x, t, inputs.states, mask=None)
        out["ours_full_forward_vs_diffusers"] = rel(full, diffusers.denoise())
    out["ok"] = max(out.values()) <= PARITY_BOUND
    return out


# -- main ----------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", required=True, type=Path, help="a checkout of github.com/guandeh17/Self-Forcing")
    p.add_argument("--mode", choices=sorted(MODES), default="global")
    p.add_argument("--small", action="store_true", help="a reduced shape: seconds, and the parity checks")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--diffusers-full", action="store_true",
                   help="time diffusers at the full tokens per frame (a GPU; on 2 CPU cores minutes per call)")
    p.add_argument("--mfu", type=float, default=0.4, help="the projection's assumed model FLOP utilisation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON (default docs/bench_wan_block_cpu.json; "
                   "--small: none unless given)")
    a = p.parse_args(argv)
    from ca2vdm.bench import device_name

    load_start = loadavg()
    sys.dont_write_bytecode = True  # no __pycache__ in the reference checkout
    dtype, dev = getattr(torch, a.dtype), torch.device(a.device)
    shape = dict(SHAPES["small" if a.small else "full"])
    if a.diffusers_full:
        shape["diffusers_frame"] = shape["frame"]
    mode = MODES[a.mode]
    ref = sfp.load_reference(a.reference.resolve())
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        their_net = theirs_model(ref, shape, mode, a.seed)
        our_net = ours_model(their_net, shape, mode, Path(tmp))
        diff_net = diffusers_model(their_net, shape, mode)
    if (dev.type, dtype) != ("cpu", torch.float32):  # built on the CPU in float32
        their_net, our_net, diff_net = (m.to(dev, dtype) for m in (their_net, our_net, diff_net))
    window = WINDOW if mode["local"] == -1 else mode["local"]  # frames a chunk's queries see, itself included
    inputs = Inputs(shape, a.seed + 1, dev, dtype, frames=window)
    ours, theirs = Ours(our_net, inputs), Theirs(their_net, inputs, mode, dtype)
    diffusers = Diffusers(diff_net, inputs, dtype)
    S, text_len = inputs.S, shape["text_len"]
    print(f"{device_name(a.device)}; torch {torch.__version__}; {a.mode}; "
          f"{'SMALL' if a.small else 'full'} shape {shape}; load {load_start}", flush=True)

    report = dict(what="one Wan block (depth 1): a denoising call and a write per implementation, window "
                       "pre-filled with 18 of 21 frames", mode=a.mode, shape=shape, tokens_per_frame=S,
                  diffusers_tokens_per_frame=tokens_per_frame(shape["diffusers_frame"]),
                  chunk_frames=CHUNK, window_frames=window, cached_frames=CACHED, dtype=a.dtype,
                  device=device_name(a.device), torch=torch.__version__, threads=torch.get_num_threads(),
                  reference=sfp.reference_commit(a.reference.resolve()), patches=sfp.PATCHES,
                  load_average_start=load_start)
    if a.small:
        report["parity"] = parity(ours, theirs, diffusers, our_net, inputs)
        print("parity (max |a - b| / max |b|): " + ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}"
                                                           for k, v in report["parity"].items()), flush=True)

    # warm-up (untimed): allocator, oneDNN primitives, their cross-attention cache
    for impl in (ours, theirs):
        impl.denoise()
        impl.reset()
    local = mode["local"] != -1  # their local window: a chunk's first call rolls their cache, the others not
    calls = {"ours": ("denoise", "write"), "diffusers": ("denoise",),
             "theirs": ("denoise", "write") + (("denoise_evicting",) if local else ())}
    impls = {"ours": ours, "theirs": theirs, "diffusers": diffusers}
    rounds, rounds_cpu = [], []
    for r in range(2):
        row, row_cpu = {}, {}
        for name, impl in impls.items():
            for call in calls[name]:
                impl.reset(call)
                s, cpu, _ = timed(getattr(impl, call), dev)
                impl.reset()
                row[f"{name} {call}"], row_cpu[f"{name} {call}"] = round(s * 1e3, 1), round(cpu * 1e3, 1)
                print(f"round {r + 1}: {name} {call} {s * 1e3:.1f} ms (CPU {cpu * 1e3:.1f} ms)  "
                      f"(load {loadavg()})", flush=True)
        rounds.append(row)
        rounds_cpu.append(row_cpu)
    ms = {k: round(sum(row[k] for row in rounds) / len(rounds), 1) for k in rounds[0]}

    breakdown = {}
    if dev.type == "cpu":
        for name, impl in impls.items():
            for call in calls[name]:
                impl.reset(call)
                breakdown[f"{name} {call}"] = profiled(getattr(impl, call), ref, text_len)
                impl.reset()
                print(f"profiled: {name} {call} {breakdown[f'{name} {call}']}", flush=True)

    step = {name: 4 * ms[f"{name} denoise"] + ms.get(f"{name} write", 0.0) for name in impls}
    if local:  # theirs: the chunk's first call rolls, the next 3 and the write do not
        step["theirs"] = ms["theirs denoise_evicting"] + 3 * ms["theirs denoise"] + ms["theirs write"]
    step = {k: round(v, 1) for k, v in step.items()}
    diff_scale = None
    if shape["diffusers_frame"] != shape["frame"]:
        b = breakdown.get("diffusers denoise")
        k = tokens_per_frame(shape["frame"]) / tokens_per_frame(shape["diffusers_frame"])
        attn = b["breakdown_ms"]["attention (self)"] / b["sum_ms"] if b else 0.5
        diff_scale = dict(tokens_ratio=k, self_attention_fraction=round(attn, 3),
                          factor=round(attn * k * k + (1 - attn) * k, 3),
                          label="ESTIMATE: measured at half the tokens per frame, self-attention x4, the rest x2")
        step["diffusers (full shape, estimate)"] = round(4 * ms["diffusers denoise"] * diff_scale["factor"], 1)
    ours_step = step["ours"]
    diff_key = "diffusers (full shape, estimate)" if diff_scale else "diffusers"
    ratios = dict(step_ours_over_theirs=round(ours_step / step["theirs"], 3),
                  step_ours_over_diffusers=round(ours_step / step[diff_key], 3),
                  denoise_ours_over_theirs=round(ms["ours denoise"] / ms["theirs denoise"], 3),
                  write_ours_over_theirs=round(ms["ours write"] / ms["theirs write"], 3))
    q_tokens = CHUNK * S
    keys = window * S
    flops = call_flops(shape["dim"], shape["ffn"], q_tokens, keys, text_len)
    report.update(
        rounds_ms=rounds, rounds_cpu_ms=rounds_cpu, mean_ms=ms, step_ms=step, diffusers_scaling=diff_scale,
        ratios=ratios,
        goals=dict(step_le_1x_theirs=ratios["step_ours_over_theirs"] <= 1.0,
                   step_le_0_2x_diffusers=ratios["step_ours_over_diffusers"] <= 0.2,
                   cache_bytes_equal_formula=ours.cache_bytes()["equal_to_formula"]),
        breakdown=breakdown, breakdown_method="torch.profiler CPU activity, self time per op in the category of its "
        "innermost marker (module docstring); host syncs also counted by patched Tensor.item / Tensor.tolist",
        cache_bytes=dict(ours=ours.cache_bytes(), theirs=theirs.cache_bytes()),
        flops_per_call=flops,
        gflops_per_s={k: round(flops["total"] / (v / 1e3) / 1e9, 1) for k, v in ms.items()
                      if not k.startswith("diffusers")},
        projection=projection(a.mfu, window), load_average_end=loadavg(),
        command="PYTHONPATH=. python scripts/bench_wan_block.py "
                + " ".join(argv if argv is not None else sys.argv[1:]))
    print(json.dumps({k: report[k] for k in ("mean_ms", "step_ms", "ratios", "goals", "cache_bytes", "projection",
                                             "load_average_end")}, indent=1))
    out = a.out or (None if a.small else Path(f"docs/bench_wan_block_{dev.type}.json"))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return 0 if not a.small or report["parity"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
