"""Training: the Ca2-VDM recipe on the full-sequence masked forward.

One training step (``ca2vdm_loss``):

1. Choose one prefix length for the batch from whole chunks: {p, p + l, p + 2l, ...} <= P_max
   (with ``prefix_frames`` = 0 that includes 0: clips with no prefix teach a prompt to start a video).
2. Cut every clip to prefix + l frames. Prefix frames stay clean (sigma = 0, told time 0),
   optionally noise-augmented (``prefix_noise``) exactly as ``generate(context_noise=...)`` does.
3. Noise the last l frames at one random level per clip, run the masked full-sequence forward (the
   same attention sets as cached inference), and take the loss on the noisy frames only.
4. When prefix + l fills the cyclic table (the clip fills the window), shift the TPE rows at random
   so every rotation inference meets is seen.

All randomness of step s comes from generators seeded by (seed, s) for what the batch shares and
by (seed, s, j) for sample j (``Draws``), so a resumed run draws the same batches and noise as one
that never stopped, and N DDP ranks together draw what one process would. Weights, EMA, optimizer
moments and metadata are saved with ``checkpoint.save_checkpoint`` (safetensors, atomic).
"""

import contextlib
import csv
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .diffusion import mix_seed
from .checkpoint import CheckpointError, load_state, load_tensors, read_config, save_checkpoint
from .model import CausalVideoDiT, ModelConfig, Text, coerce_fields


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings (the model has its own ``ModelConfig``)."""

    steps: int = 2000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 4e-4               # from scratch: larger than the paper's fine-tuning 2e-5
    min_lr_ratio: float = 0.1      # cosine decay to lr * min_lr_ratio
    warmup: int = 200
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.99)
    grad_clip: float = 1.0
    ema_decay: float = 0.999       # the EMA's decay warms up as (1 + s) / (10 + s) up to this
    caption_dropout: float = 0.1   # share of captions replaced by the null prompt (for guidance)
    prefix_noise: float = 0.0      # prefix noise augmentation level (sigma for flow, timestep for eps)
    autocast: str = "auto"         # "auto": bf16 (attention fp32) on CPU and CUDA; "off": model dtype
    layout: str = "prefix"         # "prefix": the paper's one-prefix-per-batch recipe; "all-chunks": teacher forcing
    grad_checkpointing: bool = False
    init_from: str | None = None   # a checkpoint directory whose (EMA) weights start a new run (fine-tuning)
    eval_every: int = 250
    save_every: int = 250
    val_clips: int = 32
    sample_videos: int = 1         # videos written to <out_dir>/samples at every evaluation (0: none)
    sample_frames: int = 32
    sample_steps: int = 10
    log_every: int = 10            # progress line: mean loss and it/s over these steps
    seed: int = 0

    def __post_init__(self):
        self.betas = tuple(self.betas)
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)}: must be at least 1")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"TrainConfig.caption_dropout={self.caption_dropout}: must be in [0, 1)")
        if self.autocast not in ("auto", "off"):
            raise ValueError(f"TrainConfig.autocast={self.autocast!r}: must be 'auto' or 'off'")
        if self.log_every < 1:
            raise ValueError(f"TrainConfig.log_every={self.log_every}: must be at least 1")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)}: must be 0 (off) or more")
        if self.eval_every and self.val_clips < 1:
            raise ValueError(f"TrainConfig.val_clips={self.val_clips}: must be at least 1 when eval_every > 0")
        if self.layout not in ("prefix", "all-chunks"):
            raise ValueError(f"TrainConfig.layout={self.layout!r}: must be 'prefix' or 'all-chunks'")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {', '.join(unknown)}")
        return cls(**coerce_fields(cls, d))


def prefix_choices(cfg: ModelConfig) -> list[int]:
    """Prefix lengths for the recipe: whole chunks p, p + l, ... <= P_max, and P_max itself.

    When P_max - p is not a multiple of l, inference windows hold P_max frames that begin mid-chunk
    once the window slides; the extra choice P_max trains exactly that (see ``prefix_start``).
    """
    out, n = [], cfg.prefix_frames
    while n <= cfg.max_context_frames:
        out.append(n)
        n += cfg.chunk_frames
    if out[-1] != cfg.max_context_frames:
        out.append(cfg.max_context_frames)
    return out


def prefix_start(cfg: ModelConfig, n_prefix: int) -> int:
    """Absolute index of a training clip's first frame, so that its noisy chunk starts a chunk."""
    lay, k = cfg.layout, 1
    while lay.chunk_start(k) < n_prefix:
        k += 1
    return lay.chunk_start(k) - n_prefix


