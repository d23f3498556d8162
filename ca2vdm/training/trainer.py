"""The training loop: ``Trainer`` (model, EMA, optimizer, step counter, checkpoints, DDP) and
``train_from_config``, which builds everything a run config describes and trains.

All randomness of step s comes from generators seeded by (seed, s) for what the batch shares and
by (seed, s, j) for sample j (``losses.Draws``), so a resumed run draws the same batches and noise
as one that never stopped, and N DDP ranks together draw what one process would. Weights, EMA,
optimizer moments and metadata are saved with ``checkpoint.save_checkpoint`` (safetensors, atomic);
with ``train.parallel: fsdp`` every rank saves its shards (``parallel.save_sharded``) and the EMA
weights are gathered into the ``model.safetensors`` that ``generate`` loads.
"""

import csv
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from ..checkpoint import (CheckpointError, build_model, load_state, load_tensors, model_config, read_config,
                          save_checkpoint)
from ..conditioning import Text
from ..data import build_dataset
from ..diffusion import mix_seed
from . import parallel
from .config import TrainConfig
from .losses import Draws, Objective, clip_frames, prefix_choices
from .optim import EMA, init_optimizer_state, load_optimizer, lr_at, optimizer_tensors


class TextCache:
    """Caption -> token states, encoded once (the text encoder is frozen)."""

    def __init__(self, encoder):
        self.encoder, self.memo = encoder, {}

    def __call__(self, captions: list[str], device) -> Text:
        todo = [c for c in dict.fromkeys(captions) if c not in self.memo]
        if todo:
            states, mask = self.encoder.encode(todo)
            for i, c in enumerate(todo):
                n = int(mask[i].sum())
                self.memo[c] = states[i, :n].clone()
        return Text.cat([Text(self.memo[c][None].to(device)) for c in captions])


def _distributed() -> tuple[int, int]:
    """(rank, world size) of an initialised process group, else (0, 1)."""
    return parallel.world()


