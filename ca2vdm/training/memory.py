"""Bytes per rank of a training or DMD run, by what holds them: ``memory_per_rank``.

With N ranks under ``train.parallel: fsdp`` every persistent tensor is sharded 1/N (fp32 master
weights, gradients, AdamW's two moments, the EMA; the frozen teacher's weights); on top of that a
rank holds, while a block runs, the gathered parameters of the root (the embeddings and head stay
gathered through forward and backward) and of two blocks (the one running and the one prefetched),
in the compute dtype, and one block's whole gradients before their reduce-scatter (fp32). DDP is
the N = 1 column: nothing sharded, nothing gathered.

Activations are an estimate: a block keeps ``ACTIVATION_ELEMENTS + 2 * mlp_hidden / hidden`` values
per token and hidden unit for backward (attention inputs and outputs, the MLP's two wide tensors,
residual and modulated streams; attention weights not kept: fused attention recomputes them); with
activation checkpointing it keeps its input alone and one block's activations are live again
during its recomputation. DMD: the generator (trainable, EMA), the critic (trainable) and the
teacher (frozen), the larger of the generator's and the critic's backward activations.
"""

import math

import torch

from ..checkpoint import build_model
from .losses import clip_frames
from .parallel import blocks

ACTIVATION_ELEMENTS = 20  # per token x hidden unit and block, besides the MLP's 2 x mlp_hidden / hidden


def _counts(config) -> dict:
    """Parameter counts of the network of ``config`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = build_model(config)
    found = blocks(model)
    in_blocks = sum(p.numel() for b in found for p in b.parameters())
    total = sum(p.numel() for p in model.parameters())
    linears = [m for m in found[0].modules() if isinstance(m, torch.nn.Linear)]
    back = {m.in_features for m in linears if m.out_features == linears[0].in_features}  # widths brought back to D
    # the MLP's width: the widest D -> m -> D pair (not adaLN's D -> 9D, which nothing brings back)
    widest = max((m.out_features for m in linears if m.out_features in back), default=0)
    hidden = next(p.shape[-1] for p in found[0].parameters() if p.dim() == 2)
    return dict(total=total, root=total - in_blocks, block=max(sum(p.numel() for p in b.parameters()) for b in found),
                depth=len(found), hidden=hidden, mlp_hidden=widest)


def tokens_per_clip(config) -> int:
    """Tokens of one training clip (the layout's longest window)."""
    frames = clip_frames(config)
    if hasattr(config, "patch"):
        ph = pw = config.patch
        pf = 1
    else:  # Wan: (frames, height, width) patches
        pf, ph, pw = config.wan.patch_size
    h, w = config.frame_size
    return math.ceil(frames / pf) * (h // ph) * (w // pw)


def memory_per_rank(config, ranks: int = 1, mode: str = "train", batch_per_rank: int = 1,
                    checkpointing: bool = False, mixed_precision: bool = True, tokens: int | None = None) -> dict:
    """Bytes per rank by holder, and ``total``, for ``mode`` 'train' or 'dmd' at ``ranks`` FSDP ranks
    (1: one process / DDP). ``mixed_precision``: bf16 compute (FSDP's policy or autocast), fp32 state."""
    if mode not in ("train", "dmd"):
        raise ValueError(f"mode must be 'train' or 'dmd', got {mode!r}")
    c = _counts(config)
    P, N = c["total"], ranks
    compute = 2 if mixed_precision else 4
    tokens = (tokens or tokens_per_clip(config)) * batch_per_rank
    shard = lambda n: 4 * math.ceil(n / N)  # noqa: E731  fp32, 1/N of each
    per_block = (ACTIVATION_ELEMENTS + 2 * c["mlp_hidden"] / c["hidden"]) * tokens * c["hidden"] * compute
    if checkpointing:
        activations = c["depth"] * tokens * c["hidden"] * compute + per_block
    else:
        activations = c["depth"] * per_block
    out = {"params": shard(P), "grads": shard(P), "optimizer": 2 * shard(P), "ema": shard(P)}
    if mode == "dmd":  # a critic as large as the teacher, trained; the teacher frozen
        out |= {"critic": 4 * shard(P), "teacher": shard(P)}
    gathered = 0 if N == 1 else (c["root"] + 2 * c["block"]) * compute + 4 * c["block"]
    out |= {"gathered": gathered, "activations": int(activations)}
    out["total"] = sum(out.values())
    out["parameters"] = P
    return out


def table(rows: list[tuple[str, object]], ranks=(1, 8, 64)) -> str:
    """A markdown table of ``memory_per_rank`` in GB for named configs, training and DMD, with and
    without activation checkpointing."""
    lines = ["| model | parameters | run | act. ckpt | " + " | ".join(f"{n} GPU{'s' * (n > 1)}" for n in ranks) + " |",
             "|---|---|---|---|" + "---|" * len(ranks)]
    for name, cfg in rows:
        for mode in ("train", "dmd"):
            for ckpt in (False, True):
                cells = [memory_per_rank(cfg, n, mode, checkpointing=ckpt) for n in ranks]
                lines.append(f"| {name} | {cells[0]['parameters'] / 1e9:.3g} B | {mode} | {'yes' if ckpt else 'no'} | "
                             + " | ".join(f"{m['total'] / 1e9:.3g} GB" for m in cells) + " |")
    return "\n".join(lines)
