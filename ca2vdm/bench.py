"""Benchmark: wall time per autoregressive step for the three generation modes and the limit.

A random-weight model of a preset generates the same video in every mode, each mode in its own
process so that its peak memory is its own. Reported per mode: seconds per autoregressive step
(denoising steps plus the write pass of that chunk), total seconds, cache bytes and peak memory;
and the *limit*: the same T denoising forwards over the chunk alone (no context) plus one write
pass — what a chunk would cost if context were free. Ratios are computed within one run.
"""

import multiprocessing as mp
import platform
import resource
import statistics
import time
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .generate import MODES, GenerationStats, generate
from .model import CausalVideoDiT

# The paper's temporal layout (1 given frame, l = 8, P_max = 25, TPE of 33) with three bodies.
_LAYOUT = dict(in_channels=4, patch=2, chunk_frames=8, prefix_frames=1, max_context_frames=25,
               positions="cyclic", conditioning="none")
PRESETS = {
    "tiny": dict(_LAYOUT, frame_size=8, hidden=64, depth=2, heads=2),
    "small": dict(_LAYOUT, frame_size=16, hidden=384, depth=12, heads=6),
    "paper": dict(_LAYOUT, frame_size=32, hidden=1152, depth=28, heads=16),
}


def preset_config(name: str, context: str = "bounded", frames: int = 80) -> ModelConfig:
    """The preset's config; ``context='unbounded'`` makes P_max cover the whole video."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    kw = dict(PRESETS[name])
    if context == "unbounded":
        kw["max_context_frames"] = frames
    elif context != "bounded":
        raise ValueError(f"context must be 'bounded' or 'unbounded', got {context!r}")
    return ModelConfig(**kw)


def _peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def run_mode(config: dict, mode: str, frames: int, steps: int, device: str, dtype: str) -> dict:
    """Time one mode (or ``'limit'``) in this process; returns the per-mode JSON record."""
    torch.manual_seed(0)
    model = CausalVideoDiT(ModelConfig(**config)).to(device=device, dtype=getattr(torch, dtype)).eval()
    cfg = model.config
    first = torch.randn(1, cfg.in_channels, cfg.prefix_frames, *cfg.frame_size, device=device, dtype=model.dtype)
    record = dict(step_seconds=[], total_seconds=0.0, cache_bytes=0, peak_mem_bytes=0)
    warm = cfg.prefix_frames + 2 * cfg.chunk_frames  # warm-up: allocator, kernels, thread pools
    for _ in generate(model, warm, first_frames=first, steps=1, mode="shared" if mode == "limit" else mode):
        pass
    if mode == "limit":
        n_chunks = -(-(frames - cfg.prefix_frames) // cfg.chunk_frames)
        x = torch.randn(1, cfg.in_channels, cfg.chunk_frames, *cfg.frame_size, device=device, dtype=model.dtype)
        t = torch.full((1, cfg.chunk_frames), 500.0, device=device, dtype=torch.float64)
        start = cfg.prefix_frames
        with torch.no_grad():
            for _ in range(n_chunks):
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(steps + 1):  # T denoising forwards + one write pass, no context
                    model(x, t, start=start)
                _sync(device)
                record["step_seconds"].append(time.perf_counter() - t0)
    else:
        stats = GenerationStats()
        _sync(device)
        for _ in generate(model, frames, first_frames=first, steps=steps, mode=mode, stats=stats):
            _sync(device)
        record["step_seconds"] = stats.chunk_seconds
        record["cache_bytes"] = stats.cache_bytes
    record["total_seconds"] = sum(record["step_seconds"])
    record["peak_mem_bytes"] = _peak_bytes(device)
    return record


def run_single_calls(config: dict, mode: str, frames: int, steps: int, device: str, dtype: str) -> dict:
    """Time one autoregressive step of ``mode`` from single calls, at the state of the last chunk of
    a ``frames``-frame video (a full window): one denoising forward (x ``steps``) and one write pass.

    For models too large to generate a whole video with on a CPU (the ``paper`` preset). The one
    entry of ``step_seconds`` is steps x denoise + write; ``call_seconds`` holds both timings."""
    torch.manual_seed(0)
    model = CausalVideoDiT(ModelConfig(**config)).to(device=device, dtype=getattr(torch, dtype)).eval()
    cfg, lay = model.config, model.layout
    l = cfg.chunk_frames
    k = lay.chunk_of(frames - 1)           # the last chunk of the video
    start = lay.chunk_start(k)             # its first frame; frames before it are context
    x = torch.randn(1, cfg.in_channels, l, *cfg.frame_size, device=device, dtype=model.dtype)
    t = torch.full((1, l), 500.0, device=device, dtype=torch.float64)

    def timed(fn, repeat=2):
        fn()  # warm-up
        best = float("inf")
        for _ in range(repeat):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        return best

    record = dict(cache_bytes=0)
    with torch.no_grad():
        if mode == "shared":
            cache = model.new_cache(1)
            cache.frames_written = start  # the ring holds a full window of (random) K/V
            for b in range(cfg.depth):
                cache.k[b].normal_()
                cache.v[b].normal_()
            denoise = timed(lambda: model.forward_cached(x, t, cache))

            def write():
                cache.frames_written = start
                model.forward_cached(x, t * 0, cache, write=True)
            write_s = timed(write)
            record["cache_bytes"] = cache.nbytes
        else:
            first = {"recompute-full": 0, "recompute-window": max(0, start - cfg.max_context_frames),
                     "limit": start}[mode]
            n = start + l - first
            full = torch.randn(1, cfg.in_channels, n, *cfg.frame_size, device=device, dtype=model.dtype)
            tt = torch.cat([torch.zeros(1, n - l, dtype=torch.float64, device=device), t], dim=1)
            denoise = timed(lambda: model(full, tt, start=first))
            write_s = denoise if mode == "limit" else 0.0  # recompute modes keep frames, they write nothing
    record.update(step_seconds=[steps * denoise + write_s], call_seconds=dict(denoise=denoise, write=write_s),
                  total_seconds=steps * denoise + write_s, peak_mem_bytes=_peak_bytes(device))
    return record


def _op_seconds(fn, repeat: int) -> float:
    """Mean seconds per call spent inside ATen operators (the profiler's self CPU time of every
    ``aten::`` op): compute plus the ops' own dispatch; a call's wall time beyond it is Python."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeat):
            fn()
    us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith("aten::"))
    return us / 1e6 / repeat


