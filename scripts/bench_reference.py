"""One autoregressive step of ca2vdm's ``small`` preset against the Ca2-VDM authors' own model code.

What is measured. Both models, with random weights, in ONE process, at the paper's temporal layout
and the ``small`` body: 1 given frame, chunk l = 8 frames, a full window of P_max = 25 cached
frames, 64 tokens per frame (16x16 latent, 4 channels, 2x2 patches), hidden 384, depth 12, 6 heads,
MLP ratio 4, no conditioning, batch 1, no classifier-free guidance. One autoregressive step =
10 denoising calls on the 8-frame chunk that read the cached window + 1 write pass of the clean
chunk that appends its K/V (oldest frames evicted). Only model calls are timed (no sampler).

* ours: ``CausalVideoDiT.forward_cached(x, t, cache, cond)`` and ``write=True``, exactly as
  ``ca2vdm.bench.call_latency`` drives them: the cache is filled past P_max + l frames (a window
  that has slid) and ``frames_written`` is reset before every write so the window stays full.
* reference: ``CausalSTDiT2`` from github.com/Dawn-LX/CausalCache-VDM
  (opensora/models/causal_stdit2/causal_stdit2.py), driven as its own sampler
  (opensora/utils/video_gen.py ``autoregressive_sample_kv_cache``) does: ``register_kv_cache(B,
  max_seq_len=25, kv_cache_dequeue=True)``, ``write_latents_to_cache`` of the given frame and of
  each clean chunk, ``forward_kv_cache(x, t(B,), y=None, mask=None)`` per denoising call. The cache
  is filled with 1 + 4 chunks (so it has dequeued once) and stays full: every write rolls it.
  Configured as the authors' SkyTimelapse model (configs/causal_stdit/train_SkyTimelapse_demo.py)
  with the small body: is_causal=True, caption_channels=0 (no cross-attention), max_tpe_len=33,
  relative_tpe_mode='cyclic', temp_extra_in_channels=1 (the mask channel of block 0),
  pred_sigma=True (default), input_size=(8, 16, 16), patch (1, 2, 2). Their config also has
  cross_frame_attn='prev_prefix_3'; ours ``small`` has no prefix enhancement, so by default the
  reference runs with spatial_attn_enhance=None; ``--prefix-enhance`` turns on both
  (ours prefix_enhance=True, R=3; reference 'prev_frames_3').
  Attention: enable_flashattn=False, the reference's own non-flash CPU path in
  ``AttentionWithContext``: q*scale @ k^T, cast to float32, an additive causal mask built per call
  (bottom-right aligned, for temporal attention), softmax, cast back, @ v. xformers / flash-attn are
  not imported by that path (their absence only prints a line, swallowed here).

Imports of the reference. Its package ``__init__`` files import every model, dataset and mmengine,
so the script registers empty package shells whose ``__path__`` is the real directory: the real
files causal_stdit2.py, attention.py, layers/blocks.py, acceleration/{checkpoint,communications,
parallel_states}.py, utils/{debug_utils,rope_llama_src}.py are executed unchanged. Stubbed (unused
by the cached forward): ``opensora.registry.MODELS`` (a no-op decorator),
``opensora.utils.ckpt_utils.load_checkpoint``; ``timm`` (it imports torchvision, absent here):
``Mlp`` and ``DropPath`` are re-implemented faithfully from timm 1.0 (fc1, act, drop, Identity norm,
fc2, drop; DropPath is never built at drop_path=0). ``einops`` must be importable (pure Python):
``pip install --no-deps --target DIR einops`` and PYTHONPATH=DIR if the venv lacks it.

Timing: warm-up of both, then ``--rounds`` rounds alternating ours/reference (which side goes first
alternates too); per side the median over rounds of the step (sum of its 11 timed calls) and the
median of single denoising / write calls. Ours under each of ``ca2vdm.bench.SETTINGS`` (float32; bf16
autocast with weights cast every call, with weights kept in bf16, and with attention in bf16 too;
a bf16 setting keeps its KV cache in bf16), the reference in fp32 and under torch.autocast('cpu',
bfloat16); every figure is also given as a ratio to the reference's fp32 and bf16 steps.
"""

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time
import types

