"""Optimisation helpers: the EMA of the weights, the learning-rate schedule, and an optimizer's
state as named tensors (for safetensors files) and back."""

import math

import torch

from .config import TrainConfig


def optimizer_tensors(opt: torch.optim.Optimizer, module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Every moment and step counter of ``opt`` (built over ``module.parameters()``) as
    ``{prefix}.{parameter name}.{field}``."""
    names = {p: n for n, p in module.named_parameters()}
    return {f"{prefix}.{names[p]}.{k}": v if torch.is_tensor(v) else torch.tensor(v)
            for p, st in opt.state.items() for k, v in st.items()}


def load_optimizer(opt: torch.optim.Optimizer, module: torch.nn.Module, tensors: dict, prefix: str, source) -> None:
    """Restore what ``optimizer_tensors`` wrote, through the optimizer's own ``load_state_dict``: it
    places every moment beside its parameter and keeps the step counters where the optimizer wants
    them (AdamW: on the CPU unless capturable / fused). A name ``module`` lacks is a ``ValueError``."""
    index = {n: i for i, (n, _) in enumerate(module.named_parameters())}
    state = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            name, field = key[len(prefix) + 1:].rsplit(".", 1)
            if name not in index:
                raise ValueError(f"{source}: optimizer state for unknown parameter {name}")
            state.setdefault(index[name], {})[field] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


@torch.no_grad()
def init_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Give every parameter its optimizer state (moments, step counter) if it has none yet, without
    changing a weight: one step at learning rate 0 on zero gradients (loading then overwrites the
    state in place; under FSDP the moments are created as the parameters' DTensor shards)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    if all(p in opt.state for p in params):
        return
    lrs = [g["lr"] for g in opt.param_groups]
    grads = [p.grad for p in params]
    for g in opt.param_groups:
        g["lr"] = 0.0
    for p in params:  # only the parameters without state step: the others' moments and counts stay
        p.grad = None if p in opt.state else torch.zeros_like(p)
    opt.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    for p, grad in zip(params, grads):
        p.grad = grad


class EMA:
    """Exponential moving average of the weights with a warming-up decay min(d, (1 + s) / (10 + s))."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)

    def copy_to(self, model):
        state = model.state_dict()
        model.load_state_dict({k: self.shadow.get(k, v).to(v.dtype) for k, v in state.items()})


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
