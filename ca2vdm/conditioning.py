"""Conditioning: prompts as token states (``Text``) and what the model prepares from them once
per prompt set (``Condition``: per-block text K/V, and one vector per sample for the adaLN input).

``CausalVideoDiT.condition`` builds a ``Condition`` from its own weights; these are the containers
and the batch operations on them (stacking, row selection) that generation and step caching need;
``classifier_free_guidance`` combines the two halves of a guided prediction.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def classifier_free_guidance(pred: torch.Tensor, scale: float) -> torch.Tensor:
    """A prediction of 2B rows [conditional; unconditional] -> uncond + scale (cond - uncond), B rows.
    Linear in the prediction: the same in velocity, noise or x0 space."""
    cond_pred, uncond_pred = pred.chunk(2)
    return uncond_pred + scale * (cond_pred - uncond_pred)


@dataclass
class Text:
    """Text token states (B, N, text_dim) with a boolean mask (B, N), True for real tokens."""

    states: torch.Tensor
    mask: torch.Tensor | None = None

    def __post_init__(self):
        if self.states.dim() != 3:
            raise ValueError(f"text states must be (batch, tokens, dim), got shape {tuple(self.states.shape)}")
        if self.mask is None:
            self.mask = torch.ones(self.states.shape[:2], dtype=torch.bool, device=self.states.device)
        if self.mask.shape != self.states.shape[:2]:
            raise ValueError(f"text mask shape {tuple(self.mask.shape)} does not match states {tuple(self.states.shape[:2])}")
        self.mask = self.mask.bool()

    @staticmethod
    def cat(texts: list["Text"]) -> "Text":
        """Stack along the batch, padding to the longest token count (padding masked out)."""
        n = max(t.states.shape[1] for t in texts)
        states = [F.pad(t.states, (0, 0, 0, n - t.states.shape[1])) for t in texts]
        masks = [F.pad(t.mask, (0, n - t.mask.shape[1]), value=False) for t in texts]
        return Text(torch.cat(states), torch.cat(masks))


@dataclass
class Condition:
    """Conditioning prepared once per prompt set: per-block text K/V and one vector per sample that is
    added to the timestep embedding (the adaLN input): the class embedding, or the pooled prompt."""

    kv: list | None = None           # per block (k, v), each (B, H, N, d)
    mask: torch.Tensor | None = None  # (B, 1, 1, N) bool; None: every position attended (Wan's 512)
    vector: torch.Tensor | None = None  # (B, D)
    batch: int = 0

    def rows(self, rows: list[int]) -> "Condition":
        """The conditioning of some batch rows."""
        pick = (lambda t: None if t is None else t[rows])
        kv = None if self.kv is None else [(k[rows], v[rows]) for k, v in self.kv]
        return Condition(kv, pick(self.mask), pick(self.vector), len(rows))

    @staticmethod
    def cat(a: "Condition", b: "Condition") -> "Condition":
        """Stack two conditions along the batch (guidance runs both branches as one 2B batch)."""
        out = Condition(batch=a.batch + b.batch)
        if a.vector is not None:
            out.vector = torch.cat([a.vector, b.vector])
        if a.kv is not None and a.mask is None and b.mask is None:  # every text position attended (Wan)
            out.kv = [(torch.cat([ka, kb]), torch.cat([va, vb])) for (ka, va), (kb, vb) in zip(a.kv, b.kv)]
        elif a.kv is not None:
            n = max(a.mask.shape[-1], b.mask.shape[-1])
            pad = lambda t, n=n: F.pad(t, (0, 0, 0, n - t.shape[2]))  # noqa: E731  (B, H, N, d) tokens
            out.kv = [(torch.cat([pad(ka), pad(kb)]), torch.cat([pad(va), pad(vb)]))
                      for (ka, va), (kb, vb) in zip(a.kv, b.kv)]
            out.mask = torch.cat([F.pad(a.mask, (0, n - a.mask.shape[-1])), F.pad(b.mask, (0, n - b.mask.shape[-1]))])
        return out