def clip_frames(cfg: ModelConfig) -> int:
    """Frames a training clip needs: up to a chunk whose window is full (P_max frames), plus that chunk."""
    lay, k = cfg.layout, 1
    while lay.chunk_start(k) < cfg.max_context_frames:
        k += 1
    return lay.chunk_start(k) + cfg.chunk_frames


class Draws:
    """The random numbers of one training batch.

    ``batch`` draws what the whole batch shares (the prefix length, the TPE shift); ``samples``
    holds one generator per sample for its dataset index, caption dropout, noise and noise level,
    so a sample's randomness does not depend on the batch position, rank or micro-batch it lands
    in (the key to DDP == one process). With ``samples=None`` every draw comes from ``batch``.
    """

    def __init__(self, batch: torch.Generator, samples: list | None = None):
        self.batch, self.samples = batch, samples

    @classmethod
    def of(cls, gen: "torch.Generator | Draws") -> "Draws":
        return gen if isinstance(gen, cls) else cls(gen)

    def randn(self, shape) -> torch.Tensor:  # (B, ...) float32 on the CPU
        if self.samples is None:
            return torch.randn(shape, generator=self.batch)
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in self.samples])

    def rand(self, batch: int) -> torch.Tensor:  # (B,)
        if self.samples is None:
            return torch.rand(batch, generator=self.batch)
        return torch.cat([torch.rand(1, generator=g) for g in self.samples])

    def levels(self, diffusion, batch: int, n: int) -> torch.Tensor:  # (B, n) training noise levels
        if self.samples is None:
            return diffusion.sample_levels((batch, n), generator=self.batch)
        return torch.cat([diffusion.sample_levels((1, n), generator=g) for g in self.samples])

    def choice(self, n: int) -> int:  # one integer in [0, n) for the whole batch
        return int(torch.randint(0, n, (1,), generator=self.batch))


def ca2vdm_loss(model: CausalVideoDiT, video: torch.Tensor, cond, n_prefix: int, gen: "torch.Generator | Draws",
                prefix_noise: float = 0.0) -> torch.Tensor:
    """The recipe's loss for one batch. video (B, C, >= n_prefix + l, H, W), clean, in model units.
    gen: a generator, or ``Draws`` with one generator per sample."""
    cfg, diff, draws = model.config, model.diffusion, Draws.of(gen)
    l = cfg.chunk_frames
    x0 = video[:, :, :n_prefix + l]
    B, Fr, dev = x0.shape[0], x0.shape[2], x0.device
    noise = draws.randn(x0.shape).to(dev, x0.dtype)
    level = draws.levels(diff, B, 1).expand(B, l).to(dev)  # one level per clip
    noisy = diff.add_noise(x0[:, :, n_prefix:], noise[:, :, n_prefix:], level)
    prefix = x0[:, :, :n_prefix]
    if prefix_noise and n_prefix:
        aug = draws.randn(prefix.shape).to(dev, x0.dtype)
        lv = torch.full((B, n_prefix), prefix_noise, dtype=torch.float64, device=dev)
        prefix = diff.add_noise(prefix, aug, lv)
    xt = torch.cat([prefix, noisy], dim=2)
    t = torch.cat([torch.zeros(B, n_prefix, dtype=torch.float64, device=dev), diff.model_time(level)], dim=1)
    shift = 0
    if cfg.positions == "cyclic" and Fr >= cfg.cyclic_length:
        shift = draws.choice(cfg.cyclic_length)
    pred = model(xt, t, cond, start=prefix_start(cfg, n_prefix), tpe_shift=shift)[:, :, n_prefix:]
    target = model.target(x0[:, :, n_prefix:], noise[:, :, n_prefix:], level)
    return F.mse_loss(pred.float(), target.float())


