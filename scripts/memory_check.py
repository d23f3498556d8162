"""Check ``training.memory.memory_per_rank`` against the measured peak of live tensor bytes of a
training step in one process (a ``TorchDispatchMode`` that counts every tensor storage an op makes
until it is freed, plus the weights, EMA and optimizer state alive at the start), at a size with
more than 200 MB of state; RSS is reported beside it, not checked. Writes docs/memory_check.json
and prints the table of docs/training.md.

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/memory_check.py
"""

import json
import resource
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

from ca2vdm.checkpoint import model_config
from ca2vdm.config import ModelConfig
from ca2vdm.data import MovingDigits
from ca2vdm.training import TrainConfig, Trainer, clip_frames, load_run_config
from ca2vdm.training.memory import memory_per_rank, table

REPO = Path(__file__).resolve().parent.parent


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages: those ``track``ed and every op's outputs, each until freed."""

    def __init__(self):
        super().__init__()
        self.seen, self.now, self.peak = WeakIdKeyDictionary(), 0, 0

    def track(self, t):
        st = t.untyped_storage()
        if st in self.seen or st.nbytes() == 0:
            return
        n = st.nbytes()
        self.seen[st] = n
        self.now += n
        self.peak = max(self.peak, self.now)
        weakref.finalize(st, self._free, n)

    def _free(self, n):
        self.now -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.track, out)
        return out


def measure(cfg: ModelConfig, batch: int, checkpointing: bool) -> dict:
    tc = TrainConfig(steps=10, batch_size=batch, eval_every=0, save_every=0, warmup=1, grad_checkpointing=checkpointing)
    data = MovingDigits(8, clip_frames(cfg), size=cfg.frame_size[0], channels=cfg.in_channels, digit_size=6, seed=0)
    tr = Trainer(cfg, tc, data)
    tr.train_step()  # the optimizer state exists from here on
    counter = LiveBytes()
    held = list(tr.model.parameters()) + list(tr.ema.shadow.values())
    held += [v for st in tr.opt.state.values() for v in st.values() if torch.is_tensor(v)]
    t0 = time.perf_counter()
    with counter:
        for t in held:
            counter.track(t)
        start = counter.now
        tr.train_step()
    computed = memory_per_rank(cfg, 1, "train", batch, checkpointing, mixed_precision=True)
    return {"checkpointing": checkpointing, "batch": batch, "measured_peak_bytes": counter.peak,
            "measured_state_bytes": start, "computed": computed,
            "relative_error": (computed["total"] - counter.peak) / counter.peak,
            "rss_max_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "step_seconds": time.perf_counter() - t0}


def main():
    torch.manual_seed(0)
    cfg = ModelConfig(in_channels=3, frame_size=16, patch=2, hidden=384, depth=8, heads=6, mlp_ratio=4.0,
                      chunk_frames=2, prefix_frames=1, max_context_frames=3, conditioning="class", num_classes=10)
    runs = [measure(cfg, 2, ckpt) for ckpt in (False, True)]
    for r in runs:
        print(f"act. ckpt {r['checkpointing']}: measured peak {r['measured_peak_bytes'] / 1e6:.0f} MB "
              f"(state {r['measured_state_bytes'] / 1e6:.0f} MB), computed {r['computed']['total'] / 1e6:.0f} MB, "
              f"error {100 * r['relative_error']:+.1f}%, RSS max {r['rss_max_bytes'] / 1e6:.0f} MB")
    from ca2vdm.causal_wan import CausalWanConfig
    from ca2vdm.wan import preset

    digits = model_config(load_run_config(REPO / "configs" / "digits.yaml")["model"])
    rows = [("digits", digits), ("Wan-1.3B", CausalWanConfig(preset("wan2.1-t2v-1.3b"))),
            ("Wan-14B", CausalWanConfig(preset("wan2.1-t2v-14b")))]
    md = table(rows)
    print(md)
    out = {"command": "PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/memory_check.py", "torch": torch.__version__,
           "model": cfg.to_dict(), "runs": runs, "table": md}
    (REPO / "docs" / "memory_check.json").write_text(json.dumps(out, indent=2))
    bad = [r for r in runs if abs(r["relative_error"]) > 0.15]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
