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
guidance of the ODE pairs).
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
from ..training.config import TrainConfig, apply_overrides
from ..training.losses import clip_frames
from ..training.optim import EMA, load_optimizer, lr_at, optimizer_tensors
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
            parts[name] = build(value)
        cfg = _from_dict(cls, d, "distill config")
        for name, value in parts.items():
            setattr(cfg, name, value)
        if not cfg.teacher:
            raise ValueError("distill config: 'teacher' (a checkpoint directory) is required")
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


class Distillation:
    """The run: the teacher, the prompt pool, the text encoder; one method per stage."""

    def __init__(self, cfg: DistillConfig, log=print):
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out_dir)
        self.teacher = load_checkpoint(cfg.teacher).requires_grad_(False)
        self.teacher_meta = read_config(cfg.teacher)
        self.levels = cfg.student_levels(self.teacher)
        mc = self.teacher.config
        bidirectional = mc.temporal == "bidirectional"
        if bidirectional and not cfg.student:
            raise ValueError("distill config: a bidirectional teacher needs 'student', a causal checkpoint for the "
                             "student to start as")
        self.student_init = load_checkpoint(cfg.student) if cfg.student else self.teacher
        self.student_init.require_causal("the student")
        # the clip every stage works on: the teacher's whole clip, or the causal training clip
        self.frames = mc.clip_length if bidirectional else clip_frames(mc)
        data = self.teacher_meta.get("data", {})
        self.pool = build_dataset(data, self.frames, "train")  # prompts (and first frames) of the teacher's data
        self.val = build_dataset(data, max(self.frames, cfg.sample_frames), "val")
        self.encode = None
        if mc.conditioning == "text":
            from ..text import get_text_encoder

            text = TextCache(get_text_encoder("cpu"))
            self.encode = lambda captions: text(captions, "cpu")
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
                        c.teacher_guidance, seed=mix_seed(c.seed, 1), autocast=c.amp(), log=self.log)

    # -- stage 1b -------------------------------------------------------------------------------
    def ode_init(self):
        c, tc = self.cfg, self.cfg.ode_init
        folder = self.out / "ode_init"
        pairs = ODEPairs(self.out / "pairs", self.levels)
        student = copy.deepcopy(self.student_init).requires_grad_(True).train()
        ema = EMA(student, tc.ema_decay)
        opt = torch.optim.AdamW(student.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
        step = self._resume_ode_init(folder / "checkpoint", student, ema, opt)
        if step >= tc.steps:
            self.log(f"ode-init: done ({step} steps in {folder / 'checkpoint'})")
            return
        self.log(f"ode-init: {len(pairs)} pairs, {tc.steps} steps of batch {tc.batch_size}, from step {step}")
        metrics = _Metrics(folder / "metrics.csv", ["step", "loss", "lr", "grad_norm", "minutes"], tc.log_every,
                           self.log, step)
        t0 = time.perf_counter()
        amp = c.amp()
        try:
            while step < tc.steps:
                g = torch.Generator().manual_seed(mix_seed(tc.seed, step))
                idx = torch.randint(len(pairs), (tc.batch_size,), generator=g).tolist()
                items = [pairs[i] for i in idx]
                video = torch.stack([it["video"] for it in items]).float()
                states = torch.stack([it["states"] for it in items]).float()
                lr = lr_at(step, tc)
                for group in opt.param_groups:
                    group["lr"] = lr
                prompt = self.encode([it["caption"] for it in items]) if self.encode else None
                labels = torch.tensor([it["label"] for it in items]) if "label" in items[0] else None
                with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                    cond = student.condition(len(items), prompt, labels)
                    loss = ode_regression_loss(student, video, states, self.levels, cond, g)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"ode-init loss is {loss.item()} at step {step + 1}; stopping without "
                                             "saving (the last checkpoint on disk is intact)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(student.parameters(), tc.grad_clip).item()
                opt.step()
                ema.update(student, step)
                step += 1
                row = dict(step=step, loss=loss.item(), lr=lr, grad_norm=norm, minutes=(time.perf_counter() - t0) / 60)
                metrics.add(row, f"ode-init step {step}/{tc.steps} loss {sum(r['loss'] for r in metrics.rows + [row]) / (len(metrics.rows) + 1):.4f}")
                if step % tc.save_every == 0 or step == tc.steps:
                    tensors = {f"raw.{k}": v for k, v in student.state_dict().items()}
                    tensors |= optimizer_tensors(opt, student, "opt")
                    save_checkpoint(folder / "checkpoint", self._ema_model(ema), dict(self.meta, step=step), tensors)
                if tc.eval_every and (step % tc.eval_every == 0 or step == tc.steps):
                    self._samples(self._ema_model(ema), folder / "samples" / f"step_{step:07d}.gif")
        finally:
            metrics.close()

    def _resume_ode_init(self, path: Path, student, ema, opt) -> int:
        if not (path / "config.json").is_file():
            return 0
        meta = read_config(path)
        if meta.get("sampling", {}).get("levels") != self.levels:
            raise CheckpointError(f"{path} is a student for levels {meta.get('sampling', {}).get('levels')}, "
                                  f"this config's are {self.levels}: use another out_dir")
        tensors = load_tensors(path / "train.safetensors")
        load_state(student, {k[4:]: v for k, v in tensors.items() if k.startswith("raw.")}, path / "train.safetensors")
        ema_state = load_tensors(path / "model.safetensors")
        ema.shadow = {k: ema_state[k].float().clone() for k in ema.shadow}
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
        generator = load_checkpoint(init).train()
        critic = copy.deepcopy(self.teacher).requires_grad_(True).train()  # the fake score starts as the real one
        problem = VideoDMD(generator, self.teacher, critic, self.levels, self.frames, rc.batch_size,
                           lambda i: self.pool[i], len(self.pool), self.encode, c.teacher_guidance, c.amp(),
                           rc.exit_step, rc.rollout)
        run = DMD(generator, critic, problem.problem(), rc.dmd)
        state = folder / "state.safetensors"
        if state.is_file():
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
        metrics = _Metrics(folder / "metrics.csv", cols, rc.log_every, self.log, run.iteration)
        t0 = time.perf_counter()
        try:
            while run.iteration < rc.iterations and not budget():
                cpu = time.process_time()
                row = run.step()
                run.cpu_minutes += (time.process_time() - cpu) / 60
                row["minutes"] = (time.perf_counter() - t0) / 60
                if rc.diagnose_every and (run.iteration % rc.diagnose_every == 0 or run.iteration == 1):
                    row.update(score_diagnostic(run.problem, run.config))  # outside the CPU budget
                g_losses = [r["generator_loss"] for r in metrics.rows + [row] if "generator_loss" in r]
                g_text = f" generator {sum(g_losses) / len(g_losses):.4g}" if g_losses else ""
                c_mean = sum(r["critic_loss"] for r in metrics.rows + [row]) / (len(metrics.rows) + 1)
                metrics.add(row, f"dmd iteration {run.iteration}/{rc.iterations} critic {c_mean:.4f}{g_text}")
                if run.iteration % rc.save_every == 0 or run.iteration == rc.iterations or budget():
                    run.save(state)
                    save_checkpoint(folder / "checkpoint", self._ema_model(run.ema),
                                    dict(self.meta, step=run.iteration))
                if rc.sample_every and (run.iteration % rc.sample_every == 0 or run.iteration == rc.iterations):
                    self._samples(self._ema_model(run.ema), folder / "samples" / f"iteration_{run.iteration:07d}.gif")
        finally:
            metrics.close()
            if rc.diagnose_every and plot_diagnostic(folder / "metrics.csv", folder / "diagnostic.png"):
                self.log(f"  wrote {folder / 'diagnostic.png'}")

    # -- helpers --------------------------------------------------------------------------------
    def _ema_model(self, ema: EMA) -> Backbone:
        model = build_model(self.student_init.config)
        ema.copy_to(model)
        return model.eval()

    def _samples(self, model, path):
        from ..generate import write_sample_gif

        n = min(self.cfg.samples, len(self.val)) if self.val else 0
        if n and write_sample_gif(model, [self.val[i] for i in range(n)], path, self.cfg.sample_frames,
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
    run = Distillation(cfg, log)
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "config.yaml").write_text(yaml.safe_dump(_jsonable(asdict(cfg)), sort_keys=False))
    for stage in STAGES:
        if stage in stages:
            t0 = time.perf_counter()
            getattr(run, stage.replace("-", "_"))()
            log(f"{stage}: {(time.perf_counter() - t0) / 60:.1f} minutes (wall clock) this session")
    return run
