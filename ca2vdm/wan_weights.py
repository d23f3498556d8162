"""Wan weights from where users have them, nothing downloaded; strict, so nothing loads half.

Two layouts reach one model (``wan.WanTransformer``):

* a diffusers directory: ``config.json`` and ``diffusion_pytorch_model.safetensors``, or shards
  named by ``diffusion_pytorch_model.safetensors.index.json`` (a pipeline folder's
  ``transformer/`` is found by itself);
* the original Wan key layout (``blocks.0.self_attn.q.weight``, ``head.modulation``, ...) as the
  causal checkpoints store it: a flat ``.safetensors``, or a ``.pt`` read only through
  ``torch.load(weights_only=True)`` holding a ``generator_ema`` / ``generator`` entry (the one
  picked is printed) whose keys carry the wrapper's ``model.`` prefix. The prefix is stripped,
  then diffusers' own ``convert_wan_transformer_to_diffusers`` renames the keys (it is called,
  not copied; its ``from_single_file`` route is not used: with the prefix left on it loads
  nothing and only logs a warning).

Both end in diffusers' names, which ``DIFFUSERS_NAMES`` (one explicit table) maps to ours. A LoRA
(peft's ``lora_A`` / ``lora_B`` as LongLive saves it, under ``generator_lora``, or
``lora_down`` / ``lora_up`` with optional ``.alpha``) is merged into the weights first:
W += (alpha / r) B A. Then every key and shape is checked: missing, unexpected or mis-shaped keys
are one ``WanWeightsError`` listing them, raised before the model is touched.
"""

import json
import pickle
import re
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .wan import PRESETS, WanConfig, WanTransformer, preset


class WanWeightsError(ValueError):
    """Weights that cannot be read, or that do not match the model key for key and shape for shape."""


# diffusers' WanTransformer3DModel -> WanTransformer, module by module ({i}: a block index). The
# affine norm before cross-attention is diffusers' norm2 and Wan's norm3; here it is norm_cross.
DIFFUSERS_NAMES = [
    ("patch_embedding", "patch_embed"),
    ("condition_embedder.time_embedder.linear_1", "time_embed.fc1"),
    ("condition_embedder.time_embedder.linear_2", "time_embed.fc2"),
    ("condition_embedder.time_proj", "time_proj"),
    ("condition_embedder.text_embedder.linear_1", "text_embed.fc1"),
    ("condition_embedder.text_embedder.linear_2", "text_embed.fc2"),
    ("blocks.{i}.scale_shift_table", "blocks.{i}.modulation"),
    ("blocks.{i}.attn1.to_q", "blocks.{i}.self_attn.q"),
    ("blocks.{i}.attn1.to_k", "blocks.{i}.self_attn.k"),
    ("blocks.{i}.attn1.to_v", "blocks.{i}.self_attn.v"),
    ("blocks.{i}.attn1.to_out.0", "blocks.{i}.self_attn.o"),
    ("blocks.{i}.attn1.norm_q", "blocks.{i}.self_attn.norm_q"),
    ("blocks.{i}.attn1.norm_k", "blocks.{i}.self_attn.norm_k"),
    ("blocks.{i}.norm2", "blocks.{i}.norm_cross"),
    ("blocks.{i}.attn2.to_q", "blocks.{i}.cross_attn.q"),
    ("blocks.{i}.attn2.to_k", "blocks.{i}.cross_attn.k"),
    ("blocks.{i}.attn2.to_v", "blocks.{i}.cross_attn.v"),
    ("blocks.{i}.attn2.to_out.0", "blocks.{i}.cross_attn.o"),
    ("blocks.{i}.attn2.norm_q", "blocks.{i}.cross_attn.norm_q"),
    ("blocks.{i}.attn2.norm_k", "blocks.{i}.cross_attn.norm_k"),
    ("blocks.{i}.ffn.net.0.proj", "blocks.{i}.ffn.fc1"),
    ("blocks.{i}.ffn.net.2", "blocks.{i}.ffn.fc2"),
    ("scale_shift_table", "head.modulation"),
    ("proj_out", "head.proj"),
]
_RULES = [(re.compile("^" + re.escape(a).replace(re.escape("{i}"), r"(\d+)") + r"(?=\.|$)"),
           b.replace("{i}", r"\1")) for a, b in DIFFUSERS_NAMES]

