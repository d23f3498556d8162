"""Run configuration: YAML with ``model``, ``data`` and ``train`` sections, plus ``--set`` overrides.

``TrainConfig`` holds the optimisation and bookkeeping settings (the model has its own
``config.ModelConfig``, the data section is ``data.build_dataset``'s). Renamed keys keep their old
name as an alias (``RENAMED``), so older run configs and checkpoints still read.
"""

from dataclasses import dataclass, fields
from pathlib import Path

from ..checkpoint import model_config
from ..config import ModelConfig, coerce_fields

RENAMED = {"prefix_noise": "context_noise"}  # old TrainConfig key -> current key


def rename_keys(owner: str, d: dict, renamed: dict) -> dict:
    """``d`` with old keys renamed to their current names; both spellings at once is an error."""
    out = dict(d)
    for old, new in renamed.items():
        if old in out:
            if new in out:
                raise ValueError(f"{owner}: {old!r} is the old name of {new!r}; give only {new!r}")
            out[new] = out.pop(old)
    return out


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
    context_noise: float = 0.0     # noise augmentation of context frames (sigma for flow, timestep for eps);
                                   # read from "prefix_noise" in older configs
    autocast: str = "auto"         # "auto": bf16 (attention fp32) on CPU and CUDA; "off": model dtype
    layout: str = "prefix"         # "prefix": the paper's one-prefix-per-batch recipe; "all-chunks": teacher forcing;
                                   # "full-clip": a bidirectional model's whole clip at one level
    grad_checkpointing: bool = False  # recompute each block's activations in backward (per block)
    parallel: str = "ddp"          # under torchrun: "ddp" (whole model per rank) or "fsdp" (FSDP2 shards
                                   # parameters, gradients, optimizer state and EMA; ``training.parallel``)
    mixed_precision: str = "off"   # fsdp only: "bf16" = bf16 parameters and compute, fp32 reduction and
                                   # master weights (FSDP2's MixedPrecisionPolicy); "off": the model's dtype
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
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"TrainConfig.parallel={self.parallel!r}: must be 'ddp' or 'fsdp'")
        if self.mixed_precision not in ("off", "bf16"):
            raise ValueError(f"TrainConfig.mixed_precision={self.mixed_precision!r}: must be 'off' or 'bf16'")
        if self.mixed_precision != "off" and self.parallel != "fsdp":
            raise ValueError("TrainConfig.mixed_precision='bf16' is FSDP's policy: it needs parallel='fsdp' "
                             "(with ddp, autocast='auto' computes in bf16)")
        if self.layout not in ("prefix", "all-chunks", "full-clip"):
            raise ValueError(f"TrainConfig.layout={self.layout!r}: must be 'prefix', 'all-chunks' or 'full-clip'")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = rename_keys(cls.__name__, d, RENAMED)
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {', '.join(unknown)}")
        return cls(**coerce_fields(cls, d))


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
    model_config(cfg.get("model", {}))
    TrainConfig.from_dict(cfg.get("train", {}))
    return cfg
