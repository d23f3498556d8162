"""``ca2vdm distill CONFIG.yaml``: a many-step causal teacher distilled into a few-step causal
student in three resumable stages, each in its own folder under ``out_dir``::

    ode-pairs   the teacher's trajectories at the student's levels     out_dir/pairs/pairs_*.safetensors
    ode-init    the student regresses their clean ends (from teacher)  out_dir/ode_init/checkpoint
    dmd         DMD with the self rollout (critic from the teacher)    out_dir/dmd/{state.safetensors, checkpoint}

Every stage picks up where it stopped: existing shards are kept, ode-init resumes from its
checkpoint (weights, EMA, optimizer moments, step), DMD from its state file (at any iteration).
Each training stage writes ``metrics.csv``, progress lines and sample GIFs (``samples/``); every
checkpoint is the student's EMA weights with its sampling recommendation (the levels, guidance 1),
so ``ca2vdm generate`` / ``eval`` / ``export`` take it as it is.

A bidirectional teacher (``temporal='bidirectional'``, CausVid's asymmetric distillation) needs
``student``, the causal checkpoint the student starts as; its pairs and DMD clips are its whole
clip (``clip_length`` frames), and the critic, a copy of it, learns whole clips.

Config (YAML): top-level ``out_dir``, ``teacher`` (a checkpoint directory), ``student`` (optional),
``levels`` (or ``steps`` + ``level_shift``: ``diffusion.warped_levels``), ``teacher_steps``, ``teacher_guidance``,
``autocast`` (bf16 | off), ``seed``, ``samples`` / ``sample_frames``; sections ``ode_pairs``
(``PairsConfig``), ``ode_init`` (a ``training.TrainConfig``: steps, batch_size, lr, warmup,
ema_decay, grad_clip, save_every, log_every, eval_every = sample GIF period) and ``dmd``
(``DMDRunConfig``: iterations, cpu_minutes, batch_size, exit_step, rollout, log_every, save_every, sample_every,
diagnose_every, and every ``DMDConfig`` field; ``dmd.real_guidance`` defaults to ``teacher_guidance``, the
guidance of the ODE pairs); ``parallel`` (ddp | fsdp), ``mixed_precision`` (off | bf16, fsdp) and
``grad_checkpointing`` for every stage under ``torchrun``; ``device`` (cpu | cuda: teacher, student,
critic, EMA and every tensor of the stages there; the random draws stay on CPU generators, so a run's
numbers do not depend on the device).

Under ``torchrun --nproc_per_node N`` (gloo on the CPU; nccl with ``device: cuda``, rank r on
``cuda:LOCAL_RANK``) the ranks share the work:
ode-pairs writes shard j on rank j % N (the teacher whole on each rank: no gradients); ode-init and
dmd split every batch (``ode_init.batch_size``, ``dmd.batch_size`` multiples of N) with the draws
made for the whole batch (``parallel.Rows``), so N ranks compute one process's steps. ``parallel:
fsdp`` shards the student / generator and critic with their optimizer moments and EMA, and the
frozen teacher (no optimizer); their checkpoints are ``parallel.save_sharded``'s (atomic,
pickle-free, resumable at any number of ranks) with the student's EMA weights beside them as the
``model.safetensors`` that ``generate`` loads. Rank 0 alone logs and writes metrics and samples.
"""

import copy
import csv
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..backbone import Backbone
from ..checkpoint import (CheckpointError, build_model, load_checkpoint, load_state, load_tensors, read_config,
                          save_checkpoint)
from ..config import coerce_fields
from ..data import build_dataset
from ..diffusion import mix_seed
from ..training import parallel
from ..training.config import TrainConfig, apply_overrides
from ..training.losses import clip_frames
from ..training.optim import EMA, init_optimizer_state, load_optimizer, lr_at, optimizer_tensors
from ..training.trainer import TextCache
from .diagnostic import diagnostic_columns, plot_diagnostic, score_diagnostic
from .dmd import DMD, DMDConfig
from .ode import ODEPairs, ode_regression_loss, write_ode_pairs
from .video import ROLLOUTS, VideoDMD

STAGES = ("ode-pairs", "ode-init", "dmd")


def _from_dict(cls, d: dict, owner: str):
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown {owner} fields: {', '.join(unknown)}")
    return cls(**coerce_fields(cls, d))