def all_chunks_loss(model: CausalVideoDiT, video: torch.Tensor, cond, gen: "torch.Generator | Draws",
                    prefix_noise: float = 0.0) -> torch.Tensor:
    """The all-chunks-at-once variant (DESIGN §4, Self-Forcing's teacher forcing): one pass over a clean
    clip and noisy copies of all its generated chunks, one noise level per (clip, chunk), loss on every
    noisy frame. Each noisy chunk sees exactly what cached inference shows it."""
    cfg, diff, draws = model.config, model.diffusion, Draws.of(gen)
    Fr = clip_frames(cfg)
    x0 = video[:, :, :Fr]
    B, dev, p = x0.shape[0], x0.device, cfg.prefix_frames
    n_chunks = (Fr - p) // cfg.chunk_frames
    noise = draws.randn(x0[:, :, p:].shape).to(dev, x0.dtype)
    level = draws.levels(diff, B, n_chunks).repeat_interleave(cfg.chunk_frames, dim=1).to(dev)
    noisy = diff.add_noise(x0[:, :, p:], noise, level)
    clean = x0
    if prefix_noise:
        aug = draws.randn(x0.shape).to(dev, x0.dtype)
        clean = diff.add_noise(x0, aug, torch.full((B, Fr), prefix_noise, dtype=torch.float64, device=dev))
    shift = 0
    if cfg.positions == "cyclic" and Fr >= cfg.cyclic_length:
        shift = draws.choice(cfg.cyclic_length)
    pred = model.forward_teacher_forcing(clean, noisy, diff.model_time(level), cond, tpe_shift=shift)
    target = model.target(x0[:, :, p:], noise, level)
    return F.mse_loss(pred.float(), target.float())


