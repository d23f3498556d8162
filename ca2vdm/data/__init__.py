"""Datasets: procedural toy videos for training and measuring the model."""

from .digits import MovingDigits, caption_for, collate, load_glyphs, render_clip

__all__ = ["MovingDigits", "caption_for", "collate", "load_glyphs", "render_clip"]
from .folders import FrameFolder, VideoFolder, decode_clip, probe_video

__all__ += ["FrameFolder", "VideoFolder", "decode_clip", "probe_video"]