@dataclass
class PairsConfig:
    """The ode-pairs stage: how many teacher clips, how many per batch (and per shard)."""

    clips: int = 1024
    batch_size: int = 32

    def __post_init__(self):
        if self.clips < 1 or self.batch_size < 1:
            raise ValueError(f"ode_pairs: clips and batch_size must be at least 1, got {self.clips}, {self.batch_size}")


@dataclass
class DMDRunConfig:
    """The dmd stage's bookkeeping; ``dmd`` holds the algorithm's settings (``DMDConfig``)."""

    iterations: int = 1000
    cpu_minutes: float = 0.0        # > 0: also stop once the iterations have used this much CPU time (all
                                    # threads, across resumes): rows of a comparison get equal compute
    batch_size: int = 4
    exit_step: str = "random"       # "random": one exit step per iteration (Self-Forcing); "last"
    rollout: str = "self"           # "self": the student's own cached rollout; "diffusion-forcing": real clips,
                                    # every chunk noised on its own, one causal forward (CausVid)
    log_every: int = 10
    save_every: int = 50
    sample_every: int = 250
    init: str = ""                  # the checkpoint DMD starts from (default out_dir/ode_init/checkpoint): arms of a
                                    # comparison share one ODE init; its levels must be this config's
    diagnose_every: int = 50        # > 0: the score diagnostic (``diagnostic.score_diagnostic``) at iteration 1
                                    # and every this many, into metrics.csv (not counted in cpu_minutes)
    dmd: DMDConfig = field(default_factory=DMDConfig)

    @classmethod
    def from_dict(cls, d: dict) -> "DMDRunConfig":
        own = {f.name for f in fields(cls)} - {"dmd"}
        run = _from_dict(cls, {k: v for k, v in d.items() if k in own}, "dmd")
        run.dmd = _from_dict(DMDConfig, {k: v for k, v in d.items() if k not in own}, "dmd")
        if run.iterations < 1 or run.batch_size < 1 or run.log_every < 1 or run.save_every < 1:
            raise ValueError("dmd: iterations, batch_size, log_every and save_every must be at least 1")
        if run.diagnose_every < 0:
            raise ValueError(f"dmd.diagnose_every={run.diagnose_every}: must be 0 (off) or more iterations")
        if not run.cpu_minutes >= 0:
            raise ValueError(f"dmd.cpu_minutes={run.cpu_minutes}: must be 0 (no budget) or more")
        if run.exit_step not in ("random", "last"):
            raise ValueError(f"dmd.exit_step={run.exit_step!r}: must be 'random' or 'last'")
        if run.rollout not in ROLLOUTS:
            raise ValueError(f"dmd.rollout={run.rollout!r}: must be one of {', '.join(ROLLOUTS)}")
        return run


