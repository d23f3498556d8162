"""A Wan pipeline folder loaded: the transformer run causally, the VAE, the text encoder, the schedule.

A user's Wan 2.1 pipeline is a diffusers folder (``Wan2.1-T2V-1.3B-Diffusers``)::

    model_index.json
    transformer/   WanTransformer3DModel   config.json + diffusion_pytorch_model.safetensors (or shards)
    vae/           AutoencoderKLWan        config.json + diffusion_pytorch_model.safetensors
    text_encoder/  UMT5EncoderModel        config.json + model.safetensors
    tokenizer/     umT5's tokenizer
    scheduler/     scheduler_config.json   (flow_shift)

and often a causal checkpoint beside it (Self-Forcing's ``self_forcing_dmd.pt``, in Wan's own key
layout) whose weights replace the folder's bidirectional transformer::

    pipe = load_pipeline("Wan2.1-T2V-1.3B-Diffusers", transformer_weights="self_forcing_dmd.pt")
    print(pipe.describe())          # what was loaded from where
    text = pipe.encode_prompt(["a wave breaks on the beach"])   # Text (1, 512, 4096)
    stream = WanStream(pipe, text)  # wan_stream.WanStream: its own VAE caches
    frames = stream.next_frames()   # (1, 3, 9, 480, 832) pixels in [-1, 1], then 12 per chunk

The transformer becomes a ``causal_wan.CausalWan`` with chunk settings from the arguments
(Self-Forcing's by default: chunks of 3 latent frames, a window of 21); the latent frame size is
the pixel size over the VAE's spatial compression. Sampling: ``levels`` (the few-step list a causal
checkpoint was distilled with; Self-Forcing's by default when ``transformer_weights`` is given) or
``steps``; guidance 1 for a causal checkpoint (distilled without it), else Wan's 5; the flow shift
from ``scheduler/scheduler_config.json`` unless given. Nothing is downloaded.

A folder that cannot work is one ``PipelineError`` (one line) naming the problem: a missing part, a
config that contradicts its weights, a truncated weights file, a VAE whose latent channels differ
from the transformer's, a text encoder whose width differs from the transformer's text input.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .causal_wan import CausalWan, CausalWanConfig
from .checkpoint import DEFAULT_STEPS
from .conditioning import Text
from .wan import WanConfig
from .wan_weights import WanWeightsError, load_wan

WAN_SIZE = (480, 832)       # pixel (H, W) Wan 2.1 generates at
WAN_FPS = 16.0              # Wan's frame rate
WAN_GUIDANCE = 5.0          # WanPipeline's default guidance scale
SELF_FORCING = dict(chunk_frames=3, max_context_frames=21)                # latent frames
SELF_FORCING_LEVELS = [1.0, 0.9375, 0.8333333333333334, 0.625]           # timesteps 1000/750/500/250, shift 5
PARTS = {"transformer": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json",
         "text_encoder": "config.json", "tokenizer": None}
SIZE_KEY = "_ca2vdm_default_size"  # model_index.json: a pipeline's own default pixel size (diffusers ignores it)


class PipelineError(ValueError):
    """A pipeline folder (or weights file) that cannot be loaded; the message is one line."""


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


@dataclass
class Pipeline:
    """What ``load_pipeline`` loaded: the causal transformer, the VAE (shared by every stream, read
    only), the text encoder (or None with precomputed states), how to sample, the pixel size and
    frame rate, and a summary of where each part came from."""

    folder: Path
    model: CausalWan
    vae: object                          # diffusers AutoencoderKLWan
    text: object                         # text.UMT5TextEncoder or text.PrecomputedText
    sampling: dict                       # {"steps", "levels", "guidance"}
    size: tuple                          # pixel (H, W)
    fps: float = WAN_FPS
    summary: list = field(default_factory=list)

    @property
    def temporal_ratio(self) -> int:
        return self.vae.config.scale_factor_temporal  # 4: the first latent frame -> 1 frame, each later -> 4

    def pixel_frames(self, latent_frames: int) -> int:
        """Pixel frames the VAE decodes ``latent_frames`` latent frames to: 1 + 4 (n - 1)."""
        return 0 if latent_frames < 1 else 1 + self.temporal_ratio * (latent_frames - 1)

    def latent_frames(self, pixel_frames: int) -> int:
        """Latent frames that decode to at least ``pixel_frames`` frames (Wan rounds up to 4 k + 1)."""
        if pixel_frames < 1:
            raise ValueError(f"a video has at least 1 frame, got {pixel_frames}")
        return 1 + math.ceil((pixel_frames - 1) / self.temporal_ratio)

    def encode_prompt(self, prompts: list[str]) -> Text:
        """umT5 states (B, 512, D) of ``prompts`` (or their precomputed ones) as the transformer's dtype."""
        states, mask = self.text.encode(prompts)
        return Text(states.to(self.model.device, self.model.dtype), mask.to(self.model.device))

    def describe(self) -> str:
        return "\n".join(self.summary)


