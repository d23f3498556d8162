"""Training: the run config, the losses, the EMA and schedule, and the loop.

* ``config``  — ``TrainConfig``, YAML run configs with ``--set`` overrides
* ``losses``  — the Ca2-VDM recipe (``ca2vdm_loss``) and all-chunks teacher forcing (``all_chunks_loss``)
* ``optim``   — ``EMA`` of the weights, the warm-up + cosine learning rate (``lr_at``)
* ``trainer`` — ``Trainer`` and ``train_from_config`` (checkpoints, resume, DDP under torchrun)
"""

from .config import TrainConfig, apply_overrides, load_run_config
from .losses import (Draws, Objective, all_chunks_loss, ca2vdm_loss, clip_frames, drop_captions, prefix_choices,
                     prefix_start)
from .optim import EMA, lr_at
from .trainer import TextCache, Trainer, train_from_config

__all__ = ["TrainConfig", "apply_overrides", "load_run_config", "Draws", "Objective", "all_chunks_loss",
           "ca2vdm_loss", "clip_frames", "drop_captions", "prefix_choices", "prefix_start", "EMA", "lr_at",
           "TextCache", "Trainer", "train_from_config"]
