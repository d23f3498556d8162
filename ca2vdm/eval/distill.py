"""The distillation report: teacher and students side by side, every row an ``ca2vdm eval`` report
on the same held-out captions and seeds, with streaming speed measured for all rows in one process.

* ``stream_speed`` — steady-state frames/s of one stream at batch 1 (model loading and prompt
  encoding excluded; the first two chunks are warm-up) and the time to its first chunk
* ``distill_report`` — the rows' figures, their speeds (rows measured round-robin, median of
  ``repeats``), and the shipped student's goals against the teacher and the same-step baseline
* ``compare_rows`` — which row wins on each figure, by how much, and whether the margin exceeds the
  spread between two seeds of the same row
* ``format_distill_table`` / ``plot_distill`` — a Markdown table and a PNG
* ``take_fvd`` — a row's FVD from an earlier eval of the same videos (its per-chunk accuracies compared)
"""

import statistics
import time

import torch

from ..checkpoint import load_checkpoint
from ..conditioning import Text
from ..generate import GenerationStats, generate

SPEED_PROMPT = "a 3 moving down and right"


def _loaded(checkpoint, settings):
    from ..text import get_text_encoder

    model = load_checkpoint(checkpoint)
    prompt = Text(*get_text_encoder("cpu").encode([SPEED_PROMPT])) if model.config.conditioning == "text" else None
    labels = torch.tensor([3]) if model.config.conditioning == "class" else None
    kw = dict(prompt=prompt, labels=labels, guidance=settings["guidance"], seed=0)
    kw["levels" if settings.get("levels") else "steps"] = settings.get("levels") or settings["steps"]
    return model, kw


def stream_speed(model, frames: int = 64, warmup_chunks: int = 2, **sampling) -> dict:
    """One stream of ``frames`` frames at batch 1: {"frames_per_second" (chunks after the warm-up),
    "seconds_to_first_chunk" (from the session's start), "denoise_calls_per_chunk"}."""
    stats = GenerationStats()
    for _ in generate(model, frames, stats=stats, **sampling):
        pass
    steady = stats.chunk_seconds[warmup_chunks:] or stats.chunk_seconds
    return {"frames_per_second": len(steady) * model.config.chunk_frames / sum(steady),
            "seconds_to_first_chunk": stats.seconds_to_first_chunk,
            "denoise_calls_per_chunk": stats.denoise_calls / stats.chunks}


def take_fvd(report: dict, other: dict, source: str) -> dict:
    """``report`` (an eval without FVD) with the FVD of ``other``, an earlier eval of the same
    checkpoint's videos (same frames, videos and seed: refused otherwise). How far the two runs'
    per-chunk digit accuracies lie apart is recorded beside it (``fvd_from``): 0 when the videos
    are the same; float rounding on another CPU can part long autoregressive videos a little."""
    if "fvd" in report:
        raise ValueError("this report has its own FVD")
    if "fvd" not in other:
        raise ValueError(f"{source} has no FVD")
    a, b = report["settings"], other["settings"]
    for k in ("frames", "videos", "seed", "steps", "guidance"):
        if a.get(k) != b.get(k):
            raise ValueError(f"{source} is another evaluation ({k}: {b.get(k)} vs {a.get(k)})")
    gap = max(abs(x - y) for x, y in zip(report["acc"], other["acc"]))
    return dict(report, fvd=other["fvd"], fvd_from={"source": source, "max_chunk_accuracy_difference": gap})


def _windows_ratio(report, n=8):
    rows = (report.get("fvd") or {}).get("per_window") or []
    if len(rows) < 2 * n:
        return None
    first, last = [r["fvd"] for r in rows[:n]], [r["fvd"] for r in rows[-n:]]
    return statistics.mean(last) / statistics.mean(first)


