"""Evaluations: generate from a checkpoint, then measure with ``ca2vdm.metrics``.

* ``digits``       — moving-digits figures (digit accuracy per chunk, tracked speed, brightness drift, FVD)
  on the captions of held-out clips
* ``continuation`` — continue real videos from their first frames: PSNR / SSIM per chunk, FVD
* ``step_cache``   — quality against speed of every step-caching policy, and of fewer sampling steps
* ``distill``      — teacher and few-step students side by side: eval figures, streaming speed, goals,
  which row wins against the seed spread
* ``steering``     — a prompt switch mid-stream (re-cache, none, restart) and video-to-video strength curves
"""

from .continuation import evaluate_continuations
from .digits import evaluate_digits, held_out_clips
from .distill import compare_rows, distill_report, format_distill_table, plot_distill, stream_speed, take_fvd
from .steering import format_steering_tables, plot_steering, prompt_switch_report, switch_strip, v2v_report
from .step_cache import (STEP_CACHE_POLICIES, format_held_context_table, format_step_cache_table, held_context_report,
                         plot_step_cache, step_cache_report)

__all__ = ["evaluate_continuations", "evaluate_digits", "held_out_clips", "compare_rows", "distill_report", "format_distill_table",
           "plot_distill", "stream_speed", "take_fvd", "STEP_CACHE_POLICIES",
           "format_step_cache_table", "plot_step_cache", "step_cache_report", "held_context_report",
           "format_held_context_table", "prompt_switch_report", "v2v_report",
           "format_steering_tables", "plot_steering", "switch_strip"]
