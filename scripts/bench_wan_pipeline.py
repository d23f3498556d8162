"""Streaming VAE decode vs decoding the whole video at the end, on a tiny random Wan pipeline.

    python scripts/bench_wan_pipeline.py --json docs/wan_pipeline_cpu.json [--chunks 4] [--threads 1]
    python scripts/bench_wan_pipeline.py --sizes "" --real-vae 240x416 --json docs/wan_vae_half_cpu.json

For each frame size (the tiny pipeline's own 32x48, and half of Wan's resolution, 240x416 -> latent
30x52) a tiny-depth causal transformer (scripts/make_tiny_wan_pipeline.py: 2 blocks, 24 wide, the
tiny AutoencoderKLWan, Self-Forcing's 4 levels, chunks of 3 latent frames) generates ``--chunks``
chunks twice from the same seed:

* streaming: each chunk decoded by the stream's own VAE caches as soon as it exists;
* at the end: every chunk generated first, then one ``vae.decode`` of the whole latent video.

Reported: seconds to the first pixel frame, pixel frames per second over the whole video, and per
chunk the transformer's and the VAE's seconds (the VAE's share). Both runs make the same frames
(checked bitwise). Random weights: the figures are timings only. The CPU, its flags and the load
average (other processes share the machine) are recorded beside them.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_info() -> dict:
    flags = ""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "avx2": " avx2" in flags, "avx512f": " avx512f" in flags,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def load_average() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def run(pipe, chunks: int, seed: int = 0) -> dict:
    from ca2vdm.wan_stream import WanStream

    text = pipe.encode_prompt(["a red cat runs on the beach"])
    # streaming: decode each chunk as it is made
    stream = WanStream(pipe, text, seed=seed)
    t0 = time.perf_counter()
    first, gen, dec, frames, out = None, [], [], 0, []
    for k in range(chunks):
        t = time.perf_counter()
        z = stream.session.next_chunk(last=k == chunks - 1)
        gen.append(time.perf_counter() - t)
        t = time.perf_counter()
        video = stream.decode(z)
        dec.append(time.perf_counter() - t)
        out.append(video)
        frames += video.shape[2]
        first = first or time.perf_counter() - t0
    total = time.perf_counter() - t0
    streamed = torch.cat(out, 2)
    # at the end: every chunk first, then one whole-video decode
    stream = WanStream(pipe, text, seed=seed)
    t0 = time.perf_counter()
    latents = [stream.session.next_chunk(last=k == chunks - 1) for k in range(chunks)]
    t = time.perf_counter()
    whole = WanStream(pipe, text, seed=seed).decode(torch.cat(latents, 2))  # a fresh decoder: one call per frame
    end_decode, end_total = time.perf_counter() - t, time.perf_counter() - t0
    return {"chunks": chunks, "pixel_frames": frames, "same_frames": bool(torch.equal(streamed, whole)),
            "streaming": {"seconds_to_first_frame": first, "seconds": total, "frames_per_second": frames / total,
                          "transformer_seconds_per_chunk": gen, "vae_seconds_per_chunk": dec,
                          "vae_share": sum(dec) / (sum(dec) + sum(gen))},
            "decode_at_end": {"seconds_to_first_frame": end_total, "seconds": end_total,
                              "frames_per_second": frames / end_total, "vae_seconds": end_decode}}


def real_vae(size: tuple) -> dict:
    """Wan 2.1's VAE architecture (diffusers' AutoencoderKLWan defaults: 96 base channels, 16 latent
    channels), random, streamed at pixel ``size``: the seconds of the first latent frame and of one
    later one (each one decoder call), and what they make of a chunk of 3 and of frames/s."""
    from diffusers import AutoencoderKLWan

    from ca2vdm.wan_vae import StreamingWanDecoder

    torch.manual_seed(0)
    vae = AutoencoderKLWan().eval().requires_grad_(False)
    s = vae.spatial_compression_ratio
    z = torch.randn(1, vae.config.z_dim, 2, size[0] // s, size[1] // s)
    dec = StreamingWanDecoder(vae)
    t = time.perf_counter()
    dec.decode(z[:, :, :1])
    first = time.perf_counter() - t
    t = time.perf_counter()
    dec.decode(z[:, :, 1:])
    later = time.perf_counter() - t
    return {"size": list(size), "base_dim": vae.config.base_dim, "seconds_first_latent_frame": first,
            "seconds_later_latent_frame": later, "cache_mb": dec.nbytes() / 2 ** 20,
            "derived": {"first_chunk_of_3_seconds": first + 2 * later, "later_chunk_of_3_seconds": 3 * later,
                        "vae_frames_per_second": 4 / later}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the report here")
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sizes", default="32x48,240x416", help="pixel frame sizes, comma-separated HxW ('' for none)")
    p.add_argument("--real-vae", metavar="HxW", help="also time Wan 2.1's full VAE architecture (random) at this "
                   "size: its first and one later latent frame")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from importlib.util import module_from_spec, spec_from_file_location

    from ca2vdm.pipeline import load_pipeline

    spec = spec_from_file_location("tiny", ROOT / "scripts" / "make_tiny_wan_pipeline.py")
    tiny = module_from_spec(spec)
    spec.loader.exec_module(tiny)
    report = {"command": "python scripts/bench_wan_pipeline.py " + " ".join(argv or sys.argv[1:]),
              "machine": cpu_info(), "load_before": load_average(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tiny.make(Path(tmp) / "pipe", weights=Path(tmp) / "causal.safetensors")
        for size in filter(None, args.sizes.split(",")):
            h, w = (int(v) for v in size.split("x"))
            pipe = load_pipeline(Path(tmp) / "pipe", Path(tmp) / "causal.safetensors", size=(h, w))
            run(pipe, 1)  # warm-up
            r = run(pipe, args.chunks)
            report["runs"][size] = r
            s, e = r["streaming"], r["decode_at_end"]
            print(f"{size}: {r['pixel_frames']} frames; streaming: first frame {s['seconds_to_first_frame']:.2f} s, "
                  f"{s['frames_per_second']:.1f} frames/s, VAE {s['vae_share']:.0%} of each chunk; at the end: "
                  f"first frame {e['seconds_to_first_frame']:.2f} s, {e['frames_per_second']:.1f} frames/s; "
                  f"same frames: {r['same_frames']}")
    if args.real_vae:
        h, w = (int(v) for v in args.real_vae.split("x"))
        r = report["real_vae"] = real_vae((h, w))
        print(f"Wan 2.1 VAE at {h}x{w}: first latent frame {r['seconds_first_latent_frame']:.1f} s, a later one "
              f"{r['seconds_later_latent_frame']:.1f} s ({r['derived']['vae_frames_per_second']:.3f} frames/s)")
    report["load_after"] = load_average()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