def linear_fit(xs, ys) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys against xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        raise ValueError("a fit needs at least two different x values")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var
    return my - slope * mx, slope


def call_latency(model: CausalVideoDiT, batches=(1, 2, 4, 8, 16), repeat: int = 20, text_tokens: int = 12) -> dict:
    """Per-call time of a cached denoising step and of a write pass, window full, at each batch size.

    Each is the median of ``repeat`` timed calls after warm-up. The fit time(B) = overhead + B x per_row
    (least squares over the batches) separates what does not grow with the batch — Python, dispatch
    and launch cost — from compute; ``overhead_share_b1`` is overhead / time(1). A text model gets
    random prompt states of ``text_tokens`` tokens (no text encoder needed)."""
    from .conditioning import Text

    cfg, dev, dt = model.config, model.device, model.dtype
    l = cfg.chunk_frames
    rows = {}
    for B in batches:
        text = Text(torch.randn(B, text_tokens, cfg.text_dim, device=dev, dtype=dt)) if cfg.conditioning == "text" else None
        labels = torch.zeros(B, dtype=torch.long) if cfg.conditioning == "class" else None
        with torch.no_grad():
            cond = model.condition(B, text, labels)
            cache = model.new_cache(B)
            if cfg.prefix_frames:
                model.forward_cached(torch.randn(B, cfg.in_channels, cfg.prefix_frames, *cfg.frame_size, device=dev,
                                                 dtype=dt), torch.zeros(B, cfg.prefix_frames, dtype=torch.float64,
                                                                        device=dev), cache, cond, write=True)
            x = torch.randn(B, cfg.in_channels, l, *cfg.frame_size, device=dev, dtype=dt)
            t, zeros = (torch.full((B, l), 500.0, dtype=torch.float64, device=dev),
                        torch.zeros(B, l, dtype=torch.float64, device=dev))
            while cache.frames_written < cfg.max_context_frames + l:  # a full window that has slid
                model.forward_cached(x, zeros, cache, cond, write=True)
            start = cache.frames_written

            def step():
                model.forward_cached(x, t, cache, cond)

            def write():
                cache.frames_written = start
                model.forward_cached(x, zeros, cache, cond, write=True)

            timings = {}
            for name, fn in (("denoise", step), ("write", write)):
                for _ in range(3):
                    fn()
                seconds = []
                for _ in range(repeat):
                    _sync(dev.type)
                    t0 = time.perf_counter()
                    fn()
                    _sync(dev.type)
                    seconds.append(time.perf_counter() - t0)
                timings[name] = sorted(seconds)[len(seconds) // 2]
                if B == batches[0] and dev.type == "cpu":
                    timings[name + "_ops"] = _op_seconds(fn, repeat)
        rows[B] = timings
    out = {"batches": list(batches), "repeat": repeat, "calls": {}}
    for name in ("denoise", "write"):
        ys = [rows[B][name] for B in batches]
        overhead, slope = linear_fit(batches, ys)
        out["calls"][name] = dict(seconds=ys, per_row_seconds=slope, overhead_seconds=overhead,
                                  overhead_share_b1=overhead / ys[0] if batches[0] == 1 else None)
        ops = rows[batches[0]].get(name + "_ops")
        if ops is not None:  # what the profiler sees inside ATen ops, per call; the rest is Python
            out["calls"][name].update(op_seconds_b1=ops, python_seconds_b1=max(0.0, ys[0] - ops),
                                      python_share_b1=max(0.0, ys[0] - ops) / ys[0])
    return out


def format_call_latency(result: dict) -> str:
    lines = [f"{'call':<9}" + "".join(f"{'B=' + str(b):>10}" for b in result["batches"])
             + f"{'overhead':>11}{'per row':>10}{'overhead at B=1':>17}"]
    for name, r in result["calls"].items():
        share = r["overhead_share_b1"]
        lines.append(f"{name:<9}" + "".join(f"{s * 1e3:>8.2f}ms" for s in r["seconds"])
                     + f"{r['overhead_seconds'] * 1e3:>9.2f}ms{r['per_row_seconds'] * 1e3:>8.2f}ms"
                     + (f"{share:>17.0%}" if share is not None else f"{'':>17}"))
    lines.append("overhead and per row: the least-squares fit time(B) = overhead + B x per row over the batches")
    for name, r in result["calls"].items():
        if "python_seconds_b1" in r:
            lines.append(f"{name} at B=1: {r['op_seconds_b1'] * 1e3:.2f} ms inside ATen ops (profiler), "
                         f"{r['python_seconds_b1'] * 1e3:.2f} ms Python around them ({r['python_share_b1']:.0%})")
    return "\n".join(lines)


def stream_batching(model: CausalVideoDiT, streams: int = 8, rounds: int = 12, steps: int | None = None,
                    levels=None, guidance: float = 1.0, text_tokens: int = 12, repeat: int = 10) -> dict:
    """Several streams as one batched forward (``stream.next_chunks``) against one stream alone, and
    against the ceiling this machine allows, all measured in this run.

    One stream alone: the median of ``rounds`` chunks after two warm-up chunks. ``streams`` streams
    that joined at different frames (stream j ran 2 + j mod 4 chunks alone first), each with its own
    prompt and seed: the median of ``rounds`` timed rounds of ``next_chunks``. Ceiling: a round can be no faster than K denoising
    calls plus one write pass at streams x rows (rows = 2 with guidance), each timed alone here on a
    full window: aggregate ceiling = streams x chunk_frames / that time. Reports frames/s of each
    and ``share_of_ceiling`` = batched / ceiling."""
    from .conditioning import Text
    from .stream import StreamSession, next_chunks

    cfg, dev, dt = model.config, model.device, model.dtype
    if cfg.prefix_frames:
        raise ValueError("stream_batching expects a model that starts from a prompt alone (prefix_frames=0)")
    l, rows = cfg.chunk_frames, 2 if guidance != 1.0 else 1
    g = torch.Generator().manual_seed(0)

    def session(j):
        text = Text(torch.randn(1, text_tokens, cfg.text_dim, generator=g).to(dev, dt)) if cfg.conditioning == "text" else None
        return StreamSession(model, prompt=text, steps=steps, levels=levels, guidance=guidance, seed=j)

    def median_seconds(fn):  # the median of ``rounds`` timed calls, as call_latency times its calls
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    alone = session(0)
    for _ in range(2):
        alone.next_chunk()
    fps_alone = l / median_seconds(alone.next_chunk)
    many = [session(j) for j in range(streams)]
    for j, s in enumerate(many):  # joined at different frames
        for _ in range(j % 4 + 2):
            s.next_chunk()
    next_chunks(many)  # warm-up of the batched path
    fps_many = streams * l / median_seconds(lambda: next_chunks(many))
    calls = call_latency(model, batches=(rows, streams * rows), repeat=repeat, text_tokens=text_tokens)["calls"]
    k = len(alone.sampler)
    round_floor = k * calls["denoise"]["seconds"][1] + calls["write"]["seconds"][1]
    ceiling = streams * l / round_floor
    return {"streams": streams, "rounds": rounds, "rows_per_stream": rows, "denoise_calls_per_chunk": k,
            "frames_per_second_alone": fps_alone, "frames_per_second_batched": fps_many,
            "speedup": fps_many / fps_alone, "ceiling_frames_per_second": ceiling,
            "share_of_ceiling": fps_many / ceiling,
            "call_seconds": {name: dict(zip(("alone", "batched"), c["seconds"])) for name, c in calls.items()},
            "threads": torch.get_num_threads()}


def format_stream_batching(r: dict) -> str:
    c = r["call_seconds"]
    return "\n".join([
        f"{r['streams']} streams batched: {r['frames_per_second_batched']:.1f} frames/s in all; one stream alone: "
        f"{r['frames_per_second_alone']:.1f} frames/s ({r['speedup']:.2f}x)",
        f"ceiling: {r['denoise_calls_per_chunk']} denoising calls + 1 write at {r['streams'] * r['rows_per_stream']} rows "
        f"({c['denoise']['batched'] * 1e3:.1f} + {c['write']['batched'] * 1e3:.1f} ms; at {r['rows_per_stream']} row(s): "
        f"{c['denoise']['alone'] * 1e3:.1f} + {c['write']['alone'] * 1e3:.1f} ms) -> "
        f"{r['ceiling_frames_per_second']:.1f} frames/s; batched reaches {r['share_of_ceiling']:.0%} of it"])


# --------------------------------------------------------------------------------------------
# One autoregressive step under each speed setting, against this machine's GEMM peak
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """A speed setting: autocast dtype (None: the model's float32), whether ``layers.Linear`` keeps
    its low-precision weights, attention's dtype under CPU autocast (``layers.CPU_AUTOCAST_ATTENTION``),
    and whether denoising calls run through ``torch.compile`` (inductor with frozen weights: one
    static graph once the window is full; write passes stay eager, their ring slots move)."""

    autocast: torch.dtype | None = None
    keep_low_precision: bool = True
    attention: str = "float32"
    compile: bool = False


SETTINGS = {
    "float32": Setting(),
    "float32, compiled denoising": Setting(compile=True),
    "bf16, weights cast every call": Setting(torch.bfloat16, keep_low_precision=False),
    "bf16": Setting(torch.bfloat16),
    "bf16, bf16 attention": Setting(torch.bfloat16, attention="compute"),
    "bf16, bf16 attention, compiled": Setting(torch.bfloat16, attention="compute", compile=True),
}


def native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively, as PyTorch will dispatch them: the kernel
    capability PyTorch chose (``torch.backends.cpu.get_cpu_capability()``, which
    ``ATEN_CPU_CAPABILITY`` can lower) is AVX-512 and the processor has AVX-512 BF16 or AMX tiles.
    Elsewhere (AVX2 machines, most AMD EPYCs before Zen 4) bf16 is emulated and slower than float32."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(p is not None and p() for p in probes)


def cpu_settings(native: bool | None = None) -> list[str]:
    """The names of ``SETTINGS`` worth timing on this CPU: all of them with native bf16, else the
    float32 ones (bf16 would only measure its emulation)."""
    native = native_bf16() if native is None else native
    return [n for n, s in SETTINGS.items() if native or s.autocast is None]


def gemm_peak(dtype: torch.dtype, n: int = 2048, repeat: int = 5, device: str = "cpu",
              enough_seconds: float = 0.02) -> float:
    """FLOP/s of the best of ``repeat`` square matmuls in ``dtype``: this machine's GEMM peak. The
    size doubles from 256 up to ``n`` until one product takes ``enough_seconds`` (a slow, emulated
    dtype is measured small instead of for minutes)."""
    size = min(256, n)
    while True:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        best = float("inf")
        for _ in range(repeat + 1):
            _sync(device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        if best >= enough_seconds or size >= n:
            return 2 * size ** 3 / best
        size *= 2


class applied:
    """Apply a ``Setting`` (by name or value) for the duration of a with block (autocast and the
    two ``layers`` switches; compiling is the caller's: see ``compiled_denoising``)."""

    def __init__(self, setting: "str | Setting", device: str = "cpu"):
        from . import layers

        self.layers, self.device = layers, device
        self.s = SETTINGS[setting] if isinstance(setting, str) else setting

    def __enter__(self):
        L, s = self.layers, self.s
        self.saved = (L.Linear.keep_low_precision, L.CPU_AUTOCAST_ATTENTION)
        L.Linear.keep_low_precision, L.CPU_AUTOCAST_ATTENTION = s.keep_low_precision, s.attention
        self.ctx = torch.autocast(self.device, dtype=s.autocast) if s.autocast else torch.autocast(self.device,
                                                                                                   enabled=False)
        self.ctx.__enter__()

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)
        self.layers.Linear.keep_low_precision, self.layers.CPU_AUTOCAST_ATTENTION = self.saved


def compiled_denoising(model: CausalVideoDiT):
    """``model.forward_cached`` through ``torch.compile`` (static shapes, inductor freezing: weights
    folded in as constants, so the model must not change afterwards). For denoising calls: their
    shapes are static once the window is full; a write pass would recompile for every ring slot."""
    return torch.compile(model.forward_cached, dynamic=False, options={"freezing": True})


def step_settings(preset: str = "small", steps: int = 10, rounds: int = 5, settings=None, device: str = "cpu",
                  log=print) -> dict:
    """One autoregressive step of the preset's model (random weights, batch 1, a full window in the
    cache: ``steps`` denoising calls and one write pass) under every setting of ``SETTINGS``.

    Settings are timed round-robin, ``rounds`` times each, and each keeps its median, so a noisy
    neighbour slows all of them alike. The step's FLOPs are counted once (``FlopCounterMode``: the
    matmuls and attention); the GEMM peak of float32 and of bf16 is measured in the same run with a
    large matmul. Per setting: ms per step, achieved FLOP/s and its fraction of the peak of the
    setting's matmul dtype, and the GEMM-only floor (the step's FLOPs at that peak)."""
    from torch.utils.flop_counter import FlopCounterMode

    native = native_bf16() if device == "cpu" else True
    names = list(settings or cpu_settings(native))
    bad = [n for n in names if n not in SETTINGS]
    if bad:
        raise ValueError(f"unknown setting(s) {bad}; choose from {list(SETTINGS)}")
    if not native:
        skipped = [n for n in SETTINGS if n not in names]
        log(f"  this CPU has no native bf16 (PyTorch capability {torch.backends.cpu.get_cpu_capability()}): "
            + (f"skipped {', '.join(skipped)}; --setting NAME times one anyway (emulated)" if skipped
               else "the bf16 settings measure its emulation"))
    torch.manual_seed(0)
    model = CausalVideoDiT(preset_config(preset)).to(device).eval().requires_grad_(False)
    with torch.no_grad():  # every weight random (adaLN-Zero would make the output 0 and the checks below empty)
        for p in model.parameters():
            p.normal_(0, 0.02)
    cfg, l = model.config, model.config.chunk_frames
    x = torch.randn(1, cfg.in_channels, l, *cfg.frame_size, device=device)
    t = torch.full((1, l), 500.0, dtype=torch.float64, device=device)
    caches, compiled, compile_seconds = {}, {}, {}
    for name in names:  # one cache per compute dtype, a full window of random K/V
        dtype = SETTINGS[name].autocast or torch.float32
        if dtype not in caches:
            cache = caches[dtype] = model.new_cache(1, dtype)
            n = cfg.prefix_frames
            while n < cfg.max_context_frames:  # the first chunk boundary with a full window behind it
                n += l
            cache.frames_written = n
            for b in range(cfg.depth):
                cache.k[b].normal_()
                cache.v[b].normal_()
    start = caches[next(iter(caches))].frames_written

    def one_step(name):
        s = SETTINGS[name]
        cache = caches[s.autocast or torch.float32]
        denoise = model.forward_cached
        if s.compile:
            if name not in compiled:
                compiled[name] = compiled_denoising(model)
            denoise = compiled[name]
        with torch.no_grad(), applied(name, device):
            for _ in range(steps):
                denoise(x, t, cache)
            cache.frames_written = start
            model.forward_cached(x, torch.zeros_like(t), cache, write=True)

    with FlopCounterMode(display=False) as counter:
        one_step("float32")
    flops = counter.get_total_flops()
    peaks = {dtype: gemm_peak(dtype, device=device) for dtype in caches}
    log("  GEMM peak: " + ", ".join(f"{str(d).replace('torch.', '')} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items())
        + f"; {flops / 1e9:.1f} GFLOP per step")
    times = {n: [] for n in names}
    for name in names:  # warm-up: allocator, kernels, the low-precision weights, compiling
        t0 = time.perf_counter()
        one_step(name)
        compile_seconds[name] = time.perf_counter() - t0
    for name in names:  # a compiled call computes what the eager one does
        if SETTINGS[name].compile:
            with torch.no_grad(), applied(name, device):
                want = model.forward_cached(x, t, caches[SETTINGS[name].autocast or torch.float32]).float()
                got = compiled[name](x, t, caches[SETTINGS[name].autocast or torch.float32]).float()
            err = ((got - want).abs().max() / want.abs().max()).item()
            tol = 1e-4 if SETTINGS[name].autocast is None else 5e-2
            if not err < tol:
                raise RuntimeError(f"setting {name!r}: the compiled denoising call differs from eager by {err:.2e}")
            log(f"  {name}: compiled vs eager, max error {err:.1e} of the output's range; first step "
                f"{compile_seconds[name]:.1f} s with compiling")
    for r in range(rounds):
        for name in names:
            _sync(device)
            t0 = time.perf_counter()
            one_step(name)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    rows = {}
    for name in names:
        sec = statistics.median(times[name])
        peak = peaks[SETTINGS[name].autocast or torch.float32]
        rows[name] = dict(step_seconds=sec, all_seconds=times[name], flops_per_second=flops / sec,
                          first_step_seconds=compile_seconds[name],
                          peak_fraction=flops / sec / peak, gemm_floor_seconds=flops / peak)
    best = min(rows, key=lambda n: rows[n]["step_seconds"])
    return dict(device=device_name(device), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                native_bf16=native, best=best, preset=preset, steps=steps, rounds=rounds, flops_per_step=flops,
                gemm_peak_flops={str(k).replace("torch.", ""): v for k, v in peaks.items()},
                cache_bytes={str(k).replace("torch.", ""): c.nbytes for k, c in caches.items()},
                peak_mem_bytes=_peak_bytes(device), settings=rows)


def format_step_settings(r: dict) -> str:
    peaks = ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in r["gemm_peak_flops"].items())
    lines = [f"device: {r['device']}   preset: {r['preset']}   one AR step = {r['steps']} denoising calls + 1 write, "
             f"{r['flops_per_step'] / 1e9:.1f} GFLOP   GEMM peak: {peaks}",
             f"{'setting':<32}{'ms/step':>10}{'GFLOP/s':>10}{'of peak':>9}{'GEMM floor ms':>15}{'x float32':>11}"]
    base = r["settings"].get("float32", {}).get("step_seconds")
    for name, s in r["settings"].items():
        lines.append(f"{name:<32}{s['step_seconds'] * 1e3:>10.1f}{s['flops_per_second'] / 1e9:>10.1f}"
                     f"{s['peak_fraction']:>9.1%}{s['gemm_floor_seconds'] * 1e3:>15.1f}"
                     + (f"{s['step_seconds'] / base:>11.2f}" if base else ""))
    cache = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in r["cache_bytes"].items())
    lines.append(f"fastest on this CPU ({r['cpu_capability']}, {'native' if r['native_bf16'] else 'no native'} bf16): "
                 f"{r['best']}")
    lines.append(f"median of {r['rounds']} rounds, settings interleaved; GEMM floor = the step's FLOPs at the peak of "
                 f"the setting's matmul dtype; KV cache: {cache}; peak memory of the process "
                 f"{r['peak_mem_bytes'] / 2**20:.0f} MiB")
    return "\n".join(lines)


