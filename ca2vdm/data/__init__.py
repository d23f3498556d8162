"""Datasets: procedural toy videos for training and measuring the model."""

from .digits import MovingDigits, caption_for, collate, load_glyphs, render_clip

__all__ = ["MovingDigits", "caption_for", "collate", "load_glyphs", "render_clip"]
