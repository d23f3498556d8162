"""Benchmark: wall time per autoregressive step for the three generation modes and the limit.

A random-weight model of a preset generates the same video in every mode, each mode in its own
process so that its peak memory is its own. Reported per mode: seconds per autoregressive step
(denoising steps plus the write pass of that chunk), total seconds, cache bytes and peak memory;
and the *limit*: the same T denoising forwards over the chunk alone (no context) plus one write
pass — what a chunk would cost if context were free. Ratios are computed within one run.
"""

import json
import multiprocessing as mp
import platform
import resource
import time

import torch

from .generate import MODES, GenerationStats, generate
from .model import CausalVideoDiT, ModelConfig

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


def _worker(queue, *args):
    try:
        queue.put(("ok", run_mode(*args)))
    except BaseException as e:  # report, the parent decides
        queue.put(("error", f"{type(e).__name__}: {e}"))


def run_mode_isolated(*args) -> dict:
    """``run_mode`` in a fresh process (spawned), so peak memory is that mode's alone."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(queue, *args))
    proc.start()
    status, payload = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(payload)
    return payload


def benchmark(preset: str = "small", frames: int = 81, steps: int = 10, context: str = "bounded",
              device: str = "cpu", dtype: str = "float32", full_frame_budget: int | None = None,
              isolated: bool = True, log=print) -> dict:
    """Run every mode and the limit; return the JSON-ready result with ratios."""
    config = preset_config(preset, context, frames).to_dict()
    run = run_mode_isolated if isolated else run_mode
    result = dict(device=_device_name(device), preset=preset, config=config, frames=frames, steps=steps,
                  context=context, dtype=dtype, modes={})
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
    result["ratios"] = dict(
        recompute_window_over_shared=per_step["recompute-window"] / per_step["shared"],
        recompute_full_over_shared=_mean(m["recompute-full"]["step_seconds"]) / _mean(shared_steps[:k]),
        shared_over_limit=per_step["shared"] / per_step["limit"],
        shared_last_over_first_step=shared_steps[-1] / shared_steps[0],
    )
    cache = m["shared"]["cache_bytes"]
    result["live2diff_cache_bytes"] = steps * cache
    return result


def _mean(xs):
    return sum(xs) / max(1, len(xs))


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


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


def save_json(result: dict, path: str):
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
