"""Steering figures on moving digits: what a prompt switch and video-to-video do to a stream.

* ``prompt_switch_report`` — videos that switch from one digit's prompt to another's mid-stream:
  per chunk after the switch, the share of videos read as the new digit, for a switch with a
  re-cache of the window, one without (the old K/V stay), and a restart under the new prompt
  (no context at all); and how many chunks each takes to reach 80%.
* ``v2v_report`` — real one-digit clips re-drawn with another digit's prompt at several strengths:
  the share of chunks read as the prompted digit and how far (px) the output's digit is from the
  input's, per strength.
* ``plot_steering`` / ``switch_strip`` — the curves as a PNG, and frames around the switch.

Prompts are the captions of held-out clips (``eval.digits.held_out_clips``) with the digit replaced.
"""

import re

import torch

from ..checkpoint import load_checkpoint, sampling_for
from ..conditioning import Text
from ..metrics.digit_classifier import load_classifier
from ..metrics.digits import chunk_correct, position_error
from ..stream import StreamSession
from .digits import held_out_clips

SWITCH_MODES = ("recache", "no-recache", "restart")


def other_digit(caption: str, digit: int, i: int) -> tuple[str, int]:
    """The caption with its digit replaced by another one (a different one for consecutive i)."""
    new = (digit + 1 + i % 9) % 10
    return re.sub(rf"\b{digit}\b", str(new), caption, count=1), new


def _setup(checkpoint, videos, frames, seed, steps, levels, guidance):
    from ..text import get_text_encoder

    sampling = sampling_for(checkpoint, steps, levels, guidance)
    model = load_checkpoint(checkpoint)
    items = held_out_clips(checkpoint, model, videos, frames, seed)
    if any(len(it["digits"]) != 1 for it in items):
        raise ValueError("the steering figures need one-digit clips (a checkpoint trained with max_digits: 1)")
    enc = get_text_encoder("cpu")
    text = lambda captions: Text(*enc.encode(captions))  # noqa: E731
    kw = dict(steps=sampling["steps"], levels=sampling["levels"], guidance=sampling["guidance"],
              seed=[seed + i for i in range(videos)])
    return model, items, text, kw, sampling


def _until(shares, goal=0.8):
    """Chunks until the share first reaches ``goal`` (1 = the first chunk after the switch), or None."""
    return next((i + 1 for i, s in enumerate(shares) if s >= goal), None)


@torch.no_grad()
def prompt_switch_report(checkpoint, videos: int = 16, frames: int = 128, switch_at: int = 64, seed: int = 1000,
                         steps=None, levels=None, guidance=None, log=print) -> dict:
    """Each video starts with a held-out clip's caption and switches at frame ``switch_at`` to the
    same caption with another digit. Returns per chunk after the switch the share read as the new
    digit for every mode in ``SWITCH_MODES`` (and as the old digit), chunks until >= 80%, and the
    videos (``videos[mode]``: (B, C, F, H, W), the restart's first frames are the switch's)."""
    model, items, text, kw, sampling = _setup(checkpoint, videos, frames, seed, steps, levels, guidance)
    l = model.config.chunk_frames
    if model.config.prefix_frames or switch_at % l or not 0 < switch_at < frames:
        raise ValueError(f"switch_at must be a multiple of the chunk length {l} inside the video "
                         "(a model that starts from a prompt alone)")
    swapped = [other_digit(it["caption"], it["digits"][0], i) for i, it in enumerate(items)]
    old_prompt, new_prompt = text([it["caption"] for it in items]), text([c for c, _ in swapped])
    before, after = switch_at // l, (frames - switch_at) // l
    out, classifier = {}, load_classifier()
    for mode in SWITCH_MODES:
        s = StreamSession(model, prompt=new_prompt if mode == "restart" else old_prompt, **kw)
        chunks = [] if mode == "restart" else [s.next_chunk() for _ in range(before)]
        if mode != "restart":
            s.set_prompt(new_prompt, recache=mode == "recache")
        chunks += [s.next_chunk() for _ in range(after)]
        out[mode] = torch.cat(chunks, dim=2).float().clamp(-1, 1)
        log(f"  {mode}: {out[mode].shape[2]} frames")
    report = {"settings": dict(checkpoint=str(checkpoint), videos=videos, frames=frames, switch_at=switch_at,
                               seed=seed, **sampling), "chunk_frames": l, "modes": {}}
    for mode, video in out.items():
        tail = video[:, :, -(frames - switch_at):]
        new = chunk_correct(classifier, tail, [[d] for _, d in swapped], l).float().mean(0).tolist()
        old = chunk_correct(classifier, tail, [it["digits"] for it in items], l).float().mean(0).tolist()
        report["modes"][mode] = {"new_digit": new, "old_digit": old, "chunks_to_80": _until(new)}
    if "recache" in out:
        first = chunk_correct(classifier, out["recache"][:, :, :switch_at], [it["digits"] for it in items], l)
        report["before_switch_old_digit"] = first.float().mean().item()
    report["videos"] = out
    return report


