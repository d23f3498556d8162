"""ca2vdm: efficient autoregressive video diffusion (Ca2-VDM) in PyTorch.

The public API at the top level; every concept lives in the module named after it (see
docs/ARCHITECTURE.md): ``config``, ``layout``, ``cache``, ``positions``, ``diffusion``, ``layers``,
``conditioning``, ``backbone``, ``model``, ``wan`` / ``causal_wan`` (Wan 2.1), ``stepcache``, ``stream``,
``generate``, ``pipeline`` / ``wan_stream`` (a Wan pipeline folder, streamed to pixels), ``training``, ``distill``, ``metrics``, ``eval``, ``bench``.
"""

from .backbone import Backbone
from .cache import CacheBatch, KVCache
from .causal_wan import CausalWan, CausalWanConfig, load_causal_wan
from .conditioning import Condition, Text
from .config import ModelConfig
from .diffusion import DDPM, FlowMatching, make_diffusion
from .layout import ChunkLayout
from .model import CausalVideoDiT
from .pipeline import Pipeline, PipelineError, load_pipeline
from .stepcache import StepCache, StepCacheConfig
from .stream import GenerationStats, StreamSession, next_chunks
from .wan import WanConfig, WanTransformer
from .wan_stream import WanStream

__version__ = "0.1.0"
__all__ = ["CausalVideoDiT", "ModelConfig", "Text", "Condition", "KVCache", "ChunkLayout",
           "FlowMatching", "DDPM", "make_diffusion", "StepCache", "StepCacheConfig", "StreamSession",
           "GenerationStats", "next_chunks", "CacheBatch", "Backbone", "CausalWan", "CausalWanConfig",
           "load_causal_wan", "WanConfig", "WanTransformer", "load_pipeline", "Pipeline", "PipelineError", "WanStream"]