def _json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise PipelineError(f"{file} is not valid JSON ({e})") from None


def check_folder(folder: Path, need_text: bool = True) -> None:
    """Every part a pipeline needs is there: one error listing those that are not."""
    if not folder.is_dir():
        raise PipelineError(f"pipeline folder not found: {folder}")
    missing = []
    for part, config in PARTS.items():
        if part in ("text_encoder", "tokenizer") and not need_text:
            continue
        if not (folder / part).is_dir():
            missing.append(f"{part}/")
        elif config and not (folder / part / config).is_file():
            missing.append(f"{part}/{config}")
    if missing:
        raise PipelineError(f"{folder} is not a complete Wan pipeline folder: missing {', '.join(missing)} "
                            f"(the diffusers layout: transformer/, vae/, text_encoder/, tokenizer/, scheduler/)")


def is_pipeline_folder(path) -> bool:
    """Whether ``path`` is a diffusers pipeline folder (``model_index.json``) rather than a checkpoint."""
    return (Path(path) / "model_index.json").is_file()


def flow_shift_of(folder: Path) -> float:
    """The timestep shift of the folder's scheduler: ``flow_shift`` (UniPC, Wan's) or ``shift`` (flow-match Euler)."""
    cfg = _json(folder / "scheduler" / "scheduler_config.json")
    shift = cfg.get("flow_shift", cfg.get("shift"))
    if not isinstance(shift, (int, float)) or isinstance(shift, bool) or not shift > 0:
        raise PipelineError(f"{folder}/scheduler/scheduler_config.json names no positive flow_shift (or shift): "
                            f"got {shift!r}")
    return float(shift)


def _default_size(folder: Path) -> tuple:
    index = folder / "model_index.json"
    size = _json(index).get(SIZE_KEY) if index.is_file() else None
    return tuple(size) if size else WAN_SIZE


def _load_vae(folder: Path, device):
    from diffusers.utils import logging as dlog

    from .wan_vae import load_wan_vae

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # a local load: no advice about accelerate or casting on stderr
    try:
        return load_wan_vae(folder / "vae", device=device)
    except (TypeError, FileNotFoundError) as e:
        raise PipelineError(_one_line(e)) from None
    except (ValueError, RuntimeError, OSError) as e:  # diffusers: shapes that contradict the config, truncation
        raise PipelineError(f"{folder}/vae: its weights do not load ({_one_line(e)[:400]}); config.json "
                            f"contradicts diffusion_pytorch_model.safetensors, or the file is truncated") from None
    finally:
        dlog.set_verbosity(level)


