"""Workflows: the jobs that run the library end to end and write their results to a folder.

They sit on top of the library core (they build ShapesWorld data, load zoo models and write files,
which the core never does):

* :func:`run_sweep` (:mod:`.sweep`): a probing sweep defined in YAML (:mod:`.sweep_config`), from
  extraction to tables and figures, resumable;
* :func:`world_attribution` (:mod:`.attribution_run`): the source split and image maps of
  ShapesWorld colour questions;
* :mod:`.evaluation`: a reference model's accuracy and priors on fresh ShapesWorld questions.
"""
from .attribution_run import world_attribution
from .evaluation import answers, evaluate, prior_figures
from .sweep import run_sweep
from .sweep_config import load_config

__all__ = ["answers", "evaluate", "load_config", "prior_figures", "run_sweep", "world_attribution"]
