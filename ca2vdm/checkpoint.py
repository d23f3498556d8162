"""Checkpoints: a directory with ``config.json`` and safetensors files, written atomically.

Layout of a checkpoint directory::

    config.json          {"model": ModelConfig fields, "train": training settings, "step": N,
                          optional "sampling": {"guidance": the recommended scale}, ...}
    model.safetensors    the weights used for generation (the EMA weights in a training run)
    train.safetensors    optional: raw weights and optimizer moments (to resume)

Everything is written into a temporary sibling directory and renamed into place, so a crash never
leaves a half-written checkpoint under the final name. Saving over an existing checkpoint replaces
the three files above and keeps everything else in the directory (a model card, logs). Nothing is
ever unpickled: weights and optimizer tensors are safetensors, everything else JSON.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .causal_wan import CausalWan, CausalWanConfig, load_causal_wan
from .config import ModelConfig
from .model import CausalVideoDiT

# The network families a checkpoint may hold, by config.json's model.family (absent: "ca2vdm").
FAMILIES = {"ca2vdm": (ModelConfig, CausalVideoDiT), "wan": (CausalWanConfig, CausalWan)}


def model_config(section: dict):
    """The config object a checkpoint's (or a run config's) ``model`` section describes, by its
    ``family`` (absent: this library's ``ModelConfig``); a clear error when it is not valid."""
    family = section.get("family", "ca2vdm")
    if family not in FAMILIES:
        raise CheckpointError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    config_cls = FAMILIES[family][0]
    fields = {k: v for k, v in section.items() if k != "family"} if family == "ca2vdm" else section
    try:
        return config_cls.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the model config is not valid: {e}") from e


def build_model(config) -> torch.nn.Module:
    """A randomly initialised network of ``config`` (a config object, or a ``model`` section)."""
    if isinstance(config, dict):
        config = model_config(config)
    for config_cls, model_cls in FAMILIES.values():
        if isinstance(config, config_cls):
            return model_cls(config)
    raise TypeError(f"no model family takes a {type(config).__name__}")


DEFAULT_GUIDANCE = 4.0  # classifier-free guidance scale when neither the user nor the checkpoint names one


CHECKPOINT_FILES = ("config.json", "model.safetensors", "train.safetensors")  # what a save owns


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or does not match the model."""


def save_checkpoint(path, model: CausalVideoDiT, extra: dict | None = None,
                    train_tensors: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None):
    """Write ``model`` (optionally cast to ``dtype``) and metadata to directory ``path``, atomically.
    Over an existing directory, files other than ``CHECKPOINT_FILES`` (a model card, a log) are kept;
    a stale ``train.safetensors`` is not."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        meta = {"model": model.config.to_dict(), **(extra or {})}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
                 for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        if train_tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in train_tensors.items()},
                      str(tmp / "train.safetensors"))
        umask = os.umask(0)  # mkdtemp makes a private directory: give it the usual permissions
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        swap_in(tmp, path, CHECKPOINT_FILES)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in(tmp: Path, path: Path, owned) -> None:
    """Put the finished directory ``tmp`` in place of ``path``: the files of ``path`` a save does not
    own (names not in ``owned``: a model card, a log) are carried over first (hard links: no copy),
    the old directory is moved aside, ``tmp`` renamed into place, and the old one deleted."""
    old = None
    if path.is_dir():
        for f in path.iterdir():
            if f.name in owned:
                continue
            if f.is_dir():
                shutil.copytree(f, tmp / f.name, copy_function=_link_or_copy)
            else:
                _link_or_copy(f, tmp / f.name)
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(src, dst):
    """Hard-link ``src`` to ``dst`` (no bytes copied), or copy it where links are not possible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def read_config(path) -> dict:
    """The checkpoint's config.json, with a clear error when it is missing or not JSON."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint: config.json is missing")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e}); the checkpoint may be truncated") from e
    if "model" not in meta:
        raise CheckpointError(f"{cfg_file} has no 'model' section")
    return meta


def load_tensors(file) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a truncated or corrupt file into a clear error."""
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"missing checkpoint file: {file}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot read {file}: {e} (truncated or corrupt checkpoint?)") from e


def load_checkpoint(path, device="cpu", dtype: torch.dtype | None = torch.float32) -> CausalVideoDiT:
    """Build the model from ``config.json`` and load ``model.safetensors`` (strict: every key, every shape)."""
    meta = read_config(path)
    model = build_model(meta["model"])
    state = load_tensors(Path(path) / "model.safetensors")
    load_state(model, state, Path(path) / "model.safetensors")
    return model.to(device=device, dtype=dtype).eval()


def load_state(model: torch.nn.Module, state: dict, source, allow_missing: bool = False) -> list[str]:
    """``load_state_dict`` with a message that says which keys or shapes do not match. With
    ``allow_missing`` the model's keys that ``state`` lacks keep their values (a fine-tune that adds a
    module); they are returned. Unexpected keys and shape mismatches are always errors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    kept, missing = (missing, []) if allow_missing else ([], missing)
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"shape mismatch: {shapes[0]}")
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=not allow_missing)
    return kept


