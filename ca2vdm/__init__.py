"""ca2vdm: efficient autoregressive video diffusion (Ca2-VDM) in PyTorch.

The public API at the top level; every concept lives in the module named after it (see
docs/ARCHITECTURE.md): ``config``, ``layout``, ``cache``, ``positions``, ``diffusion``, ``layers``,
``conditioning``, ``model``, ``stepcache``, ``stream``, ``generate``, ``training``, ``distill``,
``metrics``, ``eval``, ``bench``.
"""

from .cache import CacheBatch, KVCache
from .conditioning import Condition, Text
from .config import ModelConfig
from .diffusion import DDPM, FlowMatching, make_diffusion
from .layout import ChunkLayout
from .model import CausalVideoDiT
from .stepcache import StepCache, StepCacheConfig
from .stream import GenerationStats, StreamSession, next_chunks

__version__ = "0.1.0"
__all__ = ["CausalVideoDiT", "ModelConfig", "Text", "Condition", "KVCache", "ChunkLayout",
           "FlowMatching", "DDPM", "make_diffusion", "StepCache", "StepCacheConfig", "StreamSession",
           "GenerationStats", "next_chunks", "CacheBatch"]