ENTRIES = ("generator_ema", "generator")  # a training checkpoint's generator weights, first found wins
WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")  # FSDP names inside keys (LongLive's EMA)
LORA_PREFIXES = ("base_model.model.", "diffusion_model.", "transformer.", "model.")  # peft, ComfyUI, diffusers


def diffusers_to_ours(state: dict) -> dict:
    """Rename a diffusers-layout state dict with ``DIFFUSERS_NAMES``; keys it does not know stay as
    they are (the strict check reports them)."""
    out = {}
    for k, v in state.items():
        for rule, repl in _RULES:
            new, n = rule.subn(repl, k)
            if n:
                k = new
                break
        out[k] = v
    return out


def original_to_diffusers(state: dict) -> dict:
    """Wan's own key names -> diffusers' (diffusers' ``convert_wan_transformer_to_diffusers``)."""
    try:
        from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    except ImportError as e:
        raise ImportError("reading the original Wan layout uses diffusers' key conversion: "
                          "pip install diffusers") from e
    return convert_wan_transformer_to_diffusers(dict(state))  # it pops from the dict it is given


# -- reading files -------------------------------------------------------------------------------
def _safetensors(file: Path) -> dict:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise WanWeightsError(f"cannot read {file}: {e} (truncated or corrupt?)") from e


def _torch_load(file: Path):
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WanWeightsError(f"{file}: torch.load(weights_only=True) refuses it ({e}); only tensors and "
                              "plain containers are read, nothing else is unpickled") from e
    except (OSError, RuntimeError, EOFError) as e:
        raise WanWeightsError(f"cannot read {file}: {e} (truncated or corrupt?)") from e


def _entry(obj, file: Path, entry: str | None, names: tuple[str, ...]) -> tuple[dict, str | None]:
    """The state dict inside a loaded object: ``entry`` if named, else the object itself when it is
    flat (tensors only), else the first of ``names`` present."""
    if not isinstance(obj, dict):
        raise WanWeightsError(f"{file} holds a {type(obj).__name__}, not a dict of tensors")
    if entry is None and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    if entry is None:
        entry = next((n for n in names if n in obj), None)
        if entry is None:
            raise WanWeightsError(f"{file} has entries {sorted(map(str, obj))}, none of {list(names)}; "
                                  "name the one to load (entry=...)")
    elif entry not in obj:
        raise WanWeightsError(f"{file} has no entry {entry!r}; it has {sorted(map(str, obj))}")
    state = obj[entry]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WanWeightsError(f"{file}: entry {entry!r} is not a dict of tensors")
    others = [n for n in names if n in obj and n != entry]
    print(f"{file.name}: loading the {entry!r} entry" + (f" (also present: {', '.join(others)})" if others else ""),
          file=sys.stderr)
    return state, entry


def read_weights(file, entry: str | None = None, entries: tuple[str, ...] = ENTRIES) -> dict:
    """The tensors of a ``.safetensors`` file, or of a ``.pt`` / ``.pth`` / ``.ckpt`` file
    (``torch.load(weights_only=True)``), from ``entry`` or the first of ``entries`` when the file
    nests its state dicts (the chosen one is printed)."""
    file = Path(file)
    if not file.is_file():
        raise WanWeightsError(f"weights file not found: {file}")
    if file.suffix == ".safetensors":
        if entry is not None:
            raise WanWeightsError(f"{file}: a safetensors file is flat, it has no entry {entry!r}")
        return _safetensors(file)
    if file.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        return _entry(_torch_load(file), file, entry, entries)[0]
    raise WanWeightsError(f"{file}: expected .safetensors or .pt / .pth / .ckpt / .bin")