def load_pipeline(folder, transformer_weights=None, *, text=None, text_dtype: torch.dtype = torch.bfloat16,
                  size=None, chunk_frames: int = SELF_FORCING["chunk_frames"],
                  max_context_frames: int = SELF_FORCING["max_context_frames"], sink_frames: int = 0,
                  rope_positions: str = "absolute", steps: int | None = None,
                  levels=None, guidance: float | None = None, flow_shift: float | None = None,
                  dtype: torch.dtype = torch.float32, device="cpu", verbose: bool = False, **weights_kwargs) -> Pipeline:
    """Load a Wan pipeline folder (see the module docstring) for streaming.

    transformer_weights: a causal checkpoint in Wan's own layout (``.pt`` read only with
    ``torch.load(weights_only=True)``, or ``.safetensors``) with the folder's transformer config;
    None: the folder's own transformer. weights_kwargs: ``wan_weights.load_wan``'s ``entry``,
    ``prefix``, ``lora``, ``lora_alpha``, ``lora_entry``. chunk_frames, max_context_frames (the
    window, the chunk included), sink_frames, rope_positions: the attention set (``wan.WanConfig``;
    LongLive: 3, 12, 3, "rebased"). text: None (umT5 from the folder, in
    ``text_dtype``) or a ``.safetensors`` of precomputed prompt states (``text.save_prompt_states``);
    then the folder needs no text_encoder/ or tokenizer/. size: pixel (H, W), default the folder's
    own (``model_index.json``'s ``_ca2vdm_default_size``) else Wan's 480 x 832. steps / levels /
    guidance / flow_shift: see the module docstring. verbose: print the summary.
    """
    from .text import PrecomputedText, UMT5TextEncoder

    folder = Path(folder)
    check_folder(folder, need_text=text is None)
    summary = [f"pipeline {folder}"]
    # the transformer: the folder's config, the folder's weights or the causal checkpoint's
    tcfg = _json(folder / "transformer" / "config.json")
    chunk = dict(chunk_frames=chunk_frames, max_context_frames=max_context_frames, sink_frames=sink_frames,
                 rope_positions=rope_positions)
    try:  # the attention set alone, before anything is read: its errors are the caller's, not the folder's
        CausalWanConfig(WanConfig(**chunk))
    except ValueError as e:
        raise PipelineError(f"chunk settings: {e}") from None
    try:
        if transformer_weights is None:
            transformer = load_wan(folder / "transformer", dtype=dtype, device=device, **chunk)
            where = f"{folder / 'transformer'}"
        else:
            config = WanConfig.from_diffusers(tcfg, **chunk)
            transformer = load_wan(transformer_weights, config, dtype=dtype, device=device, **weights_kwargs)
            where = f"{transformer_weights} (Wan's layout) with {folder / 'transformer' / 'config.json'}"
    except WanWeightsError as e:
        msg = _one_line(e)
        if "does not match the model" in msg:
            msg = f"the transformer's config.json contradicts its weights: {msg}"
        raise PipelineError(msg[:600]) from None
    except ValueError as e:  # an unusable config (I2V keys, bad sizes)
        raise PipelineError(f"{folder}/transformer/config.json: {_one_line(e)}") from None
    wan = transformer.config
    summary.append(f"  transformer  {where}: {wan.num_layers} blocks, {wan.hidden} wide, {dtype}; "
                   f"chunks of {wan.chunk_frames} latent frames, window {wan.max_context_frames}"
                   + (f" with {wan.sink_frames} sink frames, {wan.rope_positions} RoPE" if wan.sink_frames else ""))
    # the VAE
    vae = _load_vae(folder, device)
    z = vae.config.z_dim
    if z != wan.in_channels or z != wan.out_channels:
        raise PipelineError(f"{folder}: the VAE's latents have {z} channels but the transformer takes "
                            f"{wan.in_channels} and makes {wan.out_channels}: the vae/ and transformer/ are not "
                            f"of one pipeline")
    s = vae.spatial_compression_ratio
    size = tuple(int(v) for v in (size or _default_size(folder)))
    _, ph, pw = wan.patch_size
    if len(size) != 2 or size[0] % (s * ph) or size[1] % (s * pw) or min(size) < 1:
        raise ValueError(f"frame size {size} must be divisible by {s * ph} x {s * pw} (the VAE's {s}x times the "
                         f"transformer's {ph}x{pw} patches)")
    summary.append(f"  vae          {folder / 'vae'}: {z} latent channels, {s}x spatial, "
                   f"{vae.config.scale_factor_temporal}x temporal; {size[0]}x{size[1]} pixels -> "
                   f"{size[0] // s}x{size[1] // s} latent")
    # the text encoder
    try:
        if text is None:
            encoder = UMT5TextEncoder(folder, device=device, dtype=text_dtype)
            summary.append(f"  text         {folder / 'text_encoder'} + tokenizer/: umT5, {encoder.dim} wide, {text_dtype}")
        else:
            encoder = PrecomputedText(text, device=device)
            summary.append(f"  text         {text}: {len(encoder.states)} precomputed prompts, {encoder.dim} wide")
    except (OSError, ValueError) as e:
        raise PipelineError(f"{folder}: the text encoder does not load ({_one_line(e)[:400]})") from None
    if encoder.dim != wan.text_dim:
        raise PipelineError(f"{folder}: the text encoder's states are {encoder.dim} wide but the transformer takes "
                            f"{wan.text_dim}")
    # the schedule
    shift = flow_shift_of(folder) if flow_shift is None else float(flow_shift)
    causal = transformer_weights is not None
    if levels is None and steps is None:
        levels = SELF_FORCING_LEVELS if causal else None
        steps = None if causal else DEFAULT_STEPS
    if levels is not None:
        levels = [float(v) for v in levels]
        if steps is not None and steps != len(levels):
            raise ValueError(f"{steps} steps contradict the {len(levels)} noise levels given")
        steps = None
    guidance = (1.0 if causal else WAN_GUIDANCE) if guidance is None else float(guidance)
    if not guidance >= 0:
        raise ValueError(f"the guidance scale must be >= 0 (1 = off), got {guidance}")
    model = CausalWan(CausalWanConfig(wan, (size[0] // s, size[1] // s), shift), transformer).eval()
    if levels is not None:
        model.diffusion.few_step_sampler(levels)  # refuses levels it could not sample
    how = f"levels {', '.join(f'{v:.4g}' for v in levels)}" if levels else f"{steps} steps"
    summary.append(f"  sampling     {how}, guidance {guidance:g}, flow shift {shift:g} "
                   f"({'given' if flow_shift is not None else folder / 'scheduler' / 'scheduler_config.json'})")
    pipe = Pipeline(folder, model, vae, encoder, {"steps": steps, "levels": levels, "guidance": guidance}, size,
                    WAN_FPS, summary)
    if verbose:
        print(pipe.describe())
    return pipe
