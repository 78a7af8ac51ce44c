"""raydd: dataset distillation at cluster scale on Ray.

Python API (the CLI calls the same functions)::

    import raydd
    cfg = raydd.load_config("configs/digits.yaml", ["distill.ipc=4"])
    result = raydd.distill(cfg, out="runs/digits")        # prepare data + teachers if needed, then APM
    table = raydd.sweep(synset="runs/digits/synset", archs=["convnet", "resnet18"], seeds=3)
    ranked = raydd.rank(cfg, ["convnet:width=16", "convnet:depth=2", "resnet18"], out="runs/digits")
    syn = raydd.load_synset("runs/digits/synset")          # .images .pixels .labels .soft_labels
    loader = syn.dataloader(64, augment="color_crop_cutout_scale_rotate", soft_labels=True)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import Config, load_config
from .errors import ConfigError, DataError, RayddError

__version__ = "0.1.0"
__all__ = ["Config", "load_config", "distill", "sweep", "rank", "run", "load_synset", "RayddError",
           "ConfigError", "DataError"]


def _config(config: Config | str | Path, overrides: list[str] | None) -> Config:
    if isinstance(config, Config):
        if overrides:
            raise ConfigError("overrides apply to a config file; edit the Config object directly instead")
        config.validate()
        return config
    return load_config(config, overrides)


def distill(config: Config | str | Path, out: str | Path | None = None,
            overrides: list[str] | None = None):
    """Distil a synset (training the teacher pool first if the run has none); returns paths."""
    from . import pipeline
    cfg = _config(config, overrides)
    run_dir = pipeline.run_dir_for(cfg, out)
    pipeline.stage_teachers(cfg, run_dir)
    return pipeline.stage_distill(cfg, run_dir)


def sweep(*args: Any, **kwargs: Any):
    """Ray Tune sweep over architectures × seeds × modes; see :func:`raydd.evaluate.sweep`."""
    from .evaluate import sweep as _sweep
    return _sweep(*args, **kwargs)


def rank(config: Config | str | Path, candidates: list[str], out: str | Path | None = None,
         overrides: list[str] | None = None, **kwargs: Any):
    """Rank ``candidates`` (model specs) by accuracy after training on the run's synset, on a random
    subset and on the full data, in one sweep; Spearman's ρ / Kendall's τ with bootstrap intervals.
    ``kwargs``: ``synset_dir``, ``resamples``, ``seed``, ``level``, ``progress``; see
    :func:`raydd.evaluate.rank.run_rank`."""
    from . import pipeline
    from .evaluate.rank import run_rank
    cfg = _config(config, overrides)
    return run_rank(cfg, pipeline.run_dir_for(cfg, out), candidates, **kwargs)


def load_synset(directory: str | Path):
    """A synset directory (``RUN/synset``) as a :class:`raydd.synset.Synset`: ``.images`` (normalised,
    as stored), ``.pixels``, ``.labels``, ``.soft_labels``, ``.to_dataset()``, ``.dataloader()``."""
    from .synset import load_synset as _load
    return _load(directory)


def run(config: Config | str | Path, out: str | Path | None = None, overrides: list[str] | None = None):
    """prepare → teachers → distill → evaluate, resuming whatever ``out`` already holds."""
    from . import pipeline
    cfg = _config(config, overrides)
    return pipeline.run(cfg, pipeline.run_dir_for(cfg, out))