def strip(state: dict, prefix: str | None) -> dict:
    """Keys without FSDP wrapper segments and without a leading ``prefix``."""
    out = {}
    for k, v in state.items():
        for w in WRAPPERS:
            k = k.replace(w, "")
        out[k[len(prefix):] if prefix and k.startswith(prefix) else k] = v
    return out


def read_original(file, entry: str | None = None, prefix: str | None = "model.") -> dict:
    """A file in Wan's own layout -> a diffusers-layout state dict: the entry picked, ``prefix``
    stripped (None: nothing stripped), then diffusers' conversion."""
    return original_to_diffusers(strip(read_weights(file, entry), prefix))


def read_diffusers(path) -> tuple[dict, dict]:
    """(config dict, state dict) of a diffusers ``WanTransformer3DModel`` directory (or of a
    pipeline directory's ``transformer/``): one safetensors file or shards named by the index."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        path = path / "transformer"
    if not (path / "config.json").is_file():
        raise WanWeightsError(f"{path} is not a diffusers model directory: config.json is missing")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise WanWeightsError(f"{path / 'config.json'} is not valid JSON ({e})") from e
    single = path / "diffusion_pytorch_model.safetensors"
    index = path / "diffusion_pytorch_model.safetensors.index.json"
    if single.is_file():
        return config, _safetensors(single)
    if not index.is_file():
        raise WanWeightsError(f"{path} has neither {single.name} nor {index.name} "
                              f"(found: {', '.join(sorted(p.name for p in path.iterdir()))})")
    weight_map = json.loads(index.read_text()).get("weight_map", {})
    state = {}
    for shard in sorted(set(weight_map.values())):
        tensors = _safetensors(path / shard)
        state.update({k: v for k, v in tensors.items() if weight_map.get(k) == shard})
    lost = sorted(set(weight_map) - set(state))
    if lost:
        raise WanWeightsError(f"{index}: {len(lost)} keys are not in the shards that name them (e.g. {lost[0]})")
    return config, state


# -- LoRA ----------------------------------------------------------------------------------------
_LORA_ROLES = ((".lora_A.weight", "A"), (".lora_down.weight", "A"), (".lora_B.weight", "B"),
               (".lora_up.weight", "B"), (".alpha", "alpha"))


def read_lora(source, entry: str | None = None) -> dict:
    """A LoRA state dict in diffusers' names: from a file (LongLive's ``generator_lora`` entry or a
    flat dict) or a dict; peft / ComfyUI / diffusers prefixes stripped, Wan's own module names
    converted by diffusers' conversion."""
    lora = source if isinstance(source, dict) else read_weights(source, entry, ("generator_lora",))
    for p in LORA_PREFIXES:
        if lora and all(k.startswith(p) for k in lora):
            lora = {k[len(p):]: v for k, v in lora.items()}
    lora = strip(lora, None)
    if any(s in k for k in lora for s in ("self_attn.", "cross_attn.", ".ffn.0.", ".ffn.2.")):
        lora = original_to_diffusers(lora)
    return lora


