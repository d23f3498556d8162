"""How a network is spread over the ranks of a ``torchrun`` job, and its sharded checkpoints.

``train.parallel`` picks one of two schemes, both PyTorch's own:

* ``ddp``  — every rank holds the whole model and optimizer (``DistributedDataParallel``).
* ``fsdp`` — FSDP2 (``torch.distributed.fsdp.fully_shard``): every parameter is a ``DTensor``
  sharded along dim 0 over the ranks; a transformer block's parameters are all-gathered just before
  it runs and freed after. Gradients are reduce-scattered, so gradients, optimizer moments and the
  EMA (a shadow of the ``DTensor`` parameters) are sharded too: per rank 1/N of each.

``shard`` applies FSDP2 per transformer block (the members of every ``nn.ModuleList`` called
``blocks``: ``CausalVideoDiT.blocks``, ``CausalWan.transformer.blocks``), then to the root. Each
direct part of a block (attention, adaLN, MLP) is a unit of its own, because the networks call some
of them outside the block's forward (``b.adaLN(c)`` in ``modulation``, ``b.cross.text_kv`` in
``condition``); the root's gather runs for every entry point of the ``Backbone`` interface, not
only ``forward``. A frozen network (the DMD teacher) is sharded the same way and has no optimizer.

Sharded checkpoints (``save_sharded`` / ``load_sharded``) go through ``torch.distributed.checkpoint``
with its safetensors storage (``HuggingFaceStorageWriter(save_distributed=True)`` and
``HuggingFaceStorageReader``): every rank writes its shards to one safetensors file, the shard
offsets sit in the file's JSON header, and nothing is pickled on either side (DCP's default
``FileSystemWriter`` pickles a ``.metadata`` file; this storage writes none). Only tensors go in;
the step and the settings are JSON. A reader at any number of ranks reads the slices it needs.
"""

import json
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

PARALLEL = ("ddp", "fsdp")
# The Backbone interface's entry points besides forward: FSDP gathers the root's parameters for each.
ENTRY_POINTS = ("condition", "guided_condition", "modulation", "forward_cached", "fill_cache",
                "forward_all_chunks")
# Methods of a block's part that a network calls from outside the block's forward.
PART_METHODS = ("text_kv",)
COMPLETE = "COMPLETE"  # the marker a finished sharded save writes last, before the rename
SHARDS = "sharded"     # the checkpoint's folder of DCP shards


def world() -> tuple[int, int]:
    """(rank, world size) of an initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the members of every ``nn.ModuleList`` named ``blocks``."""
    return [b for name, m in model.named_modules() if name.split(".")[-1] == "blocks"
            and isinstance(m, nn.ModuleList) for b in m]


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard(model: nn.Module, mixed_precision: bool = False) -> nn.Module:
    """FSDP2 over the default process group, in place: each part of each block, each block, the root.
    ``mixed_precision``: parameters cast to bf16 for compute, gradients reduced in fp32, the sharded
    master weights (and so optimizer state and EMA) stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision else MixedPrecisionPolicy())
    # FSDP2 warns for every part that returns a view; an in-place op on such an output would skip the
    # part's gather in backward, which the FSDP step tests (equal to one process's) would catch.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    found = blocks(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no 'blocks' list to shard")
    for block in found:
        for part in block.children():
            if any(True for _ in part.parameters()):
                fully_shard(part, mp_policy=policy)
                for name in PART_METHODS:
                    if hasattr(part, name):
                        register_fsdp_forward_method(part, name)
        if any(True for _ in block.parameters(recurse=False)):  # the block's own (Wan's modulation)
            fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for name in ENTRY_POINTS:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    return model


def wrap(model: nn.Module, parallel: str, mixed_precision: bool = False, device=None) -> nn.Module:
    """The module to call for ``parallel`` in this process: ``model`` sharded in place (fsdp), or a
    ``DistributedDataParallel`` around ``model`` (ddp); ``model`` itself in one process."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel={parallel!r}: must be one of {', '.join(PARALLEL)}")
    if world()[1] == 1:
        return model
    if parallel == "fsdp":
        return shard(model, mixed_precision)
    device = torch.device(device or "cpu")
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


