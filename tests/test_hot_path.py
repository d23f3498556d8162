"""The cached hot path is GPU-ready: a denoising step and a write pass run entirely on the device.

Run on ``meta`` tensors, where ``.item()``, ``.tolist()`` and data-dependent ops raise, so a host
sync would fail the test; a dispatch mode watches every op and records any that takes a CPU tensor
to make a device tensor (a host-to-device copy: positions or masks built from Python lists)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ca2vdm.conditioning import Condition

from conftest import tiny_model


class HostToDevice(TorchDispatchMode):
    """Records the ops whose inputs include a CPU tensor and whose outputs are on the device, and
    every ``torch.tensor`` / ``torch.as_tensor`` of Python data made on the device: that copy happens
    below the dispatcher, so those two functions are watched themselves while the mode is on."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __enter__(self):
        self.saved = torch.tensor, torch.as_tensor
        for name, fn in zip(("tensor", "as_tensor"), self.saved):
            setattr(torch, name, self._watched(name, fn))
        return super().__enter__()

    def __exit__(self, *exc):
        torch.tensor, torch.as_tensor = self.saved
        return super().__exit__(*exc)

    def _watched(self, name, fn):
        def made(data, *args, **kwargs):
            out = fn(data, *args, **kwargs)
            if not isinstance(data, torch.Tensor) and out.device.type != "cpu":
                self.ops.append(f"torch.{name}(python data, device={out.device.type})")
            return out
        return made

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {a.device.type for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        outs = {o.device.type for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)}
        if "cpu" in ins and "meta" in outs:
            self.ops.append(str(func))
        return out


def meta(*shape, dtype=torch.float64, fill=None):
    return torch.empty(*shape, device="meta", dtype=dtype)


@pytest.mark.parametrize("positions", ["cyclic", "rope"])
@pytest.mark.parametrize("sampling", ["velocity", "x0"])
def test_cached_steps_and_writes_stay_on_the_device(positions, sampling):
    model = tiny_model(positions=positions, conditioning="text", text_dim=16, prefix_enhance=True,
                       prediction="sample").to("meta")
    B = 4  # two videos, guided
    states = meta(B, 5, 16)
    cond = Condition(kv=[b.cross.text_kv(states) for b in model.blocks],
                     mask=torch.ones(B, 1, 1, 5, dtype=torch.bool, device="meta"), batch=B)
    cache = model.new_cache(B)
    with torch.no_grad():
        model.forward_cached(meta(B, 3, 1, 8, 8), torch.zeros(B, 1, dtype=torch.float64, device="meta"), cache, cond,
                             write=True)
        for _ in range(5):  # through the window's slides (P_max = 5, l = 2)
            with HostToDevice() as watch:
                t = torch.full((B, 2), 500.0, dtype=torch.float64, device="meta")
                out = model.forward_cached(meta(B, 3, 2, 8, 8), t, cache, cond, x0=sampling == "x0")
                model.forward_cached(meta(B, 3, 2, 8, 8), torch.zeros(B, 2, dtype=torch.float64, device="meta"),
                                     cache, cond, write=True)
            assert watch.ops == [], f"host-to-device copies in the hot path: {watch.ops}"
            assert out.shape == (B, 3, 2, 8, 8) and out.device.type == "meta"
    assert cache.frames_written == 11


def test_the_watch_sees_a_copy_and_meta_refuses_a_sync():
    """The two detectors themselves: a CPU-built index is seen, ``.item()`` raises."""
    table = meta(10, 4)
    with HostToDevice() as watch:
        table.index_select(0, torch.tensor([1, 2]).to("meta"))
    assert watch.ops
    with HostToDevice() as watch:
        torch.tensor([1, 2], device="meta")
    assert watch.ops
    with pytest.raises(RuntimeError, match="meta"):
        table.sum().item()


def test_batched_streams_at_different_frames_stay_on_the_device():
    """``next_chunks``' forward: a ``CacheBatch`` of two streams whose windows differ (one full, one
    filling), per-row positions and the key-padding mask, on ``meta``. Break tried: the mask's
    window lengths built with ``torch.tensor(list, device=...)`` (a host-to-device copy per chunk)."""
    from ca2vdm.cache import CacheBatch

    model = tiny_model(positions="rope", conditioning="text", text_dim=16, prediction="sample").to("meta")
    caches = [model.new_cache(2), model.new_cache(2)]
    states = meta(4, 5, 16)
    cond = Condition(kv=[b.cross.text_kv(states) for b in model.blocks],
                     mask=torch.ones(4, 1, 1, 5, dtype=torch.bool, device="meta"), batch=4)
    with torch.no_grad():
        for cache, chunks in zip(caches, (3, 1)):  # the first stream is 4 frames ahead
            model.forward_cached(meta(2, 3, 1, 8, 8), torch.zeros(2, 1, dtype=torch.float64, device="meta"), cache,
                                 cond.rows([0, 1]), write=True)
            for _ in range(chunks):
                model.forward_cached(meta(2, 3, 2, 8, 8), torch.zeros(2, 2, dtype=torch.float64, device="meta"),
                                     cache, cond.rows([0, 1]), write=True)
        for _ in range(3):
            batch = CacheBatch(caches)  # made anew for every chunk, as next_chunks does
            with HostToDevice() as watch:
                t = torch.full((4, 2), 500.0, dtype=torch.float64, device="meta")
                out = model.forward_cached(meta(4, 3, 2, 8, 8), t, batch, cond, x0=True)
                model.forward_cached(meta(4, 3, 2, 8, 8), torch.zeros(4, 2, dtype=torch.float64, device="meta"),
                                     batch, cond, write=True)
            assert watch.ops == [], f"host-to-device copies in the batched hot path: {watch.ops}"
            assert out.shape == (4, 3, 2, 8, 8)
    assert [c.frames_written for c in caches] == [13, 9]
