"""Few-step distillation of a many-step teacher into a causal student (CausVid, Self-Forcing).

* ``dmd`` — distribution matching distillation: the DMD gradient, its loss and the generator /
  critic loop (``DMD``), on any problem that says how to sample, score and train the critic
* ``diagnostic`` — does the critic track the student: |fake - real| and its cosine with the
  guidance direction per noise level, on a fixed probe batch (``score_diagnostic``)
* ``ode`` — the ODE initialisation: the teacher's trajectories at the student's levels
  (``write_ode_pairs``, ``ODEPairs``) and the student's regression onto them (``ode_regression_loss``)
* ``video`` — the causal video problem (``VideoDMD``): the self rollout, the teacher's guided
  all-chunks real score, the critic in that layout
* ``run`` — ``ca2vdm distill``: the config (``DistillConfig``) and its three resumable stages
"""

from .dmd import DMD, DMDConfig, DMDProblem, dmd_gradient, dmd_levels, dmd_loss
from .diagnostic import plot_diagnostic, score_diagnostic
from .ode import ODEPairs, ode_regression_loss, states_at_levels, teacher_trajectories, write_ode_pairs
from .run import STAGES, DistillConfig, Distillation, distill_from_config, load_distill_config
from .video import VideoDMD

__all__ = ["DMD", "DMDConfig", "DMDProblem", "dmd_gradient", "dmd_levels", "dmd_loss",
           "score_diagnostic", "plot_diagnostic",
           "ODEPairs", "ode_regression_loss", "states_at_levels", "teacher_trajectories", "write_ode_pairs",
           "STAGES", "DistillConfig", "Distillation", "distill_from_config", "load_distill_config", "VideoDMD"]