import torch
import torch.nn as nn

STEPS, T_DENOISE = 10, 500.0
REF_FILE = os.path.join("opensora", "models", "causal_stdit2", "causal_stdit2.py")


def _stub(name, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


class _Mlp(nn.Module):  # timm.models.vision_transformer.Mlp (timm 1.0), use_conv=False
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU,
                 norm_layer=None, bias=True, drop=0.0):
        super().__init__()
        out_features, hidden_features = out_features or in_features, hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = norm_layer(hidden_features) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class _DropPath(nn.Module):  # timm DropPath; identity in eval / at drop_prob 0
    def __init__(self, drop_prob=0.0, scale_by_keep=True):
        super().__init__()
        self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * (mask / keep if self.scale_by_keep else mask)


def load_reference(ref_dir):
    """Import ``CausalSTDiT2`` from the authors' checkout without their package __init__ files."""
    ref_dir = os.path.abspath(ref_dir)
    if not os.path.isfile(os.path.join(ref_dir, REF_FILE)):
        sys.exit(f"error: {ref_dir} does not contain the reference model ({REF_FILE} is missing); export "
                 "github.com/Dawn-LX/CausalCache-VDM there, e.g. git --git-dir=MIRROR archive HEAD | tar -x -C DIR")
    try:
        import einops  # noqa: F401
    except ImportError:
        sys.exit("error: the reference code needs einops: pip install --no-deps --target DIR einops, PYTHONPATH=DIR")
    for pkg in ("opensora", "opensora.models", "opensora.models.layers", "opensora.models.causal_stdit2",
                "opensora.acceleration", "opensora.utils"):
        _stub(pkg, __path__=[os.path.join(ref_dir, *pkg.split("."))])

    class Registry:
        def register_module(self, name=None, module=None, force=False):
            return lambda obj: obj

    _stub("opensora.registry", MODELS=Registry())
    _stub("opensora.utils.ckpt_utils", load_checkpoint=lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("random weights only")))
    _stub("timm", __path__=[])
    _stub("timm.models", __path__=[])
    _stub("timm.models.layers", DropPath=_DropPath)
    _stub("timm.models.vision_transformer", Mlp=_Mlp)
    with contextlib.redirect_stdout(io.StringIO()):  # "xformers not available", "flash_attn is not installed"
        from opensora.models.causal_stdit2.causal_stdit2 import CausalSTDiT2
    return CausalSTDiT2


def build_ours(prefix_enhance, cache_dtype=torch.float32, model=None, compiled=False):
    from ca2vdm.bench import compiled_denoising, preset_config
    from ca2vdm.config import ModelConfig
    from ca2vdm.model import CausalVideoDiT

    d = preset_config("small").to_dict()
    if prefix_enhance:
        d.update(prefix_enhance=True, prefix_enhance_frames=3)
    if model is None:
        torch.manual_seed(0)
        model = CausalVideoDiT(ModelConfig.from_dict(d)).eval().requires_grad_(False)
    cfg = model.config
    l, B = cfg.chunk_frames, 1
    cond = model.condition(B)  # small: conditioning 'none'
    cache = model.new_cache(B, cache_dtype)  # a bf16 setting stores K/V as computed (what StreamSession does)
    x = torch.randn(B, cfg.in_channels, l, *cfg.frame_size)
    t = torch.full((B, l), T_DENOISE, dtype=torch.float64)
    zeros = torch.zeros(B, l, dtype=torch.float64)
    with torch.no_grad():
        first = torch.randn(B, cfg.in_channels, cfg.prefix_frames, *cfg.frame_size)
        model.forward_cached(first, torch.zeros(B, cfg.prefix_frames, dtype=torch.float64), cache, cond, write=True)
        while cache.frames_written < cfg.max_context_frames + l:  # a full window that has slid
            model.forward_cached(x, zeros, cache, cond, write=True)
    start = cache.frames_written

    forward = compiled_denoising(model) if compiled else model.forward_cached

    def denoise():
        forward(x, t, cache, cond)

    def write():
        cache.frames_written = start
        model.forward_cached(x, zeros, cache, cond, write=True)

    def check():
        write()
        return dict(window_frames=cache.window_len, frames_written=cache.frames_written,
                    write_advanced=cache.frames_written - start == l)

    return model, d, denoise, write, check