def merge_lora(state: dict, lora: dict, alpha: float | None = None) -> dict:
    """``state`` with every LoRA pair merged: W + (B @ A) * (alpha / r), in at least float32, cast
    back to W's dtype. alpha: a module's stored ``.alpha``, else the argument (peft stores none:
    LongLive's is 256 at rank 256). Unknown keys, unpaired or mis-shaped factors and targets the
    weights lack are one error; ``state`` itself is not changed."""
    modules, unknown = {}, []
    for k, v in lora.items():
        for suffix, role in _LORA_ROLES:
            if k.endswith(suffix):
                modules.setdefault(k[:-len(suffix)], {})[role] = v
                break
        else:
            unknown.append(k)
    problems = [f"unknown LoRA keys: {', '.join(sorted(unknown)[:10])}"] if unknown else []
    out = dict(state)
    for name, m in sorted(modules.items()):
        if "A" not in m or "B" not in m:
            problems.append(f"{name}: needs both factors, has {sorted(m)}")
            continue
        A, B, key = m["A"], m["B"], f"{name}.weight"
        if key not in state:
            problems.append(f"{name}: the weights have no {key}")
            continue
        W = state[key]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0] or (B.shape[0], A.shape[1]) != tuple(W.shape):
            problems.append(f"{name}: A {tuple(A.shape)} and B {tuple(B.shape)} do not make {tuple(W.shape)}")
            continue
        a = float(m["alpha"]) if "alpha" in m else alpha
        if a is None:
            problems.append(f"{name}: the LoRA stores no alpha; pass lora_alpha")
            continue
        up = torch.promote_types(W.dtype, torch.float32)
        out[key] = (W.to(up) + (B.to(up) @ A.to(up)) * (a / A.shape[0])).to(W.dtype)
    if problems:
        raise WanWeightsError("cannot merge the LoRA: " + "; ".join(problems))
    return out


# -- strict loading ------------------------------------------------------------------------------
def _listing(title: str, items: list[str], limit: int = 12) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}): " + ", ".join(items[:limit]) + more


def load_state(model: torch.nn.Module, state: dict, source) -> None:
    """Load ``state`` (our names) into ``model`` only if every key and every shape matches;
    otherwise one ``WanWeightsError`` listing the missing, unexpected and mis-shaped keys, and the
    model is left as it was."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} (model {tuple(own[k].shape)})"
              for k in sorted(own) if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        msg = f"{source} does not match the model:"
        msg += _listing("missing", missing) if missing else ""
        msg += _listing("unexpected", unexpected) if unexpected else ""
        msg += _listing("mis-shaped", shapes) if shapes else ""
        heads = {k.split(".", 1)[0] + "." for k in unexpected}
        if len(heads) == 1 and "." in unexpected[0] and not any(k.startswith(next(iter(heads))) for k in own):
            msg += f"\n  every unexpected key starts with {heads.pop()!r}: a prefix left on the keys?"
        raise WanWeightsError(msg)
    with torch.no_grad():
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def load_wan(path, config: WanConfig | str | None = None, *, entry: str | None = None,
             prefix: str | None = "model.", lora=None, lora_alpha: float | None = None,
             lora_entry: str | None = None, dtype: torch.dtype = torch.float32, device="cpu",
             **chunk_settings) -> WanTransformer:
    """A ``WanTransformer`` with the weights at ``path`` (see the module docstring), in eval mode.

    path: a diffusers directory (its config.json decides the architecture; ``config`` must be
    None) or a weights file in Wan's own layout (``config``: a ``WanConfig`` or a ``wan.PRESETS``
    name). chunk_settings: ``chunk_frames``, ``max_context_frames``, ``sink_frames``, ``rope_positions``, ``text_len``.
    entry / prefix: the nested state dict and the key prefix of an original-layout file. lora: a
    LoRA file or dict merged in (``lora_alpha`` when the LoRA stores none).
    """
    path = Path(path)
    if path.is_dir():
        if config is not None:
            raise ValueError(f"{path} is a diffusers directory: its config.json gives the architecture "
                             "(pass chunk settings only)")
        meta, state = read_diffusers(path)
        cfg = WanConfig.from_diffusers(meta, **chunk_settings)
    else:
        if config is None:
            raise ValueError(f"{path} holds weights in Wan's own layout, without a config: pass config= "
                             f"(a WanConfig or one of {', '.join(PRESETS)})")
        cfg = preset(config, **chunk_settings) if isinstance(config, str) else replace(config, **chunk_settings)
        state = read_original(path, entry, prefix)
    if lora is not None:
        state = merge_lora(state, read_lora(lora, lora_entry), lora_alpha)
    with torch.device("meta"):  # no random init: every parameter is loaded (load_state is strict)
        model = WanTransformer(cfg).to(dtype)
    model.to_empty(device=device)
    load_state(model, diffusers_to_ours(state), path)
    return model.eval()