class EMA:
    """Exponential moving average of the weights with a warming-up decay min(d, (1 + s) / (10 + s))."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)

    def copy_to(self, model):
        state = model.state_dict()
        model.load_state_dict({k: self.shadow.get(k, v).to(v.dtype) for k, v in state.items()})


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


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


def drop_captions(model: CausalVideoDiT, text: Text, drop: torch.Tensor) -> Text:
    """Replace the prompts where ``drop`` (B,) is True by the learned null prompt."""
    null = F.pad(model.null_text.to(text.states.dtype), (0, 0, 0, text.states.shape[1] - 1))  # (N, Dt)
    null_mask = torch.zeros_like(text.mask[0])
    null_mask[0] = True
    d = drop.to(text.states.device)
    return Text(torch.where(d[:, None, None], null[None], text.states), torch.where(d[:, None], null_mask[None], text.mask))


class Objective(nn.Module):
    """The training loss of one (micro-)batch as a module over the model, so that
    ``DistributedDataParallel`` can wrap it: conditioning, noising and the loss all run inside
    ``forward``, whichever layout (``prefix`` or ``all-chunks``) is trained."""

    def __init__(self, model: CausalVideoDiT, layout: str = "prefix", prefix_noise: float = 0.0):
        super().__init__()
        self.model, self.layout, self.prefix_noise = model, layout, prefix_noise

    def forward(self, video, draws: Draws, text: Text | None = None, labels=None, drop=None, n_prefix: int = 0):
        # video (B, C, F, H, W); drop (B,) bool: captions / labels replaced by the null condition
        model, B = self.model, video.shape[0]
        cond = None
        if text is not None:
            cond = model.condition(B, drop_captions(model, text, drop))
        elif labels is not None:
            cond = model.condition(B, labels=torch.where(drop.to(labels.device), model.config.num_classes, labels))
        if self.layout == "all-chunks":
            return all_chunks_loss(model, video, cond, draws, self.prefix_noise)
        return ca2vdm_loss(model, video, cond, n_prefix, draws, self.prefix_noise)


def _distributed() -> tuple[int, int]:
    """(rank, world size) of an initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """Owns the model, its EMA, the optimizer and the step counter; ``run`` trains to ``tc.steps``.

    Under ``torchrun`` (an initialised process group) the model is wrapped in
    ``DistributedDataParallel``: ``tc.batch_size`` is the global batch, every rank draws and loads
    only its own share of it (samples seeded per global position), gradients are averaged, and
    rank 0 alone logs, validates and saves.
    """

    def __init__(self, model_cfg: ModelConfig, tc: TrainConfig, dataset, val_dataset=None, text_encoder=None,
                 out_dir=None, device="cpu", extra_meta: dict | None = None):
        self.tc, self.device = tc, torch.device(device)
        self.rank, self.world = _distributed()
        if tc.batch_size % self.world:
            raise ValueError(f"TrainConfig.batch_size={tc.batch_size} (the global batch) must be divisible by the "
                             f"{self.world} processes")
        torch.manual_seed(tc.seed)
        self.model = CausalVideoDiT(model_cfg).to(self.device).train()
        self.model.grad_checkpointing = tc.grad_checkpointing
        self.objective = Objective(self.model, tc.layout, tc.prefix_noise)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.objective = nn.parallel.DistributedDataParallel(self.objective, device_ids=ids)
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
            raise ValueError(f"training clips have {have} frames; this layout needs {need} (longest prefix + one chunk)")

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
            sync = self.world == 1 or micro == tc.grad_accum - 1  # DDP averages gradients once per step
            with self._autocast(), (contextlib.nullcontext() if sync else self.objective.no_sync()):
                loss = self.objective(video, draws, n_prefix=n_prefix, **self._condition(items, draws, tc.caption_dropout))
                (loss / tc.grad_accum).backward()
            total += loss.detach().double().cpu() / tc.grad_accum
        if self.world > 1:  # the logged loss is the global batch's
            total = total.to(self.device)
            dist.all_reduce(total)
            total = total.cpu() / self.world
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss is {total.item()} at step {self.step + 1}; stopping without "
                                     f"saving (the last checkpoint on disk is intact)")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip).item()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.model, self.step)
        self.step += 1
        return dict(step=self.step, loss=total.item(), lr=lr, grad_norm=grad_norm)

    def ranks_max_difference(self) -> float:
        """Largest |weight on a rank - weight on rank 0| over all parameters (0 in one process)."""
        if self.world == 1:
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
        """Loss on held-out clips: one noisy chunk after the fullest clean window, fixed noise levels."""
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
        objective = Objective(model)
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
    def ema_model(self) -> CausalVideoDiT:
        """A new model (on the CPU) holding the EMA weights."""
        model = CausalVideoDiT(self.model.config)
        self.ema.copy_to(model)
        return model

    def save(self, path):
        """EMA weights as the model (for generation); raw weights and optimizer moments to resume."""
        ema_model = self.ema_model()
        tensors = {f"raw.{k}": v for k, v in self.model.state_dict().items()}
        names = {p: n for n, p in self.model.named_parameters()}
        for p, st in self.opt.state.items():
            for k, v in st.items():
                tensors[f"opt.{names[p]}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        meta = dict(train=_jsonable(asdict(self.tc)), step=self.step, **self.extra_meta)
        save_checkpoint(path, ema_model, meta, tensors)

    def init_from(self, path) -> list[str]:
        """Start from another checkpoint's weights (its ``model.safetensors``), model and EMA alike.
        The model config may add modules (they keep their initialisation; their names are returned)
        but nothing else may differ: a removed key or another shape is a ``CheckpointError``."""
        state = load_tensors(Path(path) / "model.safetensors")
        new = load_state(self.model, state, Path(path) / "model.safetensors", allow_missing=True)
        self.ema = EMA(self.model, self.tc.ema_decay)
        return new

    def resume(self, path):
        meta = read_config(path)
        if ModelConfig.from_dict(meta["model"]) != self.model.config:
            raise CheckpointError(f"{path} was trained with a different model config")
        ema_state = load_tensors(Path(path) / "model.safetensors")
        tensors = load_tensors(Path(path) / "train.safetensors")
        raw = {k[4:]: v for k, v in tensors.items() if k.startswith("raw.")}
        load_state(self.model, raw, Path(path) / "train.safetensors")
        self.ema.shadow = {k: ema_state[k].float().clone() for k in self.ema.shadow}
        params = dict(self.model.named_parameters())
        for key, v in tensors.items():
            if key.startswith("opt."):
                name, field = key[4:].rsplit(".", 1)
                self.opt.state[params[name]][field] = v.to(self.device)
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
                if not main:
                    last = time.perf_counter()
                    continue
                if tc.eval_every and self.step % tc.eval_every == 0:
                    row["val_loss"] = self.validation_loss()
                    if self.out_dir and tc.sample_videos:
                        self.write_samples(self.out_dir / "samples" / f"step_{self.step:07d}.gif")
                if self.step % tc.log_every == 0 or row["val_loss"] != "":
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
        if self.world > 1:
            diff = self.ranks_max_difference()
            if main:
                log(f"{self.world} ranks in sync: max |weight on rank r - weight on rank 0| = {diff:.3g}")
            if diff > 0:
                raise RuntimeError(f"DDP ranks diverged (max weight difference {diff})")
        return history

    @torch.no_grad()
    def write_samples(self, path) -> Path | None:
        """A short video from the EMA weights and the first held-out clips' conditioning (GIF)."""
        from .generate import generate_video
        from .video import VideoWriter

        cfg = self.model.config
        if cfg.in_channels != 3 or not self.val_dataset:
            return None
        model = self.ema_model().to(self.device).eval()
        n = min(self.tc.sample_videos, len(self.val_dataset))
        items = [self.val_dataset[i] for i in range(n)]
        kw = dict(steps=self.tc.sample_steps, seed=list(range(n)))
        if cfg.prefix_frames:
            kw["first_frames"] = torch.stack([it["video"][:, :cfg.prefix_frames] for it in items]).to(self.device)
        if cfg.conditioning == "text":
            kw["prompt"], kw["guidance"] = self.text([it["caption"] for it in items], self.device), 4.0
        elif cfg.conditioning == "class":
            kw["labels"], kw["guidance"] = torch.tensor([it["label"] for it in items]), 4.0
        frames = max(self.tc.sample_frames, cfg.prefix_frames + cfg.chunk_frames)
        video = generate_video(model, frames, **kw).float().clamp(-1, 1).cpu()  # (n, C, F, H, W)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = VideoWriter(path, fps=8, scale=4)
        try:
            writer.write(torch.cat(list(video), dim=-1))  # the videos side by side
        finally:
            writer.close()
        return path


def _tensorboard(log_dir):
    """A TensorBoard SummaryWriter when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(log_dir))


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# --------------------------------------------------------------------------------------------
# Run configuration: YAML with `model`, `data` and `train` sections, plus --set overrides
# --------------------------------------------------------------------------------------------
def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a nested dict."""
    import yaml

    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        node, parts = cfg, key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return cfg


def load_run_config(path, overrides: list[str] = ()) -> dict:
    """Read a run config YAML and apply overrides; validates the model and train sections."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    cfg = yaml.safe_load(path.read_text()) or {}
    cfg = apply_overrides(cfg, list(overrides))
    unknown = sorted(set(cfg) - {"model", "data", "train", "out_dir"})
    if unknown:
        raise ValueError(f"{path}: unknown sections {', '.join(unknown)} (expected model, data, train, out_dir)")
    ModelConfig.from_dict(cfg.get("model", {}))
    TrainConfig.from_dict(cfg.get("train", {}))
    return cfg


def build_dataset(data: dict, frames: int, split: str):
    """The dataset named by a run config's ``data`` section, with clips of ``frames`` frames."""
    data = dict(data)
    kind = data.pop("dataset", "moving-digits")
    val_clips = data.pop("val_clips", 64)
    if kind == "latents":  # pre-encoded by `ca2vdm encode`: data.path (train) and data.val_path
        from .autoencoder import LatentDataset

        path = data.get("val_path") if split == "val" else data.get("path")
        if path is None:
            if split == "val":
                return None
            raise ValueError("data.path is required for dataset 'latents'")
        return LatentDataset(path, frames)
    spec = data.pop("autoencoder", None)
    if spec not in (None, "pixel"):  # encode every clip on the fly
        from .autoencoder import EncodedDataset, load_autoencoder

        return EncodedDataset(build_dataset(data | {"dataset": kind, "val_clips": val_clips}, frames, split),
                              load_autoencoder(spec))
    if kind == "moving-digits":
        from .data import MovingDigits

        num_clips = data.pop("num_clips", 20000)
        return MovingDigits(num_clips if split == "train" else val_clips, frames, split=split, **data)
    if kind in ("video-folder", "frame-folder"):
        from .data import FrameFolder, VideoFolder

        cls = VideoFolder if kind == "video-folder" else FrameFolder
        root = data.pop("root", None)
        if root is None:
            raise ValueError(f"data.root is required for dataset {kind!r}")
        data.setdefault("clips_per_video", 100)  # many random start points per video per "epoch"
        val_root = data.pop("val_root", None)
        if split == "val":
            if val_root is None:  # no held-out folder: other random clips of the same videos
                data["seed"] = data.get("seed", 0) + 1
                data["clips_per_video"] = max(1, val_clips // 2)
            else:
                root = val_root
        return cls(root, frames, **data)
    raise ValueError(f"unknown dataset {kind!r} (available: moving-digits, video-folder, frame-folder, latents)")


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

    model_cfg = ModelConfig.from_dict(cfg.get("model", {}))
    tc = TrainConfig.from_dict(cfg.get("train", {}))
    out_dir = Path(cfg.get("out_dir", "runs/default"))
    frames = clip_frames(model_cfg)
    train_set = build_dataset(cfg.get("data", {}), frames, "train")
    val_set = build_dataset(cfg.get("data", {}), frames, "val")
    encoder = None
    if model_cfg.conditioning == "text":
        from .text import get_text_encoder

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
    finally:
        if world > 1:
            dist.destroy_process_group()
    return trainer
