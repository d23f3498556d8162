"""Datasets of clips: procedural moving digits, folders of videos or frames, and the registry that
builds one from a run config's ``data`` section (``build_dataset``)."""

from .digits import MovingDigits, caption_for, collate, load_glyphs, render_clip
from .folders import FrameFolder, VideoFolder, decode_clip, probe_video
from .registry import build_dataset

__all__ = ["MovingDigits", "caption_for", "collate", "load_glyphs", "render_clip",
           "FrameFolder", "VideoFolder", "decode_clip", "probe_video", "build_dataset"]