def _worker(queue, fn, *args):
    try:
        queue.put(("ok", fn(*args)))
    except BaseException as e:  # report, the parent decides
        queue.put(("error", f"{type(e).__name__}: {e}"))


def run_mode_isolated(*args, fn=None) -> dict:
    """``run_mode`` (or ``fn``) in a fresh process (spawned), so peak memory is that mode's alone."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(queue, fn or run_mode, *args))
    proc.start()
    status, payload = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(payload)
    return payload


def benchmark(preset: str = "small", frames: int = 81, steps: int = 10, context: str = "bounded",
              device: str = "cpu", dtype: str = "float32", full_frame_budget: int | None = None,
              isolated: bool = True, single_calls: bool | None = None, log=print) -> dict:
    """Run every mode and the limit; return the JSON-ready result with ratios.

    single_calls: time one denoising forward and one write per mode (``run_single_calls``) instead
    of generating the video; default: only for ``paper`` on the CPU."""
    config = preset_config(preset, context, frames).to_dict()
    if single_calls is None:
        single_calls = preset == "paper" and device == "cpu"
    fn = run_single_calls if single_calls else run_mode
    if isolated:
        run = lambda *a: run_mode_isolated(*a, fn=fn)  # noqa: E731
    else:
        run = fn
    result = dict(device=device_name(device), preset=preset, config=config, frames=frames, steps=steps,
                  context=context, dtype=dtype, single_calls=single_calls, modes={})
    for mode in (*MODES, "limit"):
        n = frames
        if mode == "recompute-full" and full_frame_budget:
            n = min(frames, full_frame_budget)
        log(f"  {mode}: {n} frames ...")
        result["modes"][mode] = dict(run(config, mode, n, steps, device, dtype), frames=n)
    m = result["modes"]
    per_step = {k: _mean(v["step_seconds"]) for k, v in m.items()}
    shared_steps = m["shared"]["step_seconds"]
    # recompute-full may have run fewer frames: compare per-step over the steps both ran
    k = len(m["recompute-full"]["step_seconds"])
    full_vs = _mean(shared_steps) if single_calls else _mean(shared_steps[:k])  # single calls: one step each
    result["ratios"] = dict(
        recompute_window_over_shared=per_step["recompute-window"] / per_step["shared"],
        recompute_full_over_shared=_mean(m["recompute-full"]["step_seconds"]) / full_vs,
        shared_over_limit=per_step["shared"] / per_step["limit"],
        shared_last_over_first_step=shared_steps[-1] / shared_steps[0],
    )
    cache = m["shared"]["cache_bytes"]
    result["live2diff_cache_bytes"] = steps * cache
    return result


def _mean(xs):
    return sum(xs) / max(1, len(xs))


def device_name(device: str) -> str:
    """The device a figure was measured on, in words (CPU threads included)."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    extras = "".join(f", {name}" for name, probe in (("AVX-512 BF16", "_is_avx512_bf16_supported"),
                                                      ("AMX", "_is_amx_tile_supported"))
                     if getattr(torch.cpu, probe, lambda: False)())
    return (f"CPU ({cpu_model()}; PyTorch kernels {torch.backends.cpu.get_cpu_capability()}{extras}; "
            f"{torch.get_num_threads()} threads)")