def build_reference(CausalSTDiT2, d, prefix_enhance):
    l, P, (Hs, Ws), C = d["chunk_frames"], d["max_context_frames"], d["frame_size"], d["in_channels"]
    kw = dict(input_size=(l, Hs, Ws), in_channels=C, patch_size=(1, d["patch"], d["patch"]),
              hidden_size=d["hidden"], depth=d["depth"], num_heads=d["heads"], mlp_ratio=d["mlp_ratio"],
              caption_channels=0, is_causal=True, temp_extra_in_channels=1, temp_extra_in_all_block=False,
              max_tpe_len=d["cyclic_length"], relative_tpe_mode="cyclic", enable_flashattn=False,
              enable_layernorm_kernel=False, enable_sequence_parallelism=False,
              spatial_attn_enhance="prev_frames_3" if prefix_enhance else None)
    torch.manual_seed(0)
    model = CausalSTDiT2(**kw).eval()
    B = 1
    x = torch.randn(B, C, l, Hs, Ws)
    t = torch.full((B,), T_DENOISE)
    quiet = lambda: contextlib.redirect_stdout(io.StringIO())  # noqa: E731  (it prints on alloc / dequeue)
    with torch.no_grad(), quiet():
        model.register_kv_cache(B, max_seq_len=P, kv_cache_dequeue=True)
        model.write_latents_to_cache(torch.randn(B, C, d["prefix_frames"], Hs, Ws), None, None)
        while model.cache_indicator.sum().item() < P + l:  # 1 + 4 chunks: full, and dequeued once
            model.write_latents_to_cache(x, None, None)

    def denoise():
        model.forward_kv_cache(x, t, None, None)

    def write():
        with quiet():  # the print(" >>> kv_cache_dequeue") of every full-window write still runs, into a buffer
            model.write_latents_to_cache(x, None, None)

    def check():
        seen = []
        hook = model.blocks[0].attn_temp.register_forward_pre_hook(
            lambda m, a, k: seen.append(k["context"].shape[1]), with_kwargs=True)
        try:
            with torch.no_grad():
                denoise()
        finally:
            hook.remove()
        return dict(window_frames=seen[0], cache_slots=model.cache_kv.shape[2],
                    frames_written=int(model.cache_indicator.sum()), cache_shape=list(model.cache_kv.shape))

    return model, kw, denoise, write, check


def one_step(denoise, write, setting):
    """The timed calls of one step under ``setting``: for ours a name of ``ca2vdm.bench.SETTINGS``
    (autocast, weight reuse, attention dtype), for the reference "fp32" or "bf16" (autocast)."""
    from ca2vdm.bench import applied

    if setting in ("fp32", "bf16"):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if setting == "bf16" else contextlib.nullcontext()
    else:
        ctx = applied(setting, "cpu")
    calls = []
    with torch.no_grad(), ctx:
        for fn in [denoise] * STEPS + [write]:
            t0 = time.perf_counter()
            fn()
            calls.append(time.perf_counter() - t0)
    return calls


