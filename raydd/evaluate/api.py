"""The public entry points of evaluation: ``raydd evaluate`` (:func:`run_evaluation`) and the
notebook sweep (:func:`sweep`), which check their arguments and hand them to the Tune sweep."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..config import Config, ModeArchs, Resources, section
from ..errors import ConfigError
from ..synset import Synset
from ..tracking import tune_callbacks
from .tune_run import scoped_environ
from .protocol import check_mode
from .sources import digest, tensor_digest
from .sweep import SweepResult, execute
from .tune_space import describe, parse_space


@dataclass
class EvalResult:
    results_json: Path
    csv: Path
    md: Path
    plot: Path
    table: str
    trials: int
    seconds: float

    @property
    def results_md(self) -> Path:
        return self.md


def run_evaluation(cfg: Config, run_dir: str | Path, *, synset_dir: str | Path | None = None,
                   progress: bool = True) -> EvalResult:
    """``raydd evaluate``: the sweep of ``cfg.evaluate`` on RUN/synset (or ``synset_dir``) into RUN/eval."""
    run_dir = Path(run_dir)
    ecfg = cfg.evaluate
    ecfg.validate("evaluate")
    out = run_dir / "eval"
    with scoped_environ():   # tune_callbacks may switch Tune's automatic loggers off for this sweep only
        res = execute(
            synset=Path(synset_dir) if synset_dir is not None else run_dir / "synset",
            data=cfg.data.dir, ecfg=ecfg, seeds=_seed_list(ecfg.seeds, cfg.seed),
            lrs=ecfg.lr_search or [ecfg.lr], baselines=list(ecfg.baselines), resources=ecfg.resources,
            teachers_dir=run_dir if (run_dir / "teachers").exists() else None,
            dsa_strategy=cfg.data.dsa_strategy, device=cfg.device, out_dir=out,
            storage_path=ecfg.storage_path, name="eval", progress=progress, ray_cfg=cfg.ray,
            title=cfg.name, config=cfg.to_dict(), full_epochs=ecfg.full_epochs,
            zca_of=(cfg, run_dir), val_seed=cfg.seed,
            # tracking: Tune's own logger callbacks (CSV/JSON, TensorBoard, MLflow, W&B) per cfg.tracking
            callbacks=tune_callbacks(cfg.tracking))
    return EvalResult(res.results_json, res.csv, res.md, res.plot, res.table, len(res.trials), res.seconds)


def sweep(synset: str | Path | Synset, archs: Sequence[str], seeds: int | Sequence[int] = 3,
          modes: Sequence[str] = ("soft",), param_space: dict[str, Any] | None = None,
          mode_archs: dict[str, Sequence[str]] | None = None,
          resources: Resources | dict[str, float] | None = None, *, data: str | Path | None = None,
          config: Config | None = None, storage_path: str | None = None, name: str | None = None,
          out_dir: str | Path | None = None, baselines: Sequence[str] | None = None,
          teachers: str | Path | None = None, full_epochs: int | None = None, scheduler: Any = None,
          num_samples: int = 1, search_alg: Any = None, callbacks: Sequence[Any] | None = None,
          progress: bool = True) -> SweepResult:
    """Evaluate ``synset`` on ``archs`` × ``seeds`` × ``modes`` from a notebook.

    ``param_space`` sets or searches evaluation settings by field name (``lr``, ``epochs``,
    ``weight_decay``, ``soft_temperature``, ``kd.alpha``, ``elf.lambda_front``, …): a constant, a
    list of lrs, ``tune.grid_search([...])`` or a Tune domain (``tune.loguniform(1e-3, 1e-1)``,
    ``tune.choice([...])``), drawn ``num_samples`` times (see :mod:`raydd.evaluate.tune_space`).
    ``scheduler`` (e.g. ``ASHAScheduler(metric="val_acc", mode="max")``; its metric defaults to
    ``val_acc``) and ``search_alg`` compare trials within one (source, mode, architecture) bracket
    on the validation split held out of the training data (``evaluate.val_size``); pass an
    instance (copied per bracket) or a factory. ``callbacks``: Tune callbacks, shown every trial's
    results. The result holds Tune's ``result_grid`` and ``dataframe()``. ``resources`` per trial:
    ``{"cpu": 1, "gpu": 0.25}``. ``data``: the shard
    directory (default ``config.data.dir``). ``teachers``: a run directory holding ``teachers/``
    for the soft random baseline (default: the synset directory's parent when it has one).
    ``mode_archs`` limits a mode to some of ``archs``, e.g. ``{"kd": ["resnet18"]}``.
    Trials report ``epoch``, ``train_loss`` (and ``val_acc``) every ``evaluate.report_every`` epochs,
    and ``test_acc`` with their last report. Reports go to ``out_dir`` (default ``raydd-sweeps/NAME``).
    """
    base = config or Config()
    ecfg = dataclasses.replace(base.evaluate, kd=dataclasses.replace(base.evaluate.kd),
                               elf=dataclasses.replace(base.evaluate.elf))
    if isinstance(archs, str) or not archs or not all(isinstance(a, str) and a for a in archs):
        raise ConfigError(f"archs: {archs!r} is invalid; expected a non-empty list of architecture specs")
    if isinstance(modes, str):
        modes = [modes]
    ecfg.archs, ecfg.modes = list(archs), list(modes)
    if mode_archs is not None:
        if not isinstance(mode_archs, dict):
            raise ConfigError(f"mode_archs: {mode_archs!r} is invalid; expected a dict mode -> list of archs")
        ecfg.mode_archs = section(ModeArchs, {m: list(a) if isinstance(a, (list, tuple)) else a
                                              for m, a in mode_archs.items()}, "mode_archs")
    seed_list = _seed_list(seeds, base.seed)
    ecfg.seeds = len(seed_list)
    space = parse_space(ecfg, param_space or {})
    lrs = space.lrs
    for m in ecfg.modes:
        check_mode(m)
    ecfg.validate("evaluate")
    res = _resources(resources, ecfg.resources)
    if data is None:
        data = base.data.dir
    syn_path = None if isinstance(synset, Synset) else Path(synset)
    if teachers is None and syn_path is not None and (syn_path.parent / "teachers").exists():
        teachers = syn_path.parent
    name = name or "sweep-" + digest({"synset": str(syn_path) if syn_path else tensor_digest(synset),
                                     "archs": ecfg.archs, "modes": ecfg.modes, "seeds": seed_list,
                                     "lrs": lrs, "data": str(data),
                                     **({"space": describe(space.tune_params())} if space.searched else {})})[:8]
    _check_name(name)
    out = Path(out_dir) if out_dir is not None else Path("raydd-sweeps") / name
    return execute(synset=synset, data=str(data), ecfg=ecfg, seeds=seed_list, lrs=lrs,
                    baselines=list(baselines if baselines is not None else ecfg.baselines), resources=res,
                    teachers_dir=Path(teachers) if teachers is not None else None,
                    dsa_strategy=base.data.dsa_strategy, device=base.device, out_dir=out,
                    storage_path=storage_path or ecfg.storage_path, name=name, progress=progress,
                    ray_cfg=base.ray if config is not None else None, title=name, config=None,
                    full_epochs=full_epochs if full_epochs is not None else ecfg.full_epochs,
                    scheduler=scheduler, zca_of=(base, Path(teachers) if teachers is not None else out),
                    space=space, num_samples=num_samples, search_alg=search_alg, callbacks=callbacks,
                    val_seed=base.seed)


def _seed_list(seeds: int | Sequence[int], base: int = 0) -> list[int]:
    if isinstance(seeds, bool) or not isinstance(seeds, (int, list, tuple, range)):
        raise ConfigError(f"seeds: {seeds!r} is invalid; expected an integer >= 1 or a list of seeds")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ConfigError(f"seeds: {seeds!r} is invalid; expected an integer >= 1")
        return [base + i for i in range(seeds)]
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: {seeds!r} is invalid; expected a non-empty list of distinct integers >= 0")
    return seeds


def _resources(given: Resources | dict[str, float] | None, default: Resources) -> Resources:
    if given is None:
        return default
    if isinstance(given, Resources):
        res = given
    elif isinstance(given, dict):
        unknown = set(given) - {"cpu", "gpu", "cpus", "gpus"}
        if unknown:
            raise ConfigError(f"resources: unknown keys {sorted(unknown)}; expected cpu and gpu")
        res = Resources(cpus=float(given.get("cpu", given.get("cpus", 1.0))),
                        gpus=float(given.get("gpu", given.get("gpus", 0.0))))
    else:
        raise ConfigError(f"resources: {given!r} is invalid; expected {{'cpu': N, 'gpu': F}}")
    res.validate("resources")
    return res


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"name: {name!r} is invalid; expected a plain directory name")
