"""ca2vdm: efficient autoregressive video diffusion (Ca2-VDM) in PyTorch."""

from .cache import ChunkLayout, KVCache
from .diffusion import DDPM, FlowMatching, make_diffusion
from .model import CausalVideoDiT, Condition, ModelConfig, Text

__version__ = "0.1.0"
__all__ = ["CausalVideoDiT", "ModelConfig", "Text", "Condition", "KVCache", "ChunkLayout",
           "FlowMatching", "DDPM", "make_diffusion"]
