"""Evaluation sweeps on Ray Tune: architecture × seed × (source, mode) [× lr], then reports.

Sources: ``distilled`` (the synset), ``random`` (a random real subset of the same IPC per seed,
hard labels and — when teachers exist — soft labels from the first teacher, the synset's rule)
and ``full`` (the whole training set, hard labels). Every trial is one plain-torch
:func:`~raydd.evaluate.protocol.evaluate_once` inside a Tune function trainable that loads its
data from disk itself (paths travel in the config, never tensors).

Files under the evaluation directory ``OUT`` (``RUN/eval`` for ``raydd evaluate``)::

    random/seed-S/                 the random baseline of seed S (a synset: images, labels,
                                   soft_labels, elf_features), rebuilt when its inputs change
    elf_feature_model.{safetensors,json}   the ELF feature model, trained once on real data
    elf_features.{safetensors,json}        ELF features of the distilled synset (kept beside it,
                                   so the synset and its checksum stay untouched)
    tune/NAME-HASH/                Tune experiments (``storage_path`` may point elsewhere)
    results.{json,csv,md}, plot.png

Resuming: a trial is identified by (source, mode, arch, seed, lr) plus a hash of every setting
that changes its result. Trials already in ``results.json`` are reused (those of other grids are kept
there under ``other_trials``, outside the table); the rest form one Tune
experiment named after their hash, so rerunning an interrupted sweep finds the same experiment
and resumes it with ``Tuner.restore(..., resume_errored=True)`` — finished trials are not re-run.
A changed grid only runs the new trials.

Test hook: with ``RAYDD_TEST_FAIL=SUBSTRING@MARKER`` in the driver's environment, trials whose
label contains SUBSTRING raise while the file MARKER does not exist (simulates a crashed sweep).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..config import Config, EvalConfig, ModeArchs, Resources, section
from ..errors import ConfigError, DataError, RayddError
from ..io import load_tensors, read_json, save_tensors, write_json
from ..synset import MANIFEST, Synset, load_synset, save_synset
from . import report
from .protocol import ElfNet, check_mode, evaluate_once, extract_features, front_shape

TEST_BATCH = 1024
REPORTS_PER_PHASE = 50      # intermediate Tune results per training phase (progress, schedulers)
IN_MEMORY_BYTES = 2 << 30   # a larger real training split is streamed from the shards every epoch
# EvalConfig fields that choose *which* trials run or *where*, not what a trial computes.
_NOT_SETTINGS = {"archs", "modes", "mode_archs", "seeds", "lr", "arch_lr", "lr_search", "baselines", "storage_path", "resources"}
# Settings that only one mode reads (its name is their prefix), so changing them re-runs only that mode.
_MODE_SETTINGS = {"soft_loss", "soft_temperature", "kd", "elf"}


@dataclass
class SweepResult:
    """Everything a notebook needs: per-trial records, the aggregate, the table and the files."""
    trials: list[dict[str, Any]]
    aggregate: list[dict[str, Any]]
    table: str
    results_json: Path
    csv: Path
    md: Path
    plot: Path
    out_dir: Path
    experiment: str | None
    seconds: float
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"SweepResult({len(self.trials)} trials, {self.md})\n{self.table}"


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


# ============================================================================ public API

def run_evaluation(cfg: Config, run_dir: str | Path, *, synset_dir: str | Path | None = None,
                   progress: bool = True) -> EvalResult:
    """``raydd evaluate``: the sweep of ``cfg.evaluate`` on RUN/synset (or ``synset_dir``) into RUN/eval."""
    run_dir = Path(run_dir)
    ecfg = cfg.evaluate
    ecfg.validate("evaluate")
    out = run_dir / "eval"
    res = _execute(
        synset=Path(synset_dir) if synset_dir is not None else run_dir / "synset",
        data=cfg.data.dir, ecfg=ecfg, seeds=_seed_list(ecfg.seeds, cfg.seed),
        lrs=ecfg.lr_search or [ecfg.lr], baselines=list(ecfg.baselines), resources=ecfg.resources,
        teachers_dir=run_dir if (run_dir / "teachers").exists() else None,
        dsa_strategy=cfg.data.dsa_strategy, device=cfg.device, out_dir=out,
        storage_path=ecfg.storage_path, name="eval", progress=progress, ray_cfg=cfg.ray,
        title=cfg.name, config=cfg.to_dict(), full_epochs=ecfg.full_epochs,
        zca_of=(cfg, run_dir))
    return EvalResult(res.results_json, res.csv, res.md, res.plot, res.table, len(res.trials), res.seconds)


def sweep(synset: str | Path | Synset, archs: Sequence[str], seeds: int | Sequence[int] = 3,
          modes: Sequence[str] = ("soft",), param_space: dict[str, Any] | None = None,
          mode_archs: dict[str, Sequence[str]] | None = None,
          resources: Resources | dict[str, float] | None = None, *, data: str | Path | None = None,
          config: Config | None = None, storage_path: str | None = None, name: str | None = None,
          out_dir: str | Path | None = None, baselines: Sequence[str] | None = None,
          teachers: str | Path | None = None, full_epochs: int | None = None, scheduler: Any = None,
          progress: bool = True) -> SweepResult:
    """Evaluate ``synset`` on ``archs`` × ``seeds`` × ``modes`` from a notebook.

    ``param_space`` overrides evaluation settings by field name (``epochs``, ``soft_loss``,
    ``kd.alpha``, ``elf.lambda_front``, …); ``lr`` may be a list or ``tune.grid_search([...])``
    for an lr search. ``resources`` per trial: ``{"cpu": 1, "gpu": 0.25}``. ``data``: the shard
    directory (default ``config.data.dir``). ``teachers``: a run directory holding ``teachers/``
    for the soft random baseline (default: the synset directory's parent when it has one).
    ``mode_archs`` limits a mode to some of ``archs``, e.g. ``{"kd": ["resnet18"]}``.
    ``scheduler``: an optional Tune scheduler; trials report ``epoch`` and ``train_loss`` every
    epoch and ``test_acc`` at the end. Reports go to ``out_dir`` (default ``raydd-sweeps/NAME``).
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
    lrs = _apply_param_space(ecfg, param_space or {})
    for m in ecfg.modes:
        check_mode(m)
    ecfg.validate("evaluate")
    res = _resources(resources, ecfg.resources)
    if data is None:
        data = base.data.dir
    syn_path = None if isinstance(synset, Synset) else Path(synset)
    if teachers is None and syn_path is not None and (syn_path.parent / "teachers").exists():
        teachers = syn_path.parent
    name = name or "sweep-" + _hash({"synset": str(syn_path) if syn_path else _tensor_hash(synset),
                                     "archs": ecfg.archs, "modes": ecfg.modes, "seeds": seed_list,
                                     "lrs": lrs, "data": str(data)})[:8]
    _check_name(name)
    out = Path(out_dir) if out_dir is not None else Path("raydd-sweeps") / name
    return _execute(synset=synset, data=str(data), ecfg=ecfg, seeds=seed_list, lrs=lrs,
                    baselines=list(baselines if baselines is not None else ecfg.baselines), resources=res,
                    teachers_dir=Path(teachers) if teachers is not None else None,
                    dsa_strategy=base.data.dsa_strategy, device=base.device, out_dir=out,
                    storage_path=storage_path or ecfg.storage_path, name=name, progress=progress,
                    ray_cfg=base.ray if config is not None else None, title=name, config=None,
                    full_epochs=full_epochs if full_epochs is not None else ecfg.full_epochs,
                    scheduler=scheduler, zca_of=(base, Path(teachers) if teachers is not None else out))


# ============================================================================ validation helpers

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


def _apply_param_space(ecfg: EvalConfig, space: dict[str, Any]) -> list[float]:
    """Set constant overrides on ``ecfg``; return the lr grid (only lr may be searched)."""
    lrs = list(ecfg.lr_search or [ecfg.lr])
    for key, value in space.items():
        if isinstance(value, dict) and set(value) == {"grid_search"}:
            value = list(value["grid_search"])
        if key == "lr":
            lrs = list(value) if isinstance(value, (list, tuple)) else [value]
            if not lrs or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in lrs):
                raise ConfigError(f"param_space['lr']: {value!r} is invalid; expected positive learning rates")
            lrs = [float(v) for v in lrs]
            continue
        if isinstance(value, (list, tuple)) or hasattr(value, "sample"):
            raise ConfigError(f"param_space[{key!r}]: only 'lr' can be searched; give one value for {key!r} "
                              f"(run one sweep per value to compare)")
        obj, leaf = ecfg, key
        if "." in key:
            head, leaf = key.split(".", 1)
            obj = {"kd": ecfg.kd, "elf": ecfg.elf}.get(head)
        names = {f.name for f in dataclasses.fields(obj)} if obj is not None else set()
        if leaf not in names or leaf in _NOT_SETTINGS:
            valid = sorted(n for n in {f.name for f in dataclasses.fields(EvalConfig)} - _NOT_SETTINGS
                           if n not in ("kd", "elf"))
            raise ConfigError(f"param_space: unknown setting {key!r}; expected lr, one of {', '.join(valid)}, "
                              f"or kd.*/elf.* fields")
        current = getattr(obj, leaf)
        if type(current) in (int, float):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or (type(current) is int and not float(value).is_integer()):
                raise ConfigError(f"param_space[{key!r}]: {value!r} is invalid; expected "
                                  f"{'an integer' if type(current) is int else 'a number'}")
            value = type(current)(value)
        elif type(current) is not type(value):
            raise ConfigError(f"param_space[{key!r}]: {value!r} is invalid; expected a {type(current).__name__}")
        setattr(obj, leaf, value)
    return lrs