class Trainer:
    """Owns the model, its EMA, the optimizer and the step counter; ``run`` trains to ``tc.steps``.

    Under ``torchrun`` (an initialised process group) the model is wrapped in
    ``DistributedDataParallel`` (``tc.parallel='ddp'``) or sharded by FSDP2 (``'fsdp'``,
    ``parallel.shard``): ``tc.batch_size`` is the global batch, every rank draws and loads only its
    own share of it (samples seeded per global position), gradients are averaged. Rank 0 alone
    logs and writes; under FSDP every rank takes part in validation, samples and saves (their
    parameters are gathered), under DDP rank 0 alone runs them.
    """

    def __init__(self, model_cfg, tc: TrainConfig, dataset, val_dataset=None, text_encoder=None,
                 out_dir=None, device="cpu", extra_meta: dict | None = None):
        self.tc, self.device = tc, torch.device(device)
        self.rank, self.world = _distributed()
        if tc.batch_size % self.world:
            raise ValueError(f"TrainConfig.batch_size={tc.batch_size} (the global batch) must be divisible by the "
                             f"{self.world} processes")
        torch.manual_seed(tc.seed)
        self.model = build_model(model_cfg).to(self.device).train()
        if tc.grad_checkpointing and "grad-checkpointing" not in self.model.features:
            raise ValueError(f"train.grad_checkpointing is not available for {type(self.model).__name__}")
        self.model.grad_checkpointing = tc.grad_checkpointing
        self.sharded = tc.parallel == "fsdp" and self.world > 1  # every rank holds 1/N of each tensor
        self.objective = Objective(self.model, tc.layout, tc.context_noise)
        if tc.parallel == "fsdp":  # the model is sharded in place; the objective calls it as it is
            self.synced = parallel.wrap(self.model, "fsdp", tc.mixed_precision == "bf16")
        else:
            self.objective = self.synced = parallel.wrap(self.objective, "ddp", device=self.device)
        self.ema = EMA(self.model, tc.ema_decay)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
        self.dataset, self.val_dataset = dataset, val_dataset
        self.text = TextCache(text_encoder) if text_encoder is not None else None
        if model_cfg.conditioning == "text" and self.text is None:
            raise ValueError("a text-conditioned model needs a text encoder")
        self.out_dir = Path(out_dir) if out_dir else None
        self.extra_meta = extra_meta or {}
        self.step = 0
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty")
        need = clip_frames(model_cfg)
        have = dataset[0]["video"].shape[1]
        if have < need:
            raise ValueError(f"training clips have {have} frames; this layout needs {need} "
                             + ("(clip_length)" if model_cfg.temporal == "bidirectional" else "(longest prefix + one chunk)"))

    # -- one step ------------------------------------------------------------------------------
    def _autocast(self):
        if self.tc.autocast == "off":
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _condition(self, items, draws: Draws, dropout: float) -> dict:
        """Objective inputs for the batch's conditioning: text or labels, and which to drop."""
        cfg = self.model.config
        if cfg.conditioning == "none":
            return {}
        drop = draws.rand(len(items)) < dropout
        if cfg.conditioning == "text":
            return dict(text=self.text([it["caption"] for it in items], self.device), drop=drop)
        return dict(labels=torch.tensor([it["label"] for it in items], device=self.device), drop=drop)

    def batch(self, step: int, micro: int):
        """This rank's share of a step's micro-batch: items, video and ``Draws``. Sample j of the
        global batch has its own generator (seed, step, micro, j) and rank r takes samples
        [r B/W, (r + 1) B/W); the prefix length comes from the shared (seed, step, micro) generator."""
        local = self.tc.batch_size // self.world
        positions = range(self.rank * local, (self.rank + 1) * local)
        gens = [torch.Generator().manual_seed(mix_seed(self.tc.seed, step, micro, j)) for j in positions]
        idx = [int(torch.randint(0, len(self.dataset), (1,), generator=g)) for g in gens]
        items = [self.dataset[i] for i in idx]
        video = torch.stack([it["video"] for it in items]).to(self.device)
        return items, video, Draws(torch.Generator().manual_seed(mix_seed(self.tc.seed, step, micro)), gens)

    def train_step(self) -> dict:
        tc, cfg = self.tc, self.model.config
        lr = lr_at(self.step, tc)
        for g in self.opt.param_groups:
            g["lr"] = lr
        total = torch.zeros((), dtype=torch.float64)
        for micro in range(tc.grad_accum):
            items, video, draws = self.batch(self.step, micro)
            choices = prefix_choices(cfg)
            n_prefix = choices[draws.choice(len(choices))]
            sync = micro == tc.grad_accum - 1  # gradients are averaged over the ranks once per step
            with self._autocast(), parallel.grad_sync(self.synced, sync):
                loss = self.objective(video, draws, n_prefix=n_prefix, **self._condition(items, draws, tc.caption_dropout))
                (loss / tc.grad_accum).backward()
            total += loss.detach().double().cpu() / tc.grad_accum
        if self.world > 1:  # the logged loss is the global batch's; a NaN on one rank reaches every rank
            total = total.to(self.device)
            dist.all_reduce(total)
            total = total.cpu() / self.world
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss is {total.item()} at step {self.step + 1}; stopping without "
                                     f"saving (the last checkpoint on disk is intact)")
        grad_norm = parallel.clip_grad_norm(self.model.parameters(), tc.grad_clip)  # the global norm
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.model, self.step)
        self.step += 1
        return dict(step=self.step, loss=total.item(), lr=lr, grad_norm=grad_norm)

    def ranks_max_difference(self) -> float:
        """Largest |weight on a rank - weight on rank 0| over all parameters (0 in one process; DDP:
        FSDP ranks hold different shards by design)."""
        if self.world == 1 or self.sharded:
            return 0.0
        flat = torch.cat([p.detach().reshape(-1).double() for p in self.model.parameters()])
        ref = flat.clone()
        dist.broadcast(ref, 0)
        diff = (flat - ref).abs().max()
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        return diff.item()

    # -- validation ---------------------------------------------------------------------------
    @torch.no_grad()
    def validation_loss(self, use_ema: bool = True) -> float:
        """Loss on held-out clips: one noisy chunk after the fullest clean window (a bidirectional model:
        the whole clip), fixed noise levels."""
        if not self.val_dataset:
            return float("nan")
        model = self.model
        backup = None
        if use_ema:
            backup = {k: v.clone() for k, v in model.state_dict().items()}
            self.ema.copy_to(model)
        model.eval()
        cfg, losses = model.config, []
        n_prefix = max(prefix_choices(cfg))
        n = min(len(self.val_dataset), self.tc.val_clips)
        objective = Objective(model, "full-clip" if cfg.temporal == "bidirectional" else "prefix")
        for start in range(0, n, self.tc.batch_size):
            items = [self.val_dataset[i] for i in range(start, min(n, start + self.tc.batch_size))]
            video = torch.stack([it["video"] for it in items]).to(self.device)
            draws = Draws(torch.Generator().manual_seed(mix_seed(12345, start)))
            with self._autocast():
                loss = objective(video, draws, n_prefix=n_prefix, **self._condition(items, draws, 0.0))
                losses.append(loss.item() * len(items))
        model.train()
        if backup is not None:
            model.load_state_dict(backup)
        return sum(losses) / n

    # -- checkpoints --------------------------------------------------------------------------
    def ema_model(self) -> nn.Module:
        """A new model (on the CPU) holding the EMA weights (sharded: gathered, every rank calls)."""
        model = build_model(self.model.config)
        shadow = parallel.full_state(self.ema.shadow)
        model.load_state_dict({k: shadow.get(k, v).to(v.dtype) for k, v in model.state_dict().items()})
        return model

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What a resume needs, by name (the live tensors: loading into them restores the run): raw
        weights ``raw.*``, EMA ``ema.*``, optimizer moments and step counters ``opt.*``. Under FSDP
        they are this rank's DTensor shards."""
        init_optimizer_state(self.opt)
        tensors = {f"raw.{k}": v for k, v in self.model.state_dict().items()}
        tensors |= {f"ema.{k}": v for k, v in self.ema.shadow.items()}
        return tensors | optimizer_tensors(self.opt, self.model, "opt")

    def save(self, path):
        """EMA weights as the model (for generation); raw weights and optimizer moments to resume.
        ``parallel='fsdp'``: the sharded checkpoint of ``parallel.save_sharded`` (every rank calls)."""
        ema_model = self.ema_model()
        meta = dict(model=self.model.config.to_dict(), train=_jsonable(asdict(self.tc)), step=self.step,
                    **self.extra_meta)
        if self.tc.parallel == "fsdp":
            parallel.save_sharded(path, self.state_tensors(), meta, ema_model.state_dict())
            return
        tensors = {f"raw.{k}": v for k, v in self.model.state_dict().items()}
        tensors |= optimizer_tensors(self.opt, self.model, "opt")
        meta.pop("model")
        save_checkpoint(path, ema_model, meta, tensors)

    def init_from(self, path) -> list[str]:
        """Start from another checkpoint's weights (its ``model.safetensors``), model and EMA alike.
        The model config may add modules (they keep their initialisation; their names are returned)
        but nothing else may differ: a removed key or another shape is a ``CheckpointError``."""
        state = load_tensors(Path(path) / "model.safetensors")
        plain = build_model(self.model.config) if self.sharded else self.model
        new = load_state(plain, state, Path(path) / "model.safetensors", allow_missing=True)
        if self.sharded:  # checked on a whole copy, then each rank takes its shards
            parallel.copy_full(self.model.state_dict(), plain.state_dict())
        self.ema = EMA(self.model, self.tc.ema_decay)
        return new

    def resume(self, path):
        meta = read_config(path)
        if model_config(meta["model"]) != self.model.config:
            raise CheckpointError(f"{path} was trained with a different model config")
        if parallel.is_sharded_checkpoint(path):  # at any number of ranks, sharded or not
            parallel.load_sharded(path, self.state_tensors())
            self.step = int(meta["step"])
            return
        if self.sharded:
            raise CheckpointError(f"{path} is a DDP checkpoint (train.safetensors): resume it with "
                                  "train.parallel=ddp, or start an FSDP run from it with train.init_from")
        ema_state = load_tensors(Path(path) / "model.safetensors")
        tensors = load_tensors(Path(path) / "train.safetensors")
        raw = {k[4:]: v for k, v in tensors.items() if k.startswith("raw.")}
        load_state(self.model, raw, Path(path) / "train.safetensors")
        self.ema.shadow = {k: ema_state[k].float().clone() for k in self.ema.shadow}
        try:
            load_optimizer(self.opt, self.model, tensors, "opt", path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        self.step = int(meta["step"])

    # -- the loop -----------------------------------------------------------------------------
    def run(self, log=print) -> list[dict]:
        """Train to ``tc.steps``. Rank 0 logs, writes ``metrics.csv`` (and TensorBoard events when
        ``tensorboard`` is installed), validates, writes sample videos and saves checkpoints."""
        tc, history, main = self.tc, [], self.rank == 0
        metrics = board = None
        if self.out_dir and main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            new = not (self.out_dir / "metrics.csv").exists()
            metrics = open(self.out_dir / "metrics.csv", "a", newline="")
            writer = csv.DictWriter(metrics, ["step", "loss", "lr", "grad_norm", "it_per_s", "val_loss", "minutes"])
            if new:
                writer.writeheader()
            board = _tensorboard(self.out_dir / "tensorboard")
        t0, last = time.perf_counter(), time.perf_counter()
        loss_sum, n_steps, seconds = 0.0, 0, 0.0  # since the last progress line
        try:
            while self.step < tc.steps:
                row = self.train_step()
                now = time.perf_counter()
                row["it_per_s"] = 1.0 / max(1e-9, now - last)
                loss_sum, n_steps, seconds = loss_sum + row["loss"], n_steps + 1, seconds + now - last
                row["minutes"] = (now - t0) / 60
                row["val_loss"] = ""
                history.append(row)
                if not main and not self.sharded:  # under FSDP every rank gathers for what follows
                    last = time.perf_counter()
                    continue
                if tc.eval_every and self.step % tc.eval_every == 0:
                    row["val_loss"] = self.validation_loss()
                    if self.out_dir and tc.sample_videos:
                        self.write_samples(self.out_dir / "samples" / f"step_{self.step:07d}.gif")
                if main and (self.step % tc.log_every == 0 or row["val_loss"] != ""):
                    val = f" val {row['val_loss']:.4f}" if row["val_loss"] != "" else ""
                    log(f"step {self.step}/{tc.steps} loss {loss_sum / n_steps:.4f} lr {row['lr']:.2e} "
                        f"{n_steps / max(1e-9, seconds):.2f} it/s{val}")  # means since the last line
                    loss_sum, n_steps, seconds = 0.0, 0, 0.0
                if metrics:
                    writer.writerow(row)
                    metrics.flush()
                if board:
                    for key in ("loss", "lr", "grad_norm", "val_loss"):
                        if row[key] != "":
                            board.add_scalar(f"train/{key}", row[key], self.step)
                if self.out_dir and ((tc.save_every and self.step % tc.save_every == 0) or self.step == tc.steps):
                    self.save(self.out_dir / "checkpoint")
                last = time.perf_counter()  # validation, samples and saving do not count in it/s
        finally:
            if metrics:
                metrics.close()
            if board:
                board.close()
        if self.world > 1 and not self.sharded:
            diff = self.ranks_max_difference()
            if main:
                log(f"{self.world} ranks in sync: max |weight on rank r - weight on rank 0| = {diff:.3g}")
            if diff > 0:
                raise RuntimeError(f"DDP ranks diverged (max weight difference {diff})")
        return history

    def write_samples(self, path) -> Path | None:
        """A short video from the EMA weights and the first held-out clips' conditioning (GIF)."""
        from ..generate import write_sample_gif

        if not self.val_dataset:
            return None
        n = min(self.tc.sample_videos, len(self.val_dataset))
        model = self.ema_model().to(self.device).eval()
        if self.rank != 0:  # it took part in the gather
            return None
        encode = (lambda captions: self.text(captions, self.device)) if self.text else None
        return write_sample_gif(model, [self.val_dataset[i] for i in range(n)], path, self.tc.sample_frames,
                                encode, steps=self.tc.sample_steps)


def _tensorboard(log_dir):
    """A TensorBoard SummaryWriter when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(log_dir))


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _autoencoder_spec(cfg: dict, dataset) -> str:
    """What decodes this run's latents (recorded in checkpoints for generation)."""
    spec = getattr(dataset, "autoencoder", None)
    if spec is not None and not isinstance(spec, str):  # EncodedDataset holds the autoencoder itself
        spec = spec.spec
    return spec or cfg.get("data", {}).get("autoencoder") or "pixel"


def _init_distributed() -> str:
    """Join the process group ``torchrun`` describes (NCCL on GPU, gloo on CPU); return the device."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


def train_from_config(cfg: dict, resume: bool = True, log=print) -> Trainer:
    """Build everything a run config describes, resume from its checkpoint if present, train.
    Under ``torchrun --nproc_per_node N`` every process runs this; rank 0 alone writes."""
    import yaml

    model_cfg = model_config(cfg.get("model", {}))
    tc = TrainConfig.from_dict(cfg.get("train", {}))
    out_dir = Path(cfg.get("out_dir", "runs/default"))
    frames = clip_frames(model_cfg)
    train_set = build_dataset(cfg.get("data", {}), frames, "train")
    val_set = build_dataset(cfg.get("data", {}), frames, "val")
    encoder = None
    if model_cfg.conditioning == "text":
        from ..text import get_text_encoder

        encoder = get_text_encoder("cpu")
    device = _init_distributed()
    rank, world = _distributed()
    say = log if rank == 0 else (lambda *a, **k: None)
    try:
        trainer = Trainer(model_cfg, tc, train_set, val_set, encoder, out_dir, device,
                          extra_meta={"data": cfg.get("data", {}), "autoencoder": _autoencoder_spec(cfg, train_set)})
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        if resume and (out_dir / "checkpoint" / "config.json").is_file():
            trainer.resume(out_dir / "checkpoint")
            say(f"resumed from {out_dir / 'checkpoint'} at step {trainer.step}")
        elif tc.init_from:
            new = trainer.init_from(tc.init_from)
            say(f"initialised from {tc.init_from}" + (f"; new: {', '.join(new)}" if new else ""))
        n_params = sum(p.numel() for p in trainer.model.parameters())
        procs = f" x {world} processes (global batch {tc.batch_size})" if world > 1 else ""
        say(f"training {n_params / 1e6:.2f}M parameters on {device}{procs}, clips of {frames} frames, "
            f"{len(train_set)} train / {len(val_set) if val_set else 0} val clips, output in {out_dir}")
        trainer.run(say)
        if world > 1:
            dist.barrier()  # every rank done (rank 0 has written) before any rank tears the group down
    finally:
        if world > 1:
            dist.destroy_process_group()
    return trainer
