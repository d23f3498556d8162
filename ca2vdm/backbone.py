"""What the engine needs from a backbone: the one interface between them.

The engine (``stream``, ``generate``, ``stepcache``, the cache) never imports a concrete network
and never tests its type; it calls the methods below. Two families implement them:
``model.CausalVideoDiT`` (factorized spatial / temporal attention, Ca2-VDM) and
``causal_wan.CausalWan`` (Wan 2.1's full spatio-temporal attention, block-causal by chunk). A
third family is one file with one class that has these members (``tests/test_causal_wan.py`` shows
the engine's checks on a second family).

The engine's view of a config (``Backbone.config``):

    chunk_frames         frames per generated chunk (l)
    prefix_frames        given first frames (0: a prompt alone starts the video)
    max_context_frames   P_max: clean frames the cache keeps and a chunk attends to, its own
                         frames not counted (Wan's "window of 21 latent frames" is 18 + a chunk of 3)
    layout               the ``layout.ChunkLayout`` of these (with ``sink_frames``: the first frames
                         that never leave the window)
    frame_size           (H, W) of a frame in the model's space (latent frames for a latent model)
    in_channels          channels of a frame
    conditioning         "none", "class" or "text"
    depth                blocks (step caching's block index)
    temporal             "causal" (chunk by chunk) or "bidirectional" (whole clips only)
    to_dict()            the JSON form, saved with streams and checkpoints
"""

from typing import Protocol, runtime_checkable

import torch

from .conditioning import Condition, Text


@runtime_checkable
class Backbone(Protocol):
    """A network the engine can run chunk by chunk. Shapes: a video is (B, C, F, H, W); times are
    per frame, (B, F), in the network's units (1000 sigma for flow); a ``Condition`` is prepared
    once per prompt set; a cache comes from ``new_cache``."""

    config: object      # the engine's view, see the module docstring
    diffusion: object   # the noise schedule and its samplers (``diffusion.FlowMatching`` / ``DDPM``)
    features: frozenset  # what else may be asked: "batched-streams" (``CacheBatch``), "step-cache",
                         # "grad-checkpointing" (training)

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def require_causal(self, what: str) -> None:
        """Raise a clear error when this network cannot run ``what`` (a bidirectional teacher)."""

    def condition(self, batch: int, text: Text | None = None, labels=None) -> Condition:
        """The prepared conditioning of ``batch`` rows (text K/V per block, pooled vectors)."""

    def guided_condition(self, batch: int, text: Text | None = None, labels=None,
                         negative: Text | None = None) -> Condition:
        """Both branches of classifier-free guidance as 2B rows: the condition, then the negative /
        null one."""

    def new_cache(self, batch: int, dtype: torch.dtype | None = None):
        """An empty ``cache.KVCache`` for ``batch`` rows."""

    def forward(self, x, t, cond: Condition | None = None, start: int = 0, x0: bool = False):
        """The oracle: a masked full-sequence forward over frames [start, start + F) (frames before
        ``start`` absent), the prediction (B, C, F, H, W); ``x0=True``: the clean-frame prediction."""

    def forward_cached(self, x, t, cache, cond: Condition | None = None, write: bool = False,
                       return_hidden: bool = False, x0: bool = False, modulation=None):
        """One chunk against ``cache``: a denoising step (the prediction), or with ``write`` the clean
        write pass (its K/V pushed into the cache, None returned). ``modulation``: what
        ``modulation(t, cond)`` returned for these very t and cond (a stream keeps it)."""

    def fill_cache(self, frames, cache, cond: Condition | None = None, start: int = 0) -> None:
        """Re-cache: the K/V of clean frames [start, start + F) by one masked forward over them alone,
        written into the empty ``cache``."""

    def modulation(self, t, cond: Condition):
        """Everything the network derives from the times alone (and the conditioning's vector): what a
        stream computes once per level and hands back to ``forward_cached``."""
