"""The digit classifier behind the moving-digits figures: which digits does a frame show?

A tiny CNN (~60k parameters, ~250 kB), shipped as package data in ``ca2vdm/assets/digit_classifier/``
(``config.json`` + ``model.safetensors``; nothing is unpickled). Retrain it with
``python -m ca2vdm.metrics.digit_classifier --out ca2vdm/assets/digit_classifier`` (about three
minutes of one CPU core); it gets 91% per-frame exact-set accuracy on held-out (val split) frames,
94% per 4-frame chunk.
"""

import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..assets import CLASSIFIER, ROOT
from ..data.digits import MovingDigits

NUM_CLASSES = 10
DEFAULT_CLASSIFIER_DIR = ROOT / CLASSIFIER


class DigitClassifier(nn.Module):
    """Which digits are in a frame? (N, C, 32, 32) in [-1, 1] -> (N, 10) logits, one sigmoid per class.

    Four 3x3 conv-BN-ReLU layers (widths w, 2w, 4w, 4w, two 2x max-pools; receptive field 26 px,
    more than a 12 px glyph) and a global max-pool, so a digit counts wherever it is in the frame.
    """

    def __init__(self, width: int = 16, in_channels: int = 3, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.config = {"width": width, "in_channels": in_channels, "num_classes": num_classes}
        w = width

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.features = nn.Sequential(
            *block(in_channels, w), nn.MaxPool2d(2),   # (N, w, 16, 16)
            *block(w, 2 * w), nn.MaxPool2d(2),         # (N, 2w, 8, 8)
            *block(2 * w, 4 * w),                      # (N, 4w, 8, 8)
            *block(4 * w, 4 * w),                      # (N, 4w, 8, 8)
        )
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clamp(-1, 1)                            # generated frames may overshoot [-1, 1]
        h = self.features(x).amax(dim=(2, 3))         # (N, 4w) global max-pool
        return self.head(h)                           # (N, 10) logits


def multi_hot(digits, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """[[3, 7], [1]] -> (B, 10) float 0/1 targets: which classes are present (repeats count once)."""
    target = torch.zeros(len(digits), num_classes)
    for i, ds in enumerate(digits):
        target[i, [int(d) for d in ds]] = 1.0
    return target


def _render_frames(num_clips: int, frames: int, max_digits: int, seed: int, split: str):
    """All frames of ``num_clips`` MovingDigits clips -> (frames (N*F, 3, 32, 32) uint8, targets (N*F, 10))."""
    ds = MovingDigits(num_clips, frames, max_digits=max_digits, seed=seed, split=split)
    video = torch.empty(num_clips, frames, 3, 32, 32, dtype=torch.uint8)   # 4x smaller than float32
    target = torch.empty(num_clips, frames, NUM_CLASSES)
    for i in range(num_clips):
        item = ds[i]
        v = item["video"].permute(1, 0, 2, 3)                              # (F, C, H, W)
        video[i] = ((v + 1) * 127.5).round().to(torch.uint8)
        target[i] = multi_hot([item["digits"]]).expand(frames, -1)
    return video.flatten(0, 1), target.flatten(0, 1)


def _to_float(frames_u8: torch.Tensor) -> torch.Tensor:
    return frames_u8.float() / 127.5 - 1                                   # uint8 -> [-1, 1]


def _augment(x: torch.Tensor, y: torch.Tensor, g: torch.Generator, negatives: float = 0.05):
    """Make the classifier tolerant of what a generator gets slightly wrong, and say "nothing" to junk.

    x (N, 3, H, W) in [-1, 1], y (N, 10). Per frame: contrast scale, background lift, Gaussian
    noise; a ``negatives`` fraction is replaced by empty or noise frames with no digit.
    """
    n = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, 1, 1, 1, generator=g)  # noqa: E731
    x = (x + 1) * u(0.7, 1.1) - 1                                          # dimmer / brighter digits
    x = x + u(0.0, 0.15) * (torch.rand(n, 1, 1, 1, generator=g) < 0.5)     # grey background
    x = x + u(0.0, 0.15) * torch.randn(x.shape, generator=g)               # pixel noise
    junk = torch.rand(n, generator=g) < negatives
    if junk.any():
        k = int(junk.sum())
        amp = 2 * torch.rand(k, 1, 1, 1, generator=g)                      # from blank to full noise
        x[junk] = -1 + amp * torch.rand(k, *x.shape[1:], generator=g)
        y = y.clone()
        y[junk] = 0
    return x.clamp(-1, 1), y


@torch.no_grad()
def frame_accuracy(classifier: DigitClassifier, frames: torch.Tensor, targets: torch.Tensor,
                   batch: int = 512) -> float:
    """Per-frame exact-set accuracy: frames (N, 3, H, W) in [-1, 1], targets (N, 10) multi-hot."""
    classifier.eval()
    device = next(classifier.parameters()).device
    correct = 0
    for s in range(0, len(frames), batch):
        pred = classifier(frames[s:s + batch].to(device)).sigmoid() > 0.5   # (n, 10)
        correct += (pred.cpu() == targets[s:s + batch].bool()).all(-1).sum().item()
    return correct / len(frames)


def val_accuracy(classifier: DigitClassifier, num_clips: int = 512, frames: int = 8, max_digits: int = 2,
                 seed: int = 0) -> float:
    """Held-out per-frame exact-set accuracy on every frame of ``num_clips`` val-split clips."""
    x, y = _render_frames(num_clips, frames, max_digits, seed, "val")
    return frame_accuracy(classifier, _to_float(x), y)


def train_digit_classifier(steps: int = 3000, seed: int = 0, max_digits: int = 2, device: str = "cpu",
                           batch_size: int = 64, lr: float = 3e-3, width: int = 16, pool_clips: int = 6000,
                           frames_per_clip: int = 4, log_every: int = 250) -> DigitClassifier:
    """Train a DigitClassifier on random frames of random MovingDigits train-split clips.

    A pool of ``pool_clips`` clips x ``frames_per_clip`` frames is rendered once (uint8), then each
    step draws ``batch_size`` random frames from it, augments them (``_augment``) and takes an
    AdamW step on the per-class binary cross-entropy (multi-hot of the clip's ``digits``).
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    pool_x, pool_y = _render_frames(pool_clips, frames_per_clip, max_digits, seed, "train")
    print(f"rendered {len(pool_x)} training frames in {time.time() - t0:.1f}s")

    model = DigitClassifier(width=width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(len(pool_x), (batch_size,), generator=g)
        x, y = _augment(_to_float(pool_x[idx]), pool_y[idx], g)
        loss = F.binary_cross_entropy_with_logits(model(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:.0f}s")
    return model.eval()


def save_classifier(model: DigitClassifier, dir, extra: dict | None = None) -> None:
    """Write ``dir/config.json`` (architecture + ``extra`` metadata) and ``dir/model.safetensors``."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(dir / "model.safetensors"))
    (dir / "config.json").write_text(json.dumps({"model": model.config, **(extra or {})}, indent=2) + "\n")


def load_classifier(dir=DEFAULT_CLASSIFIER_DIR, device: str = "cpu") -> DigitClassifier:
    """Load a classifier saved by ``save_classifier`` (default: the shipped one), in eval mode."""
    dir = Path(dir)
    cfg_file, weights = dir / "config.json", dir / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{dir} has no digit classifier (need config.json and model.safetensors)")
    model = DigitClassifier(**json.loads(cfg_file.read_text())["model"])
    model.load_state_dict(load_file(str(weights)))
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------
# Training the shipped classifier: python -m ca2vdm.metrics.digit_classifier
# --------------------------------------------------------------------------------------------
def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="Train and save the moving-digits DigitClassifier.")
    p.add_argument("--out", default=str(DEFAULT_CLASSIFIER_DIR))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-digits", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = train_digit_classifier(args.steps, args.seed, args.max_digits, args.device)
    seconds = time.time() - t0
    acc = val_accuracy(model, max_digits=args.max_digits, seed=args.seed)
    print(f"val exact-set accuracy per frame: {acc:.4f}  (trained in {seconds:.0f}s)")
    save_classifier(model, args.out, {
        "train": {"command": "python -m ca2vdm.metrics.digit_classifier --out ca2vdm/assets/digit_classifier", "steps": args.steps,
                  "batch_size": 64, "lr": 3e-3, "seed": args.seed, "max_digits": args.max_digits,
                  "pool_clips": 6000, "frames_per_clip": 4, "split": "train", "cpu_seconds": round(seconds)},
        "val_exact_set_accuracy": acc,
        "val": {"split": "val", "clips": 512, "frames": 8, "max_digits": args.max_digits, "seed": args.seed},
    })


if __name__ == "__main__":
    main()