def _check_settings(ecfg: EvalConfig) -> None:
    """Settings given from Python skip the YAML loader, so validate them here too."""
    ecfg.validate("evaluate")


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


def _storage(storage_path: str | None, out: Path) -> str:
    """An absolute local path (created and probed for writing) or a URI left to Tune's filesystem."""
    if storage_path and "://" in storage_path:
        return storage_path
    p = Path(storage_path).expanduser() if storage_path else out / "tune"
    p = p.resolve()
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise RayddError(f"evaluate.storage_path {str(p)!r} cannot be written ({e.strerror or e}); "
                         f"expected a writable directory or a URI such as s3://bucket/path") from None
    return str(p)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _tensor_hash(s: Synset) -> str:
    h = hashlib.sha256()
    for k, t in sorted(s.tensors().items()):
        h.update(k.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _data_fingerprint(info: Any) -> str:
    return _hash({"shards": getattr(info, "shards", None), "shape": list(info.shape),
                  "classes": info.num_classes, "mean": list(info.mean), "std": list(info.std)})


# ============================================================================ planning

@dataclass
class _Prepared:
    synset_dir: Path
    synset: Synset
    synset_sha: str
    info: Any
    ipc: int
    runs: list[tuple[str, str]]          # (source, mode) pairs to run
    columns: list[tuple[str, str]]
    notes: list[str]
    skip: set[tuple[str, str]]           # (arch, mode) pairs that cannot run (ELF without a split)
    sources: dict[str, dict[str, Any]]   # per source: synset path / features path / fingerprint


def _execute(*, synset: str | Path | Synset, data: str, ecfg: EvalConfig, seeds: list[int],
             lrs: list[float], baselines: list[str], resources: Resources, teachers_dir: Path | None,
             dsa_strategy: str, device: str, out_dir: Path, storage_path: str | None, name: str,
             progress: bool, ray_cfg: Any, title: str, config: dict | None,
             full_epochs: int | None = None, scheduler: Any = None,
             zca_of: tuple[Config, Path] | None = None) -> SweepResult:
    t0 = time.time()
    _check_settings(ecfg)
    for b in baselines:
        if b not in ("random", "full"):
            raise ConfigError(f"evaluate.baselines: {b!r} is invalid; expected random and/or full")
    trial_device = _trial_device(device, resources)
    out_dir = Path(out_dir).resolve()
    storage = _storage(storage_path, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    zca = _zca(*zca_of) if zca_of is not None else None
    prep = _prepare(synset, data, ecfg, seeds, baselines, teachers_dir, dsa_strategy, out_dir, resources,
                    trial_device, progress, zca, ray_cfg)
    settings = {k: v for k, v in dataclasses.asdict(ecfg).items() if k not in _NOT_SETTINGS | _MODE_SETTINGS}
    settings["dsa_strategy"] = dsa_strategy

    multi_lr = len(lrs) > 1
    if multi_lr and ecfg.arch_lr:
        raise ConfigError(f"evaluate.arch_lr: {ecfg.arch_lr} cannot be combined with an lr search "
                          f"over {lrs}; expected one of the two")
    own = {arch: lr for arch in ecfg.archs if (lr := ecfg.lr_of(arch)) is not None}
    if own:
        prep.notes.append(f"lr {lrs[0]:g}, except " + ", ".join(f"{a} {lr:g}" for a, lr in own.items())
                          + " (evaluate.arch_lr)")
    planned: dict[str, dict[str, Any]] = {}
    for arch in ecfg.archs:
        own_lr = own.get(arch)
        for source, mode in prep.runs:
            if (arch, mode) in prep.skip or not ecfg.mode_archs.allows(mode, arch):
                continue
            for seed in seeds:
                for lr in [own_lr] if own_lr is not None else lrs:
                    label = f"{source}/{mode} {arch} s{seed}" + (f" lr{lr:g}" if multi_lr else "")
                    key = _hash({"label": label, "lr": lr, "settings": settings,
                                 "mode": {k: getattr(ecfg, k) for k in _MODE_SETTINGS if k.startswith(mode)},
                                 "epochs": full_epochs if source == "full" else None,
                                 "source": prep.sources[source]["fingerprint"],
                                 "elf": prep.sources[source].get("elf") if mode == "elf" else None})[:16]
                    planned[label] = {"label": label, "source": source, "mode": mode, "arch": arch,
                                      "seed": seed, "lr": lr, "key": key}
    previous, restore = _reusable(out_dir / "results.json")
    # the same grid after a failure: restore its experiment (its finished trials come back from Tune);
    # a changed grid runs only what is missing, reusing the failed experiment's finished trials too
    kept = {k: t for k, t in previous.items() if t.get("experiment") != restore}
    pending = [t for t in planned.values() if t["key"] not in kept]
    if _experiment(name, pending) != restore:  # also when nothing is left to restore (None)
        kept = previous
        pending = [t for t in planned.values() if t["key"] not in kept]
    reused = [dict(kept[t["key"]], label=t["label"]) for t in planned.values() if t["key"] in kept]

    experiment = None
    ran: list[dict[str, Any]] = []
    if pending:
        experiment = _experiment(name, pending)
        ctx = {"data": prep.info.root, "ecfg": dataclasses.asdict(ecfg), "dsa_strategy": dsa_strategy,
               "device": trial_device, "cpus": resources.cpus, "shape": list(prep.info.shape),
               "num_classes": prep.info.num_classes, "sources": prep.sources,
               "full_epochs": full_epochs, "trials": {t["label"]: t for t in pending}, "zca": zca,
               "fail": os.environ.get("RAYDD_TEST_FAIL")}
        if progress:
            print(f"[evaluate] {len(pending)} trials to run ({len(reused)} reused) → {storage}/{experiment}",
                  flush=True)
        from ..raycluster import init_ray
        init_ray(ray_cfg)
        ran = _run_tune(ctx, [t["label"] for t in pending], storage, experiment, resources, progress, scheduler)
        for r in ran:
            r["experiment"] = experiment

    order = {label: i for i, label in enumerate(planned)}
    trials = sorted(reused + ran, key=lambda t: order.get(t["label"], len(order)))
    failed = [t for t in trials if t["status"] != "ok"]
    # finished trials of other grids stay on file (not in the table), so narrowing a sweep loses nothing
    planned_keys = {t["key"] for t in planned.values()}
    meta = {"other_trials": [t for k, t in previous.items() if k not in planned_keys],
            "complete": not failed, "pending_experiment": experiment if failed else None,
            "synset": str(prep.synset_dir), "synset_sha256": prep.synset_sha, "ipc": prep.ipc,
            "seeds": seeds, "lrs": lrs, "storage_path": storage, "experiment": experiment}
    written = report.write_reports(out_dir, trials, archs=list(ecfg.archs), columns=prep.columns,
                                   config=config or {"evaluate": dataclasses.asdict(ecfg), "data": data},
                                   seconds=time.time() - t0, notes=prep.notes, lr_search=multi_lr,
                                   extra=meta, title=f"{title} · IPC {prep.ipc}")
    if failed:
        first = failed[0]
        hint = f" (evaluate.arch_lr.{first['arch']} sets its lr alone)" if "diverged" in str(first.get("error")) else ""
        raise RayddError(f"{len(failed)} of {len(trials)} evaluation trials did not finish (first: "
                         f"{first['label']}: {first.get('error') or first['status']}{hint}); finished trials are "
                         f"kept in {written['results_json']} — rerun the same command to resume the rest")
    return SweepResult(trials=trials, aggregate=written["aggregate"], table=written["table"],
                       results_json=written["results_json"], csv=written["csv"], md=written["md"],
                       plot=written["plot"], out_dir=out_dir, experiment=experiment,
                       seconds=time.time() - t0, notes=prep.notes)


def _trial_device(device: str, res: Resources) -> str:
    if device == "cuda" and res.gpus <= 0:
        raise ConfigError("evaluate.resources.gpus: 0 with device cuda; give each trial a (fractional) GPU")
    if device == "cpu" and res.gpus > 0:
        raise ConfigError(f"evaluate.resources.gpus: {res.gpus} with device cpu; set gpus to 0 or device auto")
    return "cuda" if res.gpus > 0 else "cpu"


def _reusable(path: Path) -> tuple[dict[str, dict[str, Any]], str | None]:
    """Finished trials of earlier sweeps by key, and the experiment a failed sweep left to restore."""
    if not path.exists():
        return {}, None
    try:
        doc = read_json(path)
    except RayddError:
        return {}, None
    return ({t["key"]: t for t in doc.get("trials", []) + doc.get("other_trials", [])
             if t.get("status") == "ok" and t.get("key")}, doc.get("pending_experiment"))


def _experiment(name: str, pending: list[dict[str, Any]]) -> str:
    """Named after its trials, so rerunning an interrupted sweep finds the same experiment."""
    return f"{name}-{_hash(sorted(t['key'] for t in pending))[:10]}"


def _prepare(synset: str | Path | Synset, data: str, ecfg: EvalConfig, seeds: list[int], baselines: list[str],
             teachers_dir: Path | None, dsa_strategy: str, out: Path, resources: Resources, device: str,
             progress: bool, zca: dict[str, str] | None, ray_cfg: Any) -> _Prepared:
    from ..data import load_info
    from ..models import build

    info = load_info(data)
    shape, classes = tuple(int(v) for v in info.shape), int(info.num_classes)
    if isinstance(synset, Synset):
        synset.check()
        syn_dir = out / "synset"
        save_synset(syn_dir, synset)
    else:
        syn_dir = Path(synset)
    syn = load_synset(syn_dir)
    syn_sha = read_json(syn_dir / MANIFEST).get("sha256") or _tensor_hash(syn)
    if tuple(syn.shape) != shape:
        raise DataError(f"synset {syn_dir} holds {_fmt(syn.shape)} images but the data {data} is {_fmt(shape)}")
    if syn.num_classes != classes or int(syn.labels.max()) >= classes:
        raise DataError(f"synset {syn_dir} has {syn.num_classes} classes but the data {data} has {classes}")
    per_class = torch.bincount(syn.labels, minlength=classes)
    ipc = max(1, round(syn.labels.numel() / classes))
    notes: list[str] = []
    if int(per_class.min()) != int(per_class.max()):
        notes.append(f"the synset has {int(per_class.min())}–{int(per_class.max())} images per class; "
                     f"the random baseline uses {ipc} per class")
    modes = list(ecfg.modes)
    if "soft" in modes and syn.soft_labels is None:
        raise RayddError(f"mode 'soft' needs soft labels, but the synset {syn_dir} has none; use modes: [hard]")
    if syn.soft_labels is not None and tuple(syn.soft_labels.shape[1:]) != (classes,):
        raise DataError(f"synset {syn_dir} soft labels have {syn.soft_labels.shape[1]} classes, the data {classes}")

    teachers, teacher_sha = None, None
    if "random" in baselines:
        if teachers_dir is not None:
            from ..teachers import load_teachers
            models, records = load_teachers(teachers_dir, expect_classes=classes, expect_shape=shape)
            teachers, teacher_sha = models[0], records[0].get("sha256")
        else:
            notes.append("random · soft omitted: no teachers (RUN/teachers) to label the random subset")
    random_modes = [m for m in dict.fromkeys(modes + ["hard", "soft"]) if m != "soft" or teachers is not None]

    runs = [("distilled", m) for m in modes]
    columns = []
    for m in modes:
        columns.append(("distilled", m))
        if "random" in baselines and m in random_modes:
            columns.append(("random", m))
    if "random" in baselines:
        runs += [("random", m) for m in random_modes]
        columns += [("random", m) for m in random_modes if m not in modes]
    if "full" in baselines:
        runs.append(("full", "hard"))
        columns.append(("full", "hard"))

    fp = _hash([_data_fingerprint(info), zca["sha256"] if zca else None])
    sources: dict[str, dict[str, Any]] = {
        "distilled": {"synset": str(syn_dir.resolve()), "features": None, "fingerprint": [syn_sha, fp]},
        "random": {"synset": str((out / "random").resolve() / "seed-{seed}"), "features": None,
                   "fingerprint": [fp, teacher_sha]},
        "full": {"fingerprint": fp}}

    skip: set[tuple[str, str]] = set()
    feature_model, feature_sha = None, None
    if "elf" in modes:
        feature_model, feature_sha, fshape = _elf_feature_model(ecfg, data, info, fp, dsa_strategy, out,
                                                                resources, device, zca, ray_cfg, progress)
        fshapes = {fshape, tuple(syn.elf_features.shape[1:]) if syn.elf_features is not None else fshape}
        elf_archs = [a for a in ecfg.archs if ecfg.mode_archs.allows("elf", a)]  # the others never try it
        for arch in elf_archs:
            net = build(arch, shape[0], classes, shape[1])
            reason = next((r for r in (_elf_refusal(net, shape, fs) for fs in fshapes) if r), "")
            if reason:
                skip.add((arch, "elf"))
                notes.append(f"elf not evaluated for {arch}: {reason}")
        if len(skip) == len(elf_archs):
            raise RayddError(f"mode 'elf' fits none of the architectures {', '.join(elf_archs)}; "
                             f"{notes[-1].split(': ', 1)[1]}")
        if syn.elf_features is None:
            sources["distilled"]["features"] = str(_distilled_features(syn, syn_sha, feature_model, feature_sha,
                                                                       out).resolve())
            sources["distilled"]["elf"] = feature_sha
        else:
            notes.append("elf uses the feature maps stored with the synset")
        sources["random"]["elf"] = feature_sha   # in the keys of elf trials only
    if "random" in baselines:
        for seed in seeds:
            _random_subset(out / "random" / f"seed-{seed}", info, fp, ipc, seed, teachers, teacher_sha,
                           feature_model if "elf" in random_modes else None, feature_sha, zca, progress)
    return _Prepared(syn_dir, syn, syn_sha, info, ipc, runs, columns, notes, skip, sources)


def _elf_refusal(net: torch.nn.Module, image_shape: tuple[int, ...], feature_shape: tuple[int, ...]) -> str:
    try:
        ElfNet(net, image_shape, feature_shape)
    except RayddError as e:
        return str(e).split(": ", 1)[-1] if str(e).startswith("ELF cannot") else str(e)
    return ""


def _fmt(shape: Iterable[int]) -> str:
    return "×".join(str(int(v)) for v in shape)


# ============================================================================ cached artefacts

def _elf_feature_model(ecfg: EvalConfig, data: str, info: Any, fp: str, dsa_strategy: str, out: Path,
                       resources: Resources, device: str, zca: dict[str, str] | None, ray_cfg: Any,
                       progress: bool):
    """Train (once) the ELF feature model on real data as a Ray task; returns (model, sha, feature shape)."""
    from ..models import build

    shape, classes = tuple(int(v) for v in info.shape), int(info.num_classes)
    model = build(ecfg.elf.feature_arch, shape[0], classes, shape[1])
    try:
        fshape = front_shape(model, shape)
    except RayddError as e:
        raise ConfigError(f"evaluate.elf.feature_arch: {e}") from None
    weights, meta_path = out / "elf_feature_model.safetensors", out / "elf_feature_model.json"
    want = {"spec": model.spec, "epochs": ecfg.elf.feature_epochs, "lr": ecfg.lr, "momentum": ecfg.momentum,
            "weight_decay": ecfg.weight_decay, "batch_size": ecfg.batch_size, "dsa": ecfg.dsa,
            "dsa_strategy": dsa_strategy, "data": fp}
    meta = read_json(meta_path) if meta_path.exists() else {}
    if not (weights.exists() and all(meta.get(k) == v for k, v in want.items())):
        import ray

        from ..raycluster import init_ray
        init_ray(ray_cfg)
        if progress:
            print(f"[evaluate] training the ELF feature model {model.spec} for {ecfg.elf.feature_epochs} epochs",
                  flush=True)
        # it runs alone, before any trial: give it the free CPUs of a node, not one trial's share
        node = max([n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")], default=0)
        cpus = max(resources.cpus, math.floor(min(node, ray.available_resources().get("CPU", 0))))
        task = ray.remote(num_cpus=cpus, num_gpus=resources.gpus, max_retries=1)(_feature_task)
        state, acc = ray.get(task.remote(ecfg.elf.feature_arch, data, dataclasses.asdict(ecfg),
                                         dsa_strategy, device, cpus, zca))
        sha = save_tensors(weights, state, metadata={"spec": model.spec})
        write_json(meta_path, {**want, "sha256": sha, "test_acc": acc})
        meta = read_json(meta_path)
    model.load_state_dict(load_tensors(weights, sha256=meta["sha256"]))
    return model.eval(), meta["sha256"], fshape


def _feature_task(spec: str, data: str, ecfg_dict: dict, dsa_strategy: str, device: str,
                  cpus: float, zca: dict[str, str] | None) -> tuple[dict[str, torch.Tensor], float]:
    from ..data import load_info
    from ..train import accuracy, set_threads
    from .protocol import train_feature_model

    set_threads(cpus)
    ecfg = _ecfg_from_dict(ecfg_dict)
    info = load_info(data)
    whiten = _whitener(zca)
    model = train_feature_model(
        spec, _train_data(info, whiten, ecfg.batch_size, seed=0), ecfg,
        image_shape=tuple(info.shape), num_classes=info.num_classes, epochs=ecfg.elf.feature_epochs,
        dsa_strategy=dsa_strategy, device=device)
    acc = accuracy(model, _test_batches(info, whiten)(), device)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, acc


def _zca(cfg: Config, run_dir: Path) -> dict[str, str] | None:
    """The run's shared ZCA (fitted once by whoever needs it first), as a path + checksum for trials."""
    if not cfg.data.zca:
        return None
    from ..teachers import ZCA_FILE, ZCA_INDEX, ensure_zca
    ensure_zca(cfg, run_dir)
    return {"path": str((Path(run_dir) / ZCA_FILE).resolve()),
            "sha256": read_json(Path(run_dir) / ZCA_INDEX)["sha256"]}


def _whitener(zca: dict[str, str] | None):
    if not zca:
        return lambda x: x
    from ..augment import ZCA
    return ZCA.from_state(load_tensors(zca["path"], sha256=zca["sha256"])).transform


def _test_batches(info: Any, whiten) -> Any:
    from ..data import batches
    return lambda: ((whiten(x), y) for x, y in batches(info, "test", TEST_BATCH))


def _train_data(info: Any, whiten, batch_size: int, seed: int) -> Any:
    """The real training split: in memory when it fits, else streamed with a new shuffle per epoch."""
    from ..data import batches, load_split
    if info.counts["train"]["total"] * math.prod(info.shape) * 4 <= IN_MEMORY_BYTES:
        x, y = load_split(info, "train")
        return whiten(x), y
    epoch = iter(range(1 << 30))
    return lambda: ((whiten(x), y) for x, y in batches(info, "train", batch_size, shuffle=True,
                                                       seed=seed * 100_003 + next(epoch)))


def _distilled_features(syn: Synset, syn_sha: str, model: torch.nn.Module, model_sha: str, out: Path) -> Path:
    path, meta_path = out / "elf_features.safetensors", out / "elf_features.json"
    want = {"synset_sha256": syn_sha, "feature_model_sha256": model_sha}
    meta = read_json(meta_path) if meta_path.exists() else {}
    if not (path.exists() and all(meta.get(k) == v for k, v in want.items())):
        sha = save_tensors(path, {"elf_features": extract_features(model, syn.images)})
        write_json(meta_path, {**want, "sha256": sha})
    return path


def _random_subset(directory: Path, info: Any, fp: str, ipc: int, seed: int, teacher: torch.nn.Module | None,
                   teacher_sha: str | None, feature_model: torch.nn.Module | None, feature_sha: str | None,
                   zca: dict[str, str] | None, progress: bool) -> None:
    """A random real subset of ``ipc`` images per class, labelled like the synset, saved as a synset."""
    from ..data import sample_per_class

    want = {"source": "random", "seed": seed, "ipc": ipc, "data": fp,
            "teacher_sha256": teacher_sha if teacher is not None else None,
            "feature_model_sha256": feature_sha if feature_model is not None else None}
    if (directory / MANIFEST).exists():
        doc = read_json(directory / MANIFEST)
        if all(doc.get(k) == v for k, v in want.items()):
            return
    if progress:
        print(f"[evaluate] sampling the random baseline: {ipc} real images per class, seed {seed}", flush=True)
    x, y = sample_per_class(info, "train", ipc, seed)
    x = _whitener(zca)(x)
    soft = feats = None
    with torch.no_grad():
        if teacher is not None:
            teacher.eval()
            soft = torch.cat([teacher(x[i:i + 256]) for i in range(0, x.shape[0], 256)])
    if feature_model is not None:
        feats = extract_features(feature_model, x)
    save_synset(directory, Synset(x.float(), y.long(), soft_labels=soft, elf_features=feats,
                                  meta={"num_classes": int(info.num_classes)}), manifest=want)


# ============================================================================ Ray Tune

def _run_tune(ctx: dict[str, Any], labels: list[str], storage: str, experiment: str, res: Resources,
              progress: bool, scheduler: Any) -> list[dict[str, Any]]:
    import ray
    from ray import tune

    total = ray.cluster_resources()
    slots = math.floor(total.get("CPU", 0) / res.cpus + 1e-9)
    if res.gpus > 0:
        slots = min(slots, math.floor(total.get("GPU", 0) / res.gpus + 1e-9))
    if slots < 1:
        raise RayddError(f"evaluate.resources ({res.cpus:g} CPU, {res.gpus:g} GPU per trial) exceed the Ray "
                         f"cluster ({total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU)")
    # Tune's new console output prints an experiment banner even at verbose=0; the classic one
    # stays silent, leaving the per-trial lines of _trial_lines.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    trainable = tune.with_resources(eval_trainable, {"cpu": res.cpus, "gpu": res.gpus})
    path = f"{storage.rstrip('/')}/{experiment}"
    if tune.Tuner.can_restore(path):
        if progress:
            print(f"[evaluate] resuming the interrupted sweep {path}", flush=True)
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(labels), "ctx": ctx},
            # reuse_actors: a trial's worker keeps torch/timm imported for the next one (seconds each)
            tune_config=tune.TuneConfig(max_concurrent_trials=min(slots, len(labels)), scheduler=scheduler,
                                        reuse_actors=True),
            run_config=tune.RunConfig(storage_path=storage, name=experiment, verbose=0,
                                      callbacks=[_trial_lines(len(labels))] if progress else [],
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    grid = tuner.fit()
    out = []
    for r in grid:
        cfg = r.config or {}
        trial = dict(cfg.get("ctx", {}).get("trials", {}).get(cfg.get("trial"), {}))
        if not trial:
            continue
        m = r.metrics or {}
        rec = {**trial, "trial_id": m.get("trial_id"), "started_at": m.get("started_at")}
        if r.error is None and "test_acc" in m:
            rec.update(status="ok", **{k: m[k] for k in ("test_acc", "train_loss_first", "train_loss_last",
                                                          "epochs", "seconds", "teacher_acc", "elf_adapted")
                                       if k in m})
        else:
            rec.update(status="error" if r.error is not None else "unfinished",
                       error=_first_line(r.error) if r.error is not None else "")
        out.append(rec)
    return out


def _trial_lines(total: int) -> Any:
    """A Tune callback printing one line per finished or failed trial with count and ETA
    (Tune's own tables are too loud for a terminal)."""
    from ray import tune

    class TrialLines(tune.Callback):
        def __init__(self) -> None:
            self.done, self.t0 = 0, time.time()

        def _line(self, trial: Any, what: str) -> None:
            self.done += 1
            elapsed = time.time() - self.t0
            eta = elapsed / self.done * (total - self.done)
            print(f"[evaluate] {self.done}/{total} trials ({elapsed:.0f}s, ETA {eta:.0f}s) · "
                  f"{trial.config.get('trial')}: {what}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            acc = r.get("test_acc")
            self._line(trial, f"{acc:.2%} in {r.get('seconds', 0):.0f}s" if acc is not None else "finished")

        def on_trial_error(self, iteration, trials, trial, **info):
            path = Path(trial.error_file) if trial.error_file else None
            text = path.read_text() if path is not None and path.exists() else "error"
            self._line(trial, f"FAILED: {_first_line(Exception(text))}")

    return TrialLines()


def _first_line(e: BaseException) -> str:
    for line in reversed(str(e).strip().splitlines()):
        if line.strip() and not line.startswith(" "):
            return line.strip()[:300]
    return type(e).__name__


def _ecfg_from_dict(d: dict[str, Any]) -> EvalConfig:
    return section(EvalConfig, d, "evaluate")


def eval_trainable(config: dict[str, Any]) -> None:
    """The Tune trainable: one trial, reporting every epoch and the final test accuracy."""
    from ray import tune

    from ..data import load_info
    from ..train import set_threads

    started = time.time()
    ctx, label = config["ctx"], config["trial"]
    t = ctx["trials"][label]
    set_threads(ctx["cpus"])
    hook = ctx.get("fail")
    if hook:
        needle, _, marker = hook.partition("@")
        if needle in label and not Path(marker).exists():
            raise RuntimeError(f"test hook RAYDD_TEST_FAIL: trial {label} fails until {marker} exists")
    ecfg = _ecfg_from_dict(ctx["ecfg"])
    info = load_info(ctx["data"])
    src = ctx["sources"][t["source"]]
    whiten = _whitener(ctx.get("zca"))
    epochs = None
    if t["source"] == "full":
        train: Any = _train_data(info, whiten, ecfg.batch_size, int(t["seed"]))
        if isinstance(train, tuple):
            train = Synset(*train)
        epochs = ctx.get("full_epochs")
    else:
        train = load_synset(src["synset"].format(seed=t["seed"]))
        if src.get("features"):
            train.elf_features = load_tensors(src["features"])["elf_features"]
    base = {"started_at": started}
    total = int(epochs or ecfg.epochs)
    every = max(1, total // REPORTS_PER_PHASE)

    def on_epoch(phase: str, ep: int, loss: float) -> None:
        if ep == 1 or ep % every == 0 or ep == total:
            tune.report({**base, "phase": phase, "epoch": ep, "train_loss": loss})

    result = evaluate_once(t["arch"], t["mode"], int(t["seed"]), train,
                           _test_batches(info, whiten), ecfg,
                           image_shape=tuple(ctx["shape"]), num_classes=int(ctx["num_classes"]),
                           lr=float(t["lr"]), epochs=epochs, dsa_strategy=ctx["dsa_strategy"],
                           device=ctx["device"], on_epoch=on_epoch)
    tune.report({**base, "phase": "done", **result})
