"""The ``ca2vdm`` command. Nothing imports this module."""

import argparse
import sys


def _bench(args):
    from .bench import benchmark, format_table, save_json

    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda asked for, but CUDA is not available on this machine")
    print(f"benchmark: preset {args.preset}, {args.frames} frames, {args.steps} steps, each mode in its own process")
    result = benchmark(args.preset, args.frames, args.steps, args.context, args.device, args.dtype,
                       full_frame_budget=args.full_frame_budget)
    print(format_table(result))
    if args.json:
        save_json(result, args.json)
        print(f"wrote {args.json}")


def _train(args):
    from .train import load_run_config, train_from_config

    cfg = load_run_config(args.config, args.set)
    if args.out_dir:
        cfg["out_dir"] = args.out_dir
    train_from_config(cfg, resume=not args.restart)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ca2vdm", description="Efficient autoregressive video diffusion (Ca2-VDM).")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML run config",
                       description="Train with the Ca2-VDM recipe. CONFIG is a YAML file with model, data and train "
                                   "sections; the resolved config is saved in the run directory, and a run resumes "
                                   "from its checkpoint unless --restart.")
    t.add_argument("config", help="YAML run config, e.g. configs/digits.yaml")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=100 (repeatable)")
    t.add_argument("--out-dir", help="run directory (default: the config's out_dir)")
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in the run directory")
    t.set_defaults(func=_train)

    b = sub.add_parser("bench", help="time shared / recompute-window / recompute-full generation",
                       description="Time every generation mode on a random-weight model of a preset: seconds per "
                                   "autoregressive step, cache bytes, peak memory, and their ratios.")
    b.add_argument("--preset", choices=["tiny", "small", "paper"], default="small")
    b.add_argument("--frames", type=int, default=81, help="video length, given first frame included (default 81)")
    b.add_argument("--steps", type=int, default=10, help="denoising steps per chunk (default 10)")
    b.add_argument("--context", choices=["bounded", "unbounded"], default="bounded",
                   help="bounded: P_max = 25; unbounded: P_max = the whole video so far")
    b.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default="float32")
    b.add_argument("--full-frame-budget", type=int, default=None,
                   help="run recompute-full (quadratic) on at most this many frames")
    b.add_argument("--json", help="also write the result as JSON to this file")
    b.set_defaults(func=_bench)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