def cpu_model() -> str:
    """The processor's model name (/proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def plot_benchmark(result: dict, path: str) -> None:
    """Two panels: seconds per autoregressive step vs step index, cumulative seconds vs frames."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    p, l = cfg["prefix_frames"], cfg["chunk_frames"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, r in result["modes"].items():
        s = r["step_seconds"]
        steps = range(1, len(s) + 1)
        style = dict(marker="." if len(s) > 1 else "o", label=mode, ls="--" if mode == "limit" else "-")
        ax.plot(steps, s, **style)
        cum, frames, t = [], [], 0.0
        for i, x in enumerate(s):
            t += x
            cum.append(t)
            frames.append(p + (i + 1) * l)
        bx.plot(frames, cum, **style)
    what = "single calls" if result.get("single_calls") else f"{result['frames']} frames"
    ax.set_title(f"{result['preset']} preset, {what}, {result['steps']} steps, {result['context']} context",
                 fontsize=9)
    ax.set_xlabel("autoregressive step (chunk)")
    ax.set_ylabel("seconds per step")
    bx.set_title(result["device"], fontsize=9)
    bx.set_xlabel("frames generated")
    bx.set_ylabel("cumulative seconds")
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(result: dict) -> str:
    """The benchmark as a plain-text table."""
    lines = [f"device: {result['device']}   preset: {result['preset']}   frames: {result['frames']}   "
             f"steps: {result['steps']}   context: {result['context']}   dtype: {result['dtype']}",
             f"{'mode':<18}{'frames':>7}{'s/AR step':>11}{'first':>9}{'last':>9}{'total s':>9}"
             f"{'cache MB':>10}{'peak MB':>9}"]
    for mode, r in result["modes"].items():
        s = r["step_seconds"]
        lines.append(f"{mode:<18}{r['frames']:>7}{_mean(s):>11.4f}{s[0]:>9.4f}{s[-1]:>9.4f}"
                     f"{r['total_seconds']:>9.2f}{r['cache_bytes'] / 2**20:>10.2f}{r['peak_mem_bytes'] / 2**20:>9.0f}")
    lines.append("ratios: " + ", ".join(f"{k} = {v:.2f}" for k, v in result["ratios"].items()))
    lines.append(f"Live2Diff-style per-step cache would need {result['live2diff_cache_bytes'] / 2**20:.2f} MB "
                 f"(T x shared)")
    return "\n".join(lines)