def guidance_for(path, guidance: float | None = None) -> float:
    """The guidance scale to sample checkpoint ``path`` with: ``guidance`` if given, else the scale the
    checkpoint recommends (``config.json["sampling"]["guidance"]``), else ``DEFAULT_GUIDANCE``."""
    if guidance is None:
        guidance = read_config(path).get("sampling", {}).get("guidance", DEFAULT_GUIDANCE)
        if not isinstance(guidance, (int, float)) or isinstance(guidance, bool):
            raise CheckpointError(f"{path}/config.json: sampling.guidance must be a number, got {guidance!r}")
    if not guidance >= 0:  # also catches NaN
        raise ValueError(f"the guidance scale must be >= 0 (1 = off), got {guidance}")
    return float(guidance)


DEFAULT_STEPS = 20  # sampling steps per chunk when neither the user nor the checkpoint names any


def sampling_for(path, steps: int | None = None, levels=None, guidance: float | None = None) -> dict:
    """How to sample checkpoint ``path``: {"steps", "levels", "guidance"}. What is given wins; else
    the checkpoint's recommendation (``config.json["sampling"]``: ``levels`` for a few-step student,
    ``steps``, ``guidance``); else ``DEFAULT_STEPS`` and ``DEFAULT_GUIDANCE``. ``levels`` (a list of
    noise levels) and ``steps`` are exclusive; with levels, steps is their number."""
    rec = read_config(path).get("sampling", {})
    if levels is None and steps is None:
        levels = rec.get("levels")
        steps = rec.get("steps", DEFAULT_STEPS) if levels is None else None
    if levels is not None:
        if not isinstance(levels, (list, tuple)) or not all(isinstance(s, (int, float)) for s in levels):
            raise CheckpointError(f"{path}/config.json: sampling.levels must be a list of numbers, got {levels!r}")
        if steps is not None and steps != len(levels):
            raise ValueError(f"{steps} steps contradict the {len(levels)} noise levels given")
        levels, steps = [float(s) for s in levels], len(levels)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"sampling steps must be a positive integer, got {steps!r}")
    return {"steps": steps, "levels": levels, "guidance": guidance_for(path, guidance)}


def export_checkpoint(src, dst, dtype: torch.dtype = torch.float16, guidance: float | None = None,
                      levels=None) -> Path:
    """Write a generation-only copy of checkpoint ``src`` to ``dst``: config.json (metadata kept) and
    model.safetensors cast to ``dtype``; optimizer state and raw weights are left behind. ``guidance``
    records the recommended guidance scale and ``levels`` the few-step noise levels, which sampling
    commands use when given none."""
    meta = read_config(src)
    model = load_checkpoint(src)
    extra = {k: v for k, v in meta.items() if k != "model"}
    extra["exported_dtype"] = str(dtype).replace("torch.", "")
    if guidance is not None:
        extra["sampling"] = dict(extra.get("sampling", {}), guidance=guidance_for(src, guidance))
    if levels is not None:
        model.diffusion.few_step_sampler(levels)  # refuses levels it could not sample
        extra["sampling"] = dict(extra.get("sampling", {}), levels=[float(s) for s in levels], steps=len(levels))
    save_checkpoint(dst, model, extra, dtype=dtype)
    return Path(dst)


def export_wan(source, dst, config=None, frame_size=(60, 104), flow_shift: float = 5.0,
               dtype: torch.dtype = torch.bfloat16, guidance: float | None = None, levels=None,
               **load_kwargs) -> Path:
    """Write a Wan-family model (``causal_wan.load_causal_wan``: a diffusers folder, or a causal
    checkpoint in Wan's own layout with ``config``, a LoRA merged in) as this library's checkpoint
    directory, cast to ``dtype``, recording the source and the recommended sampling (``levels``:
    the few-step list it was distilled with; ``guidance``). ``load_checkpoint`` reads it back."""
    model = load_causal_wan(source, config, frame_size, flow_shift, **load_kwargs)
    extra = {"source": str(source), "exported_dtype": str(dtype).replace("torch.", "")}
    sampling = {}
    if levels is not None:
        model.diffusion.few_step_sampler(levels)  # refuses levels it could not sample
        sampling.update(levels=[float(s) for s in levels], steps=len(levels))
    if guidance is not None:
        if not guidance >= 0:
            raise ValueError(f"the guidance scale must be >= 0 (1 = off), got {guidance}")
        sampling["guidance"] = float(guidance)
    if sampling:
        extra["sampling"] = sampling
    save_checkpoint(dst, model, extra, dtype=dtype)
    return Path(dst)