@dataclass
class DistillConfig:
    """A whole distillation run (see the module docstring for the YAML)."""

    out_dir: str = "runs/distill"
    teacher: str = ""
    student: str = ""               # the causal model the student starts as (default: the teacher, if causal)
    levels: list | None = None
    steps: int = 4
    level_shift: float | None = None
    teacher_steps: int = 20
    teacher_guidance: float = 4.0
    autocast: str = "bf16"
    seed: int = 0
    samples: int = 4
    sample_frames: int = 48
    parallel: str = "ddp"           # under torchrun: "ddp" (networks whole on every rank) or "fsdp" (sharded)
    mixed_precision: str = "off"    # fsdp: "bf16" parameters and compute, fp32 reduction and master weights
    grad_checkpointing: bool = False  # recompute each block's activations in backward (student, critic)
    device: str = "cpu"             # "cpu" or "cuda" (under torchrun: cuda:LOCAL_RANK, nccl) for every stage
    ode_pairs: PairsConfig = field(default_factory=PairsConfig)
    ode_init: TrainConfig = field(default_factory=TrainConfig)
    dmd: DMDRunConfig = field(default_factory=DMDRunConfig)

    @classmethod
    def from_dict(cls, d: dict) -> "DistillConfig":
        d = dict(d)
        sections = {"ode_pairs": lambda x: _from_dict(PairsConfig, x, "ode_pairs"),
                    "ode_init": TrainConfig.from_dict, "dmd": DMDRunConfig.from_dict}
        parts = {}
        for name, build in sections.items():
            value = d.pop(name, None) or {}
            if not isinstance(value, dict):
                raise ValueError(f"distill config: {name} must be a section (a mapping), got {value!r}")
            misplaced = sorted({"parallel", "mixed_precision", "grad_checkpointing", "device"} & set(value))
            if misplaced:
                raise ValueError(f"distill config: {', '.join(misplaced)} in the {name} section: set it at the "
                                 "top level (it holds for every stage)")
            parts[name] = build(value)
        cfg = _from_dict(cls, d, "distill config")
        for name, value in parts.items():
            setattr(cfg, name, value)
        if not cfg.teacher:
            raise ValueError("distill config: 'teacher' (a checkpoint directory) is required")
        if cfg.parallel not in parallel.PARALLEL:
            raise ValueError(f"distill config: parallel={cfg.parallel!r}: must be one of {', '.join(parallel.PARALLEL)}")
        if cfg.mixed_precision not in ("off", "bf16"):
            raise ValueError(f"distill config: mixed_precision={cfg.mixed_precision!r}: must be 'off' or 'bf16'")
        if cfg.mixed_precision != "off" and cfg.parallel != "fsdp":
            raise ValueError("distill config: mixed_precision='bf16' is FSDP's policy: it needs parallel='fsdp'")
        if cfg.device not in ("cpu", "cuda"):
            raise ValueError(f"distill config: device={cfg.device!r}: must be 'cpu' or 'cuda'")
        if cfg.autocast not in ("bf16", "off"):
            raise ValueError(f"distill config: autocast={cfg.autocast!r}: must be 'bf16' or 'off'")
        if cfg.levels is not None and "steps" in d and d["steps"] != len(cfg.levels):
            raise ValueError(f"distill config: steps={d['steps']} contradicts the {len(cfg.levels)} levels given")
        return cfg

    def amp(self):
        return torch.bfloat16 if self.autocast == "bf16" else None

    def student_levels(self, teacher: Backbone) -> list[float]:
        if self.levels is not None:
            levels = [float(s) for s in self.levels]
        else:
            levels = teacher.diffusion.warped_levels(self.steps, self.level_shift)
        teacher.diffusion.few_step_sampler(levels)  # refuses levels it could not sample
        return levels


def load_distill_config(path, overrides=()) -> DistillConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a distill config is a mapping of settings")
    return DistillConfig.from_dict(apply_overrides(raw, list(overrides)))


class _Metrics:
    """metrics.csv of a stage and the progress line every ``every`` rows. On resume at step ``start``
    the rows written after that step's checkpoint (``columns[0]`` > start) are dropped first, so the
    file holds each step once."""

    def __init__(self, path: Path, columns: list[str], every: int, log, start: int = 0):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            with open(path, newline="") as f:
                kept = [r for r in csv.DictReader(f) if r.get(columns[0]) and int(r[columns[0]]) <= start]
            tmp = path.with_name(f".{path.name}.tmp")
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, columns, extrasaction="ignore")
                w.writeheader()
                w.writerows(kept)
            os.replace(tmp, path)  # atomic: a crash here leaves the old file
        new = not path.exists()
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, columns, extrasaction="ignore")
        if new:
            self.writer.writeheader()
        self.every, self.log, self.rows, self.t = every, log, [], time.perf_counter()

    def add(self, row: dict, line: str):
        self.writer.writerow(row)
        self.file.flush()
        self.rows.append(row)
        if len(self.rows) >= self.every:
            rate = len(self.rows) / max(1e-9, time.perf_counter() - self.t)
            self.log(f"{line} {rate:.2f} it/s")
            self.rows, self.t = [], time.perf_counter()

    def close(self):
        self.file.close()


class _NoMetrics:
    """What ranks other than 0 keep instead of ``_Metrics``."""

    rows: list = []

    def add(self, row: dict, line: str):
        pass

    def close(self):
        pass


