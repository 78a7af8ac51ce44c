"""Evaluation: train fresh models on a synset (hard/soft/KD/ELF labels), beside random-subset and
whole-data baselines, as a Ray Tune sweep; reports in results.{json,csv,md} and plot.png."""
from .api import EvalResult, run_evaluation, sweep
from .protocol import MODES, evaluate_once
from .sweep import SweepResult

__all__ = ["MODES", "EvalResult", "SweepResult", "evaluate_once", "run_evaluation", "sweep"]