def bench(sides, rounds, warmup):
    """sides: name -> dict(denoise, write, setting); every side once per round, the order alternating."""
    for _ in range(warmup):
        for s in sides.values():
            one_step(s["denoise"], s["write"], s["setting"])
    rec = {name: [] for name in sides}
    order = list(sides)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            rec[name].append(one_step(sides[name]["denoise"], sides[name]["write"], sides[name]["setting"]))
    out = {}
    for name, steps in rec.items():
        out[name] = dict(step_ms=statistics.median(sum(c) for c in steps) * 1e3,
                         denoise_ms=statistics.median(x for c in steps for x in c[:STEPS]) * 1e3,
                         write_ms=statistics.median(c[STEPS] for c in steps) * 1e3,
                         raw_call_seconds=steps)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, help="checkout of github.com/Dawn-LX/CausalCache-VDM")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per side per setting")
    ap.add_argument("--settings", default=None,
                    help="comma list of ours' settings (names of ca2vdm.bench.SETTINGS; default: all of them)")
    ap.add_argument("--prefix-enhance", action="store_true",
                    help="ours prefix_enhance (R=3) and the reference's spatial_attn_enhance='prev_frames_3'")
    ap.add_argument("--json", help="save the figures here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from ca2vdm.bench import SETTINGS

    names = args.settings.split(",") if args.settings else list(SETTINGS)
    if any(n not in SETTINGS for n in names):
        sys.exit(f"error: unknown setting(s) in {names}; choose from {list(SETTINGS)}")
    CausalSTDiT2 = load_reference(args.reference)
    ours, ours_cfg, o_den, o_wr, o_check = build_ours(args.prefix_enhance)
    ref, ref_kw, r_den, r_wr, r_check = build_reference(CausalSTDiT2, ours_cfg, args.prefix_enhance)
    checks = dict(ours=o_check(), reference=r_check())
    for name, c in checks.items():  # both really ran the cached path on a full window
        if c["window_frames"] != ours_cfg["max_context_frames"]:
            sys.exit(f"error: {name} attended to {c['window_frames']} cached frames, expected "
                     f"{ours_cfg['max_context_frames']}: {c}")
    params = dict(ours=sum(p.numel() for p in ours.parameters()), reference=sum(p.numel() for p in ref.parameters()))
    ours_sides = {torch.float32: (o_den, o_wr)}
    sides = dict()
    for n in names:
        dtype = SETTINGS[n].autocast or torch.float32
        if dtype not in ours_sides:
            ours_sides[dtype] = build_ours(args.prefix_enhance, dtype, ours)[2:4]
        denoise, write = ours_sides[dtype]
        if SETTINGS[n].compile:  # the same call through torch.compile (compiled during the warm-up)
            denoise = build_ours(args.prefix_enhance, dtype, ours, compiled=True)[2]
        sides[f"ours: {n}"] = dict(denoise=denoise, write=write, setting=n)
    for setting in ("fp32", "bf16"):
        sides[f"reference: {setting}"] = dict(denoise=r_den, write=r_wr, setting=setting)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); step = {STEPS} denoising calls + 1 write, "
          f"chunk {ours_cfg['chunk_frames']}, window {ours_cfg['max_context_frames']}, batch 1")
    print(f"parameters: ours {params['ours'] / 1e6:.2f} M, reference {params['reference'] / 1e6:.2f} M")
    print(f"cache checks: {json.dumps(checks)}")
    results = bench(sides, args.rounds, args.warmup)
    ref32, ref16 = results["reference: fp32"]["step_ms"], results["reference: bf16"]["step_ms"]
    print(f"\n{'side: setting':<42}{'ms/step':>10}{'denoise ms':>12}{'write ms':>10}{'/ ref fp32':>12}{'/ ref bf16':>12}")
    for name, r in results.items():
        r["over_reference_fp32"], r["over_reference_bf16"] = r["step_ms"] / ref32, r["step_ms"] / ref16
        print(f"{name:<42}{r['step_ms']:>10.1f}{r['denoise_ms']:>12.1f}{r['write_ms']:>10.1f}"
              f"{r['over_reference_fp32']:>12.3f}{r['over_reference_bf16']:>12.3f}")
    print(f"(medians over {args.rounds} alternating rounds; reference bf16 = torch.autocast('cpu', bfloat16); "
          "ours' settings: ca2vdm.bench.SETTINGS)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(threads=torch.get_num_threads(), torch=torch.__version__, rounds=args.rounds,
                           steps_per_ar_step=STEPS, ours_config=ours_cfg, reference_kwargs=ref_kw,
                           reference_kv_cache=dict(max_seq_len=ours_cfg["max_context_frames"], dequeue=True),
                           parameters=params, checks=checks, results=results), fh, indent=1)
        print(f"saved {args.json}")


if __name__ == "__main__":
    main()
