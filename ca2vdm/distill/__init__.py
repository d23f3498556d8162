"""Few-step distillation of a many-step teacher into a causal student (CausVid, Self-Forcing).

* ``dmd`` — distribution matching distillation: the DMD gradient, its loss and the generator /
  critic loop (``DMD``), on any problem that says how to sample, score and train the critic
"""

from .dmd import DMD, DMDConfig, DMDProblem, dmd_gradient, dmd_levels, dmd_loss

__all__ = ["DMD", "DMDConfig", "DMDProblem", "dmd_gradient", "dmd_levels", "dmd_loss"]