@torch.no_grad()
def v2v_report(checkpoint, videos: int = 16, frames: int = 64, strengths=(0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
               seed: int = 1000, steps=None, levels=None, guidance=None, log=print) -> dict:
    """Held-out one-digit clips re-drawn chunk by chunk with another digit's prompt, at each strength:
    {"rows": [{"strength", "start_step", "prompted_digit" (share of chunks read as it), "source_digit",
    "position_error_px" (output digit's centroid vs the input's, mean over frames)}], "settings"}."""
    model, items, text, kw, sampling = _setup(checkpoint, videos, frames, seed, steps, levels, guidance)
    cfg, l = model.config, model.config.chunk_frames
    if cfg.prefix_frames:
        raise ValueError("v2v_report expects a model that starts from a prompt alone")
    swapped = [other_digit(it["caption"], it["digits"][0], i) for i, it in enumerate(items)]
    prompt = text([c for c, _ in swapped])
    source = torch.stack([it["video"] for it in items]).to(model.dtype)  # (B, C, F, H, W)
    n = frames // l
    rows, classifier = [], load_classifier()
    for s in strengths:
        session = StreamSession(model, prompt=prompt, **kw)
        out = torch.cat([session.next_chunk(source=source[:, :, k * l:(k + 1) * l], strength=s)
                         for k in range(n)], dim=2).float().clamp(-1, 1)
        src = source[:, :, :n * l].float()
        rows.append({"strength": s, "start_step": session.start_step(s),
                     "prompted_digit": chunk_correct(classifier, out, [[d] for _, d in swapped], l).float().mean().item(),
                     "source_digit": chunk_correct(classifier, out, [it["digits"] for it in items], l).float().mean().item(),
                     "position_error_px": position_error(out, src)})
        log(f"  strength {s}: prompted digit {rows[-1]['prompted_digit']:.3f}, "
            f"position error {rows[-1]['position_error_px']:.2f} px")
    return {"settings": dict(checkpoint=str(checkpoint), videos=videos, frames=frames, seed=seed, **sampling),
            "rows": rows}


def switch_strip(report: dict, path, video: int = 0, frames_each_side: int = 12) -> None:
    """Frames around the switch of one video, one row per mode, as a PNG (upscaled 3x)."""
    import numpy as np
    from PIL import Image

    from ..video import to_uint8

    t, k = report["settings"]["switch_at"], frames_each_side
    rows = []
    for mode in SWITCH_MODES:
        v = report["videos"][mode][video]  # (C, F, H, W); the restart's frames start at the switch
        start = t if mode == "restart" else 0  # absolute index of v's first frame
        black = torch.full_like(v[:, :1], -1)
        clip = torch.cat([v[:, n - start:n - start + 1] if 0 <= n - start < v.shape[1] else black
                          for n in range(t - k, t + k)], dim=1)  # frames t-k .. t+k-1, black where absent
        rows.append(np.concatenate(list(to_uint8(clip)), axis=1))  # (H, frames*W, 3)
    img = np.concatenate(rows, axis=0)
    Image.fromarray(img).resize((img.shape[1] * 3, img.shape[0] * 3), Image.NEAREST).save(path)


def plot_steering(switch: dict | None, v2v: dict | None, path) -> None:
    """Left: share read as the new digit per chunk after the switch, per mode. Right: the v2v curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    if switch:
        for mode, r in switch["modes"].items():
            ax.plot(range(1, len(r["new_digit"]) + 1), r["new_digit"], marker="o", ms=3, label=mode)
        ax.axhline(0.8, color="k", ls="--", lw=0.8)
        ax.set_xlabel("chunk after the switch")
        ax.set_ylabel("share read as the new digit")
        ax.legend()
    if v2v:
        s = [r["strength"] for r in v2v["rows"]]
        bx.plot(s, [r["prompted_digit"] for r in v2v["rows"]], marker="o", label="read as the prompted digit")
        bx.set_xlabel("strength")
        bx.set_ylabel("share of chunks")
        bx2 = bx.twinx()
        bx2.plot(s, [r["position_error_px"] or float("nan") for r in v2v["rows"]], marker="s", color="tab:red",
                 label="position error (px)")
        bx2.set_ylabel("px from the input's digit")
        bx.legend(loc="upper left", fontsize=8)
        bx2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_steering_tables(switch: dict | None, v2v: dict | None) -> str:
    """Markdown: the share read as the new digit per chunk after the switch, then the v2v curve."""
    lines = []
    if switch:
        n = len(next(iter(switch["modes"].values()))["new_digit"])
        shown = list(range(min(n, 8)))
        lines += ["| after the switch | " + " | ".join(f"chunk {i + 1}" for i in shown) + " | mean | chunks to 80% |",
                  "|---|" + "---:|" * (len(shown) + 2)]
        for mode, r in switch["modes"].items():
            mean = sum(r["new_digit"]) / len(r["new_digit"])
            lines.append(f"| {mode} | " + " | ".join(f"{r['new_digit'][i]:.2f}" for i in shown)
                         + f" | {mean:.3f} | {r['chunks_to_80'] or '–'} |")
        lines.append("")
    if v2v:
        lines += ["| strength | first step | read as the prompted digit | read as the source digit | position error (px) |",
                  "|---:|---:|---:|---:|---:|"]
        for r in v2v["rows"]:
            err = "–" if r["position_error_px"] is None else f"{r['position_error_px']:.2f}"
            lines.append(f"| {r['strength']:.1f} | {r['start_step'] + 1} | {r['prompted_digit']:.3f} | "
                         f"{r['source_digit']:.3f} | {err} |")
    return "\n".join(lines)
