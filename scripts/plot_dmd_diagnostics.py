"""Issue 26's diagnostic curves side by side: several DMD runs' score diagnostics on one figure.

Each ARM=metrics.csv is a DMD stage's metrics.csv (``dmd.diagnose_every``; see
``ca2vdm.distill.diagnostic``). One row of panels per noise-level bucket sigma; left: the DMD
gradient's size |fake - real| / norm (solid) and the guidance term's |cond - real| / norm (dashed),
right: cos(fake - real, cond - real); one colour per arm.

    python scripts/plot_dmd_diagnostics.py --out docs/dmd_settings/diagnostics.png \
        baseline=docs/dmd_settings/baseline_metrics.csv references=docs/dmd_settings/references_metrics.csv
"""

import argparse
import sys

from ca2vdm.distill import diagnostic


def read_diagnostic(path: str) -> list[dict]:
    rows = diagnostic.read_diagnostic(path)
    if not rows:
        sys.exit(f"error: {path} holds no diagnostic rows (was dmd.diagnose_every 0?)")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="ARM=metrics.csv")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    runs = {}
    for item in args.runs:
        name, sep, path = item.partition("=")
        if not sep:
            sys.exit(f"error: {item!r}: expected ARM=metrics.csv")
        runs[name] = read_diagnostic(path)
    levels = diagnostic.buckets_of(next(iter(runs.values()))[0])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(levels), 2, figsize=(12, 2.6 * len(levels)), squeeze=False)
    for j, (name, rows) in enumerate(runs.items()):
        it = [int(r["iteration"]) for r in rows]
        c = f"C{j}"
        for i, s in enumerate(levels):
            ax, bx = axes[i]
            ax.plot(it, [float(r[f"diag_ratio_{s}"]) for r in rows], color=c, label=name)
            ax.plot(it, [float(r[f"diag_guide_{s}"]) for r in rows], color=c, ls="--", lw=0.8)
            bx.plot(it, [float(r[f"diag_cos_{s}"]) for r in rows], color=c, label=name)
    for i, s in enumerate(levels):
        ax, bx = axes[i]
        ax.set(ylabel=f"sigma {s[1:]}\nover the normaliser")
        bx.set(ylabel="cosine", ylim=(-1.05, 1.05))
        bx.axhline(0, color="grey", lw=0.5)
    axes[0][0].set_title("|fake - real| / norm (dashed: |cond - real| / norm, the guidance term)")
    axes[0][1].set_title("cos(fake - real, cond - real)")
    axes[-1][0].set_xlabel("DMD iteration")
    axes[-1][1].set_xlabel("DMD iteration")
    axes[0][1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out} ({len(runs)} runs, {len(levels)} noise-level buckets)")


if __name__ == "__main__":
    main()