@contextmanager
def grad_sync(module: nn.Module, sync: bool):
    """Gradient accumulation: with ``sync`` False the backward passes inside keep their gradients
    local (DDP's ``no_sync``, FSDP's ``set_requires_gradient_sync(False)``); the last micro-batch
    syncs."""
    if sync or not isinstance(module, nn.parallel.DistributedDataParallel) and not is_sharded(module):
        yield
        return
    if isinstance(module, nn.parallel.DistributedDataParallel):
        with module.no_sync():
            yield
        return
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def clip_grad_norm(parameters, max_norm: float) -> float:
    """``clip_grad_norm_`` over all ranks' shards (on DTensor gradients the norm is the global one);
    the norm before clipping, a float."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def all_finite(value: torch.Tensor, device="cpu") -> bool:
    """Whether ``value`` is finite on every rank: a NaN on one rank is seen by all (a MIN all-reduce
    of a flag), so every rank raises and none waits for the others in a collective."""
    ok = torch.tensor(float(bool(torch.isfinite(value).all())), device=device)
    if world()[1] > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


# -- loops that call a network's entry points themselves (distillation) ----------------------------
def prepare(model: nn.Module, parallel: str, mixed_precision: bool = False) -> nn.Module:
    """``model`` for a loop that calls its entry points itself (``condition``, ``forward_all_chunks``,
    a ``StreamSession``), not one ``forward``: sharded in place under ``fsdp`` (a frozen network too:
    it then has no optimizer state to shard), itself under ``ddp``, where every rank holds it whole
    and ``average_gradients`` does DDP's all-reduce after each backward. Itself in one process."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel={parallel!r}: must be one of {', '.join(PARALLEL)}")
    if parallel == "fsdp" and world()[1] > 1:
        return shard(model, mixed_precision)
    return model


@torch.no_grad()
def average_gradients(module: nn.Module) -> None:
    """The mean over the ranks of ``module``'s gradients (DDP's all-reduce, for ``prepare``'s ddp
    networks); nothing in one process or for a sharded module (FSDP reduce-scatters in backward)."""
    n = world()[1]
    if n == 1 or is_sharded(module):
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(n)


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over the ranks (float64, returned on the CPU; itself in one process),
    reduced on ``value``'s device (nccl reduces CUDA tensors): a NaN on one rank is a NaN on all, so
    a check of it raises on every rank and none waits in a collective."""
    v = value.detach().double().reshape(())
    n = world()[1]
    if n > 1:
        v = v.clone()
        dist.all_reduce(v)
        v = v / n
    return v.cpu()


class Rows:
    """This rank's rows ``[lo, hi)`` of a global batch of ``total`` samples, split evenly over the
    ranks (rank r takes the r-th of ``world`` equal parts). A random draw made for the whole batch
    from a shared generator and cut by ``take`` gives every rank its samples' numbers of a
    one-process run, so N ranks together compute one process's iteration (the mean loss of equal
    shares, averaged over the ranks, is the global batch's)."""

    def __init__(self, total: int, rank: int | None = None, size: int | None = None):
        r, n = world()
        rank, size = r if rank is None else rank, n if size is None else size
        if total % size:
            raise ValueError(f"a batch of {total} does not split evenly over {size} ranks: make it a multiple of {size}")
        self.total, self.local = total, total // size
        self.lo, self.hi = rank * self.local, (rank + 1) * self.local

    def whole(self, shape) -> tuple:
        """``shape`` (this rank's, batch first) with the global batch."""
        return (self.total, *tuple(shape)[1:])

    def take(self, t):
        """This rank's rows of a whole-batch tensor or list."""
        return t[self.lo:self.hi]


# -- whole tensors to and from shards -----------------------------------------------------------
def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (a DTensor is all-gathered: every rank must call this)."""
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu()


def full_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``full`` of every entry, one tensor at a time (the peak is one whole tensor per rank)."""
    return {k: full(v) for k, v in tensors.items()}