def _row(name, report, speed):
    o, h = report["overall"], report["horizons"].get("128", {})
    fvd, acc = report.get("fvd") or {}, report.get("acc") or []
    worst = lambda summary, n: summary.get("acc_worst_chunk", min(acc[:n]) if acc else None)  # noqa: E731  (older reports: from the chunks)
    return {
        "name": name, "settings": report["settings"], **speed,
        "acc_128": h.get("acc_mean"), "worst_chunk_128": worst(h, 128 // report.get("chunk_frames", 4)),
        "acc_1000": o["acc_mean"], "worst_chunk_1000": worst(o, len(acc)), "frames": report["frames"],
        "fvd": fvd.get("fvd"), "fvd_per_window": [r["fvd"] for r in fvd.get("per_window", [])],
        "fvd_last8_over_first8": _windows_ratio(report),
        "brightness_drift": o["brightness_drift"], "colour_drift": o.get("colour_drift"),  # None: measured before eval had it
        "fvd_from": report.get("fvd_from"),
    }


def distill_report(rows: dict, teacher: str | None, baseline: str | None, student: str | None, repeats: int = 3,
                   frames: int = 64, seed_pairs: dict | None = None, log=print) -> dict:
    """rows: {name: eval report (``evaluate_digits``'s JSON)}; ``teacher``, ``baseline`` (the teacher
    at the student's step count) and ``student`` name the rows the goals compare (all None: no goals,
    e.g. a comparison of students alone). ``seed_pairs`` ({rerun: row}, both rows) adds
    ``compare_rows``' verdict as ``comparison``."""
    roles = (("teacher", teacher), ("baseline", baseline), ("student", student))
    if any(name is None for _, name in roles) and any(name is not None for _, name in roles):
        raise ValueError("name all three of teacher, baseline and student, or none (no goals)")
    for role, name in roles:
        if name is not None and name not in rows:
            raise ValueError(f"the {role} row {name!r} is not among the rows ({', '.join(rows)})")
    for rerun, row in (seed_pairs or {}).items():
        if rerun not in rows or row not in rows or rerun == row:
            raise ValueError(f"seed pair {rerun!r} -> {row!r}: both must be rows, and different ones")
    loaded = {name: _loaded(r["settings"]["checkpoint"], r["settings"]) for name, r in rows.items()}
    runs = {name: [] for name in rows}
    for i in range(repeats):  # round-robin: slow drifts of the machine hit every row alike
        for name, (model, kw) in loaded.items():
            runs[name].append(stream_speed(model, frames, **kw))
            log(f"  speed {name} ({i + 1}/{repeats}): {runs[name][-1]['frames_per_second']:.1f} frames/s")
    speed = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    table = [_row(name, r, speed[name]) for name, r in rows.items()]
    report = {"rows": table, "teacher": teacher, "baseline": baseline, "student": student,
              "goals": {} if teacher is None else _goals(table, teacher, baseline, student),
              "speed": {"batch": 1, "frames": frames, "repeats": repeats, "threads": torch.get_num_threads(),
                        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}}
    if seed_pairs:
        report["comparison"] = compare_rows(table, seed_pairs)
    return report


def _goals(table, teacher, baseline, student) -> dict:
    by = {r["name"]: r for r in table}
    t, b, s = by[teacher], by[baseline], by[student]
    ratio = lambda a, c: None if a is None or not c else a / c  # noqa: E731
    goals = {
        "fps_over_teacher": {"value": ratio(s["frames_per_second"], t["frames_per_second"]), "goal": ">= 8"},
        "frames_per_second": {"value": s["frames_per_second"], "goal": ">= 25"},
        "digit_accuracy_1000": {"value": s["acc_1000"], "goal": ">= 0.9"},
        "fvd_over_teacher": {"value": ratio(s["fvd"], t["fvd"]), "goal": "<= 1.5"},
        "fvd_last8_over_first8": {"value": s["fvd_last8_over_first8"], "goal": "<= 1.15"},
        "accuracy_over_baseline": {"value": ratio(s["acc_1000"], b["acc_1000"]), "goal": "> 1"},
        "fvd_over_baseline": {"value": ratio(s["fvd"], b["fvd"]), "goal": "< 1"},
    }
    checks = {"fps_over_teacher": lambda v: v >= 8, "frames_per_second": lambda v: v >= 25,
              "digit_accuracy_1000": lambda v: v >= 0.9, "fvd_over_teacher": lambda v: v <= 1.5,
              "fvd_last8_over_first8": lambda v: v <= 1.15, "accuracy_over_baseline": lambda v: v > 1,
              "fvd_over_baseline": lambda v: v < 1}
    for key, g in goals.items():
        g["met"] = None if g["value"] is None else bool(checks[key](g["value"]))
    return goals


COMPARED = {"acc_1000": "higher", "acc_128": "higher", "fvd": "lower"}  # figure -> which way is better


def compare_rows(table: list, seed_pairs: dict) -> dict:
    """For each figure of ``COMPARED``: the best row and the runner-up among the rows that are not
    reruns, the margin between them, and whether it exceeds the seed spread: the larger
    |difference| between a row and its rerun (``seed_pairs``: {rerun: row}) over the winner and the
    runner-up (None when neither was rerun)."""
    by = {r["name"]: r for r in table}
    spread = {}
    for rerun, row in seed_pairs.items():
        spread[row] = {k: None if by[row][k] is None or by[rerun][k] is None else abs(by[rerun][k] - by[row][k])
                       for k in COMPARED}
    out = {"seed_pairs": dict(seed_pairs), "seed_spread": spread, "figures": {}}
    for key, better in COMPARED.items():
        ranked = sorted((r for r in table if r["name"] not in seed_pairs and r[key] is not None),
                        key=lambda r: r[key], reverse=better == "higher")
        if len(ranked) < 2:
            continue
        win, up = ranked[0], ranked[1]
        spreads = [spread[n][key] for n in (win["name"], up["name"]) if n in spread and spread[n][key] is not None]
        margin = abs(win[key] - up[key])
        out["figures"][key] = {"better": better, "winner": win["name"], "runner_up": up["name"], "margin": margin,
                               "seed_spread": max(spreads) if spreads else None,
                               "exceeds_seed_spread": bool(margin > max(spreads)) if spreads else None}
    return out


def _f(v, fmt):
    return "–" if v is None else format(v, fmt)


def format_distill_table(report: dict) -> str:
    """The report's rows as a Markdown table, then its goals."""
    lines = ["| row | sampling | frames/s | first chunk s | acc@128 (worst chunk) | acc@1000 (worst chunk) "
             "| FVD@1000 | FVD last8/first8 | brightness drift | colour drift |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        st = r["settings"]
        sampling = (f"{len(st['levels'])} levels" if st.get("levels") else f"{st['steps']} steps") + f", w={st['guidance']:g}"
        lines.append(f"| {r['name']} | {sampling} | {_f(r['frames_per_second'], '.1f')} | "
                     f"{_f(r['seconds_to_first_chunk'], '.3f')} | {_f(r['acc_128'], '.3f')} ({_f(r['worst_chunk_128'], '.2f')}) | "
                     f"{_f(r['acc_1000'], '.3f')} ({_f(r['worst_chunk_1000'], '.2f')}) | {_f(r['fvd'], '.1f')} | "
                     f"{_f(r['fvd_last8_over_first8'], '.2f')} | {_f(r['brightness_drift'], '+.4f')} | "
                     f"{_f(r['colour_drift'], '.4f')} |")
    lines.append("")
    for key, g in report["goals"].items():
        mark = {True: "met", False: "MISSED", None: "not measured"}[g["met"]]
        lines.append(f"- {key}: {_f(g['value'], '.3f')} (goal {g['goal']}): {mark}")
    for key, c in report.get("comparison", {}).get("figures", {}).items():
        verdict = {True: "exceeds", False: "does not exceed", None: "no rerun to compare with"}[c["exceeds_seed_spread"]]
        lines.append(f"- {key} ({c['better']} is better): {c['winner']} wins by {c['margin']:.3f} over "
                     f"{c['runner_up']}; seed spread {_f(c['seed_spread'], '.3f')}: {verdict}")
    return "\n".join(lines)


def plot_distill(report: dict, path) -> None:
    """Three panels: frames/s per row and accuracy per row side by side, FVD per 16-frame window over
    the video below them (full width, its legend at the right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = [r["name"] for r in rows]
    fig = plt.figure(figsize=(15, 2.2 + 0.35 * len(rows) + 3.6))
    grid = fig.add_gridspec(2, 2, height_ratios=[0.6 + 0.35 * len(rows), 3.6])
    ax, bx, cx = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    ax.barh(names, [r["frames_per_second"] for r in rows], color="tab:blue")
    ax.axvline(25, color="k", ls="--", lw=0.8, label="real time (25 frames/s)")
    ax.set_xlabel("frames/s, batch 1 (CPU)")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    bx.barh(names, [r["acc_1000"] or 0 for r in rows], color="tab:green")
    bx.axvline(0.9, color="k", ls="--", lw=0.8)
    bx.set_xlabel("digit accuracy over 1,000 frames")
    bx.set_xlim(0, 1)
    bx.invert_yaxis()
    for r in rows:
        if r["fvd_per_window"]:
            cx.plot([16 * i + 8 for i in range(len(r["fvd_per_window"]))], r["fvd_per_window"], label=r["name"], lw=1)
    cx.set_xlabel("frame")
    cx.set_ylabel("FVD per 16-frame window")
    cx.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