class Distillation:
    """The run: the teacher, the prompt pool, the text encoder; one method per stage. Every network
    and tensor of the stages lives on ``device`` (``parallel.join_group``'s; default ``cfg.device``)."""

    def __init__(self, cfg: DistillConfig, log=print, device=None):
        self.rank, self.world = parallel.world()
        self.cfg, self.log = cfg, log if self.rank == 0 else (lambda *a, **k: None)  # rank 0 alone logs
        self.device = torch.device(device or cfg.device)
        self.out = Path(cfg.out_dir)
        self.teacher = load_checkpoint(cfg.teacher, self.device).requires_grad_(False)
        self.teacher_meta = read_config(cfg.teacher)
        self.levels = cfg.student_levels(self.teacher)
        mc = self.teacher.config
        bidirectional = mc.temporal == "bidirectional"
        if bidirectional and not cfg.student:
            raise ValueError("distill config: a bidirectional teacher needs 'student', a causal checkpoint for the "
                             "student to start as")
        self.student_init = load_checkpoint(cfg.student, self.device) if cfg.student else self.teacher
        self.student_init.require_causal("the student")
        # the clip every stage works on: the teacher's whole clip, or the causal training clip
        self.frames = mc.clip_length if bidirectional else clip_frames(mc)
        data = self.teacher_meta.get("data", {})
        self.pool = build_dataset(data, self.frames, "train")  # prompts (and first frames) of the teacher's data
        self.val = build_dataset(data, max(self.frames, cfg.sample_frames), "val")
        self.encode = None
        if mc.conditioning == "text":
            from ..text import get_text_encoder

            text = TextCache(get_text_encoder("cpu"))  # the encoder on the CPU, its states moved
            self.encode = lambda captions: text(captions, self.device)
        self.meta = {"data": data, "autoencoder": self.teacher_meta.get("autoencoder", "pixel"),
                     "sampling": {"levels": self.levels, "steps": len(self.levels), "guidance": 1.0},
                     "distill": {"teacher": str(cfg.teacher), "config": _jsonable(asdict(cfg))}}

    # -- stage 1a -------------------------------------------------------------------------------
    def ode_pairs(self):
        c = self.cfg
        self.log(f"ode-pairs: {c.ode_pairs.clips} teacher clips of {self.frames} frames ({c.teacher_steps} steps, "
                 f"guidance {c.teacher_guidance}) at levels {[round(s, 4) for s in self.levels]} -> {self.out / 'pairs'}")
        write_ode_pairs(self.teacher, self.out / "pairs", lambda i: self.pool[i % len(self.pool)], self.levels,
                        self.frames, c.ode_pairs.clips, c.ode_pairs.batch_size, self.encode, c.teacher_steps,
                        c.teacher_guidance, seed=mix_seed(c.seed, 1), autocast=c.amp(), log=self.log,
                        part=(self.rank, self.world))
        parallel.barrier()  # every shard written before any rank reads them

    # -- stage 1b -------------------------------------------------------------------------------
    def ode_init(self):
        c, tc = self.cfg, self.cfg.ode_init
        folder = self.out / "ode_init"
        pairs = ODEPairs(self.out / "pairs", self.levels)
        student = self._prepare(copy.deepcopy(self.student_init).requires_grad_(True).train(), trains=True)
        ema = EMA(student, tc.ema_decay)
        opt = torch.optim.AdamW(student.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
        rows = parallel.Rows(tc.batch_size)  # this rank's share of every batch
        step = self._resume_ode_init(folder / "checkpoint", student, ema, opt)
        if step >= tc.steps:
            self.log(f"ode-init: done ({step} steps in {folder / 'checkpoint'})")
            return
        self.log(f"ode-init: {len(pairs)} pairs, {tc.steps} steps of batch {tc.batch_size}, from step {step}")
        metrics = self._metrics(folder / "metrics.csv", ["step", "loss", "lr", "grad_norm", "minutes"], tc.log_every,
                                step)
        t0 = time.perf_counter()
        amp = c.amp()
        try:
            while step < tc.steps:
                g = torch.Generator().manual_seed(mix_seed(tc.seed, step))
                idx = rows.take(torch.randint(len(pairs), (tc.batch_size,), generator=g).tolist())
                items = [pairs[i] for i in idx]
                video = torch.stack([it["video"] for it in items]).to(self.device, torch.float32)
                states = torch.stack([it["states"] for it in items]).to(self.device, torch.float32)
                lr = lr_at(step, tc)
                for group in opt.param_groups:
                    group["lr"] = lr
                prompt = self.encode([it["caption"] for it in items]) if self.encode else None
                labels = torch.tensor([it["label"] for it in items]) if "label" in items[0] else None
                with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
                    cond = student.condition(len(items), prompt, labels)
                    loss = ode_regression_loss(student, video, states, self.levels, cond, g, rows)
                mean = parallel.mean_over_ranks(loss)  # the global batch's; a NaN on one rank is on all
                if not torch.isfinite(mean):
                    raise FloatingPointError(f"ode-init loss is {mean.item()} at step {step + 1}; stopping without "
                                             "saving (the last checkpoint on disk is intact)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                parallel.average_gradients(student)  # ddp ranks; FSDP reduced them in backward
                norm = parallel.clip_grad_norm(student.parameters(), tc.grad_clip)  # over every rank's shards
                opt.step()
                ema.update(student, step)
                step += 1
                row = dict(step=step, loss=mean.item(), lr=lr, grad_norm=norm, minutes=(time.perf_counter() - t0) / 60)
                metrics.add(row, f"ode-init step {step}/{tc.steps} loss {sum(r['loss'] for r in metrics.rows + [row]) / (len(metrics.rows) + 1):.4f}")
                if step % tc.save_every == 0 or step == tc.steps:
                    self._save_ode_init(folder / "checkpoint", student, ema, opt, step)
                if tc.eval_every and (step % tc.eval_every == 0 or step == tc.steps):
                    self._samples(self._ema_model(ema), folder / "samples" / f"step_{step:07d}.gif")
        finally:
            metrics.close()

    @staticmethod
    def _ode_init_tensors(student, ema, opt) -> dict:
        """The live tensors an ode-init resume needs: raw weights, EMA, AdamW state (FSDP: shards)."""
        tensors = {f"raw.{k}": v for k, v in student.state_dict().items()}
        tensors |= {f"ema.{k}": v for k, v in ema.shadow.items()}
        return tensors | optimizer_tensors(opt, student, "opt")

    def _save_ode_init(self, path: Path, student, ema, opt, step: int) -> None:
        """The student's EMA as the checkpoint ``generate`` loads, and what a resume needs: sharded
        (every rank's shards, ``parallel.save_sharded``) under fsdp, else one file written by rank 0."""
        model = self._ema_model(ema)  # every rank takes part in the gather
        meta = dict(self.meta, step=step)
        if self.cfg.parallel == "fsdp":
            parallel.save_sharded(path, self._ode_init_tensors(student, ema, opt),
                                  dict(meta, model=model.config.to_dict()), model.state_dict())
        elif self.rank == 0:
            tensors = {f"raw.{k}": v for k, v in student.state_dict().items()}
            save_checkpoint(path, model, meta, tensors | optimizer_tensors(opt, student, "opt"))

    def _resume_ode_init(self, path: Path, student, ema, opt) -> int:
        if not (path / "config.json").is_file():
            return 0
        meta = read_config(path)
        if meta.get("sampling", {}).get("levels") != self.levels:
            raise CheckpointError(f"{path} is a student for levels {meta.get('sampling', {}).get('levels')}, "
                                  f"this config's are {self.levels}: use another out_dir")
        if parallel.is_current_sharded(path):  # saved at any number of ranks
            init_optimizer_state(opt)  # moments to read into
            parallel.load_sharded(path, self._ode_init_tensors(student, ema, opt))
            self.log(f"ode-init: resumed from {path} (sharded, {meta.get('ranks')} ranks) at step {meta['step']}")
            return int(meta["step"])
        if parallel.is_sharded(student):
            raise CheckpointError(f"{path} is a one-file checkpoint (train.safetensors): resume it with parallel: ddp")
        tensors = load_tensors(path / "train.safetensors")
        load_state(student, {k[4:]: v for k, v in tensors.items() if k.startswith("raw.")}, path / "train.safetensors")
        ema_state = load_tensors(path / "model.safetensors")
        ema.shadow = {k: ema_state[k].to(v.device, torch.float32, copy=True) for k, v in ema.shadow.items()}
        try:
            load_optimizer(opt, student, tensors, "opt", path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        self.log(f"ode-init: resumed from {path} at step {meta['step']}")
        return int(meta["step"])

    # -- stage 2 --------------------------------------------------------------------------------
    def dmd(self):
        c, rc = self.cfg, self.cfg.dmd
        folder, init = self.out / "dmd", Path(rc.init) if rc.init else self.out / "ode_init" / "checkpoint"
        if not (init / "config.json").is_file():
            raise FileNotFoundError(f"no ODE-init student in {init}: " + ("dmd.init names no checkpoint" if rc.init
                                                                          else "run the ode-init stage first"))
        if rc.init and read_config(init).get("sampling", {}).get("levels") != self.levels:
            raise CheckpointError(f"dmd.init={init} is a student for levels "
                                  f"{read_config(init).get('sampling', {}).get('levels')}, this config's are {self.levels}")
        generator = self._prepare(load_checkpoint(init, self.device).train(), trains=True)
        critic = copy.deepcopy(self.teacher).requires_grad_(True).train()  # the fake score starts as the real one
        critic = self._prepare(critic, trains=True)
        teacher = self._prepare(self.teacher, trains=False)  # frozen: sharded, no optimizer
        problem = VideoDMD(generator, teacher, critic, self.levels, self.frames, rc.batch_size,
                           lambda i: self.pool[i], len(self.pool), self.encode, c.teacher_guidance, c.amp(),
                           rc.exit_step, rc.rollout, rows=parallel.Rows(rc.batch_size))
        run = self.dmd_run = DMD(generator, critic, problem.problem(), rc.dmd)  # kept: tests read it
        state = self._dmd_state(folder)
        if state is not None:
            changed = run.load(state)
            self.log(f"dmd: resumed from {state} at iteration {run.iteration}"
                     + (f" with its saved settings ({', '.join(changed)} differ in the config and are not used)"
                        if changed else ""))
        budget = lambda: rc.cpu_minutes and run.cpu_minutes >= rc.cpu_minutes  # noqa: E731
        if run.iteration >= rc.iterations or budget():
            self.log(f"dmd: done ({run.iteration} iterations, {run.cpu_minutes:.1f} CPU minutes, in {folder})")
            return
        d = run.config
        self.log(f"dmd: {rc.iterations} iterations of batch {rc.batch_size} (generator every {d.ratio}"
                 + (f", after {d.critic_warmup} critic-only" if d.critic_warmup else "")
                 + f"), {rc.rollout} rollout, exit step {rc.exit_step}, real score guidance {problem.real_guidance} "
                 f"(ODE pairs {c.teacher_guidance}), {d.score_precision} scores, critic levels {d.critic_levels}, "
                 f"from iteration {run.iteration}")
        cols = ["iteration", "generator_loss", "generator_grad_norm", "critic_loss", "critic_grad_norm", "lr_factor",
                "minutes"] + (diagnostic_columns(d) if rc.diagnose_every else [])
        metrics = self._metrics(folder / "metrics.csv", cols, rc.log_every, run.iteration)
        t0 = time.perf_counter()
        try:
            while run.iteration < rc.iterations and not budget():
                cpu = time.process_time()
                row = run.step()
                # every rank's CPU time, summed (ranks agree on when the budget is spent)
                spent = torch.tensor(time.process_time() - cpu, device=self.device)  # nccl reduces on the GPU
                run.cpu_minutes += float(parallel.mean_over_ranks(spent)) \
                    * self.world / 60
                row["minutes"] = (time.perf_counter() - t0) / 60
                if rc.diagnose_every and (run.iteration % rc.diagnose_every == 0 or run.iteration == 1):
                    row.update(score_diagnostic(run.problem, run.config))  # outside the CPU budget
                g_losses = [r["generator_loss"] for r in metrics.rows + [row] if "generator_loss" in r]
                g_text = f" generator {sum(g_losses) / len(g_losses):.4g}" if g_losses else ""
                c_mean = sum(r["critic_loss"] for r in metrics.rows + [row]) / (len(metrics.rows) + 1)
                metrics.add(row, f"dmd iteration {run.iteration}/{rc.iterations} critic {c_mean:.4f}{g_text}")
                if run.iteration % rc.save_every == 0 or run.iteration == rc.iterations or budget():
                    self._save_dmd(run, folder)
                if rc.sample_every and (run.iteration % rc.sample_every == 0 or run.iteration == rc.iterations):
                    self._samples(self._ema_model(run.ema), folder / "samples" / f"iteration_{run.iteration:07d}.gif")
            self.log(f"dmd: done ({run.iteration} iterations, {run.cpu_minutes:.1f} CPU minutes, in {folder})")
        finally:
            metrics.close()
            if rc.diagnose_every and self.rank == 0 and plot_diagnostic(folder / "metrics.csv", folder / "diagnostic.png"):
                self.log(f"  wrote {folder / 'diagnostic.png'}")

    def _dmd_state(self, folder: Path) -> Path | None:
        """Where the DMD stage resumes from: the sharded checkpoint (fsdp) or the one-file state
        (ddp), whichever was written last (each save of one kind retires the other); None: a new run."""
        if parallel.is_current_sharded(folder / "checkpoint"):
            return folder / "checkpoint"
        return folder / "state.safetensors" if (folder / "state.safetensors").is_file() else None

    def _save_dmd(self, run: DMD, folder: Path) -> None:
        """The generator's EMA as the checkpoint ``generate`` loads, and the run's state: fsdp, one
        sharded checkpoint (every rank's shards, the EMA export beside them); ddp, rank 0 writes
        state.safetensors and the checkpoint."""
        model = self._ema_model(run.ema)  # every rank takes part in the gather
        meta = dict(self.meta, step=run.iteration)
        if self.cfg.parallel == "fsdp":
            run.save_sharded(folder / "checkpoint", dict(meta, model=model.config.to_dict()), model.state_dict())
            if self.rank == 0:
                (folder / "state.safetensors").unlink(missing_ok=True)
        elif self.rank == 0:
            run.save(folder / "state.safetensors")
            save_checkpoint(folder / "checkpoint", model, meta)

    # -- helpers --------------------------------------------------------------------------------
    def _prepare(self, model, trains: bool):
        """``model`` for this run's ``parallel`` (``parallel.prepare``: sharded under fsdp at several
        ranks), with activation checkpointing when it trains and the config asks for it."""
        if trains and self.cfg.grad_checkpointing:
            if "grad-checkpointing" not in model.features:
                raise ValueError(f"grad_checkpointing is not available for {type(model).__name__}")
            model.grad_checkpointing = True
        return parallel.prepare(model, self.cfg.parallel, self.cfg.mixed_precision == "bf16")

    def _metrics(self, path: Path, columns: list[str], every: int, start: int):
        """metrics.csv on rank 0; nothing on the others."""
        return _Metrics(path, columns, every, self.log, start) if self.rank == 0 else _NoMetrics()

    def _ema_model(self, ema: EMA) -> Backbone:
        """A new model on the CPU with the EMA weights (sharded ones gathered: every rank calls this);
        what checkpoints save (``_samples`` moves it to the run's device)."""
        model = build_model(self.student_init.config)
        shadow = parallel.full_state(ema.shadow)
        model.load_state_dict({k: shadow.get(k, v).to(v.dtype) for k, v in model.state_dict().items()})
        return model.eval()

    def _samples(self, model, path):
        from ..generate import write_sample_gif

        if self.rank != 0:
            return
        n = min(self.cfg.samples, len(self.val)) if self.val else 0
        if n and write_sample_gif(model.to(self.device), [self.val[i] for i in range(n)], path, self.cfg.sample_frames,
                                  self.encode, guidance=1.0, levels=self.levels):
            self.log(f"  wrote {path}")


def _jsonable(d):
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    return list(d) if isinstance(d, tuple) else d


def distill_from_config(cfg: DistillConfig, stages=STAGES, log=print) -> Distillation:
    """Run the named stages of ``cfg`` in order (each resumes or skips what is done)."""
    import yaml

    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ValueError(f"unknown stage(s) {', '.join(bad)}; the stages are {', '.join(STAGES)}")
    created, device = parallel.join_group(cfg.device)  # under torchrun: gloo on the CPU, nccl on cuda:LOCAL_RANK
    try:
        run = Distillation(cfg, log, device)
        if run.rank == 0:
            run.out.mkdir(parents=True, exist_ok=True)
            (run.out / "config.yaml").write_text(yaml.safe_dump(_jsonable(asdict(cfg)), sort_keys=False))
        if run.world > 1:
            run.log(f"{run.world} ranks, parallel: {cfg.parallel}")
        if device.type != "cpu":
            run.log(f"the stages run on {device}")
        parallel.barrier()
        for stage in STAGES:
            if stage in stages:
                t0 = time.perf_counter()
                getattr(run, stage.replace("-", "_"))()
                parallel.barrier()  # what rank 0 wrote (ddp checkpoints) is there before any rank reads it
                run.log(f"{stage}: {(time.perf_counter() - t0) / 60:.1f} minutes (wall clock) this session")
    finally:
        if created:
            parallel.dist.destroy_process_group()
    return run