@torch.no_grad()
def copy_full(dest: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors ``source[k]`` into ``dest[k]``, which may be DTensor shards (each rank takes
    its own slice of its copy: no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for k, d in dest.items():
        s = source[k]
        if isinstance(d, DTensor):
            s = distribute_tensor(s.to(d.dtype), d.device_mesh, d.placements, src_data_rank=None)
        d.copy_(s)


# -- sharded checkpoints ------------------------------------------------------------------------
def save_sharded(path, tensors: dict[str, torch.Tensor], meta: dict, export: dict[str, torch.Tensor] | None = None,
                 export_file: str = "model.safetensors", fail_after_write=None) -> Path:
    """Every rank's shards of ``tensors`` (DTensors or whole tensors) to ``path/sharded`` through
    ``torch.distributed.checkpoint``, ``meta`` to ``path/config.json`` and ``export`` (whole
    tensors, e.g. the EMA weights ``generate`` loads) to ``path/export_file``, atomically: all is
    written to a temporary sibling, rank 0 writes the ``COMPLETE`` marker last and renames it into
    place (the old checkpoint moved aside, then deleted). A crash before the rename leaves the
    previous checkpoint as it was. Files of ``path`` this save does not own are kept (hard links).
    Every rank calls this; ``fail_after_write`` (tests) runs between the writes and the rename."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from ..checkpoint import swap_in
    from ..safefile import save_safetensors

    path = Path(path)
    rank, n = world()
    if any(not torch.is_tensor(v) for v in tensors.values()):  # a non-tensor would be pickled by DCP
        raise TypeError("save_sharded takes tensors only (put the rest in meta)")
    tmp = path.with_name(f".{path.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # what a crashed save left
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True))
    if rank == 0:
        if export is not None:
            save_safetensors(export, tmp / export_file)
        (tmp / "config.json").write_text(json.dumps(dict(meta, ranks=n, format="sharded"), indent=2))
        if fail_after_write is not None:
            fail_after_write()
        (tmp / COMPLETE).write_text("")
        swap_in(tmp, path, (SHARDS, COMPLETE, "config.json", export_file, "train.safetensors"))
    _barrier()
    return path


def is_sharded_checkpoint(path) -> bool:
    return (Path(path) / SHARDS).is_dir()


def is_current_sharded(path) -> bool:
    """Whether ``path`` holds a sharded checkpoint written last: its ``config.json`` is
    ``save_sharded``'s (a one-file save over it keeps a stale ``sharded`` folder, not this mark)."""
    from ..checkpoint import read_config

    return is_sharded_checkpoint(path) and (Path(path) / "config.json").is_file() and \
        read_config(path).get("format") == "sharded"


def join_group(device: str = "cpu") -> tuple[bool, torch.device]:
    """This process's device for ``device`` ("cpu", or "cuda": rank r of a ``torchrun`` node takes
    ``cuda:LOCAL_RANK``), and the process group ``torchrun`` describes (WORLD_SIZE > 1) joined unless
    one is up: nccl for cuda, gloo for cpu. Returns (whether this call made the group, then its
    caller destroys it; the device). "cuda" on a machine without CUDA: ``ValueError``."""
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device=cuda asked for, but CUDA is not available on this machine")
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"device={device!r}: must be 'cpu' or 'cuda'")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return True, dev
    return False, dev


def barrier() -> None:
    """Every rank here (nothing in one process)."""
    _barrier()


def load_sharded(path, tensors: dict[str, torch.Tensor]) -> dict:
    """Read ``save_sharded``'s shards into ``tensors`` in place (DTensors at any number of ranks, or
    whole tensors in one process) and return its ``config.json``. A save that did not complete, a
    missing key, a truncated shard file: ``CheckpointError``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: caught by name

    from ..checkpoint import CheckpointError, read_config

    path = Path(path)
    meta = read_config(path)
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"{path} has no {COMPLETE} marker: its save did not finish")
    try:
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path / SHARDS)))
    except (Exception, CheckpointException) as e:  # a truncated or foreign shard, a key the save lacks
        raise CheckpointError(f"cannot read the sharded checkpoint {path}: {e}") from e
    return meta


def _barrier():
    if world()[1] > 1:
        dist.barrier()

