"""Evaluation sweeps on Ray Tune: architecture × seed × (source, mode) [× lr], then reports.

Every trial is one plain-torch :func:`~raydd.evaluate.protocol.evaluate_once` inside a Tune
function trainable that loads its data from disk itself (paths travel in the config, never
tensors); what it trains on is prepared by :mod:`raydd.evaluate.sources`.

Resuming: a trial is identified by (source, mode, arch, seed, lr) plus a hash of every setting
that changes its result. The driver appends each trial to ``trials.jsonl`` (fsynced) the moment it
finishes, so whatever kills the driver, no finished trial runs twice: trials found there or in
``results.json`` are reused (those of other grids are kept under ``other_trials``, outside the
table), and only the rest form this invocation's Tune experiment. A changed grid only runs the new
trials. (Trials keep no checkpoints, so restoring a Tune experiment would resume nothing more.)
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, EvalConfig, Resources, section
from ..errors import ConfigError, RayddError
from ..io import load_tensors, read_json
from ..synset import Synset, load_synset
from . import report
from .baselines import real_test, real_train, run_zca, whitener
from .journal import append_journal, read_journal
from .protocol import evaluate_once
from .sources import digest, prepare_sources

TRIALS_FILE = "trials.jsonl"   # the journal of finished trials, beside results.json
REPORTS_PER_PHASE = 50      # intermediate Tune results per training phase (progress, schedulers)
# EvalConfig fields that choose *which* trials run or *where*, not what a trial computes.
NOT_SETTINGS = {"archs", "modes", "mode_archs", "seeds", "lr", "arch_lr", "lr_search", "baselines",
                "storage_path", "resources", "ars"}
# Settings that only one mode reads (its name is their prefix), so changing them re-runs only that mode.
MODE_SETTINGS = {"soft_loss", "soft_temperature", "kd", "elf"}


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


def execute(*, synset: str | Path | Synset, data: str, ecfg: EvalConfig, seeds: list[int],
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
    storage = _storage(storage_path, out_dir)  # out_dir itself is made by the first file written there

    zca = run_zca(*zca_of) if zca_of is not None else None
    prep = prepare_sources(synset, data, ecfg, seeds, baselines, teachers_dir, dsa_strategy, out_dir, resources,
                    trial_device, progress, zca, ray_cfg)
    settings = {k: v for k, v in dataclasses.asdict(ecfg).items() if k not in NOT_SETTINGS | MODE_SETTINGS}
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
            # ARS compares synset and random subset with and without DSA: the flipped trials carry
            # ``dsa`` (in their key too), the others run under evaluate.dsa and keep their keys
            flips = [False, True] if ecfg.ars and source != "full" else [False]
            for seed, lr, flip in itertools.product(seeds, [own_lr] if own_lr is not None else lrs, flips):
                label = (f"{source}/{mode} {arch} s{seed}" + (f" lr{lr:g}" if multi_lr else "")
                         + ((" noaug" if ecfg.dsa else " aug") if flip else ""))
                key = digest({"label": label, "lr": lr, "settings": settings,
                             "mode": {k: getattr(ecfg, k) for k in MODE_SETTINGS if k.startswith(mode)},
                             "epochs": full_epochs if source == "full" else None,
                             "source": prep.sources[source]["fingerprint"],
                             "elf": prep.sources[source].get("elf") if mode == "elf" else None,
                             **({"dsa": not ecfg.dsa} if flip else {})})[:16]
                planned[label] = {"label": label, "source": source, "mode": mode, "arch": arch,
                                  "seed": seed, "lr": lr, "key": key, **({"dsa": not ecfg.dsa} if flip else {})}
    journal = out_dir / TRIALS_FILE
    previous = _reusable(out_dir / "results.json", journal)
    pending = [t for t in planned.values() if t["key"] not in previous]
    reused = [dict(previous[t["key"]], label=t["label"]) for t in planned.values() if t["key"] in previous]

    experiment = None
    ran: list[dict[str, Any]] = []
    if pending:
        experiment = _experiment(name, pending, storage)
        ctx = {"data": prep.info.root, "ecfg": dataclasses.asdict(ecfg), "dsa_strategy": dsa_strategy,
               "device": trial_device, "cpus": resources.cpus, "shape": list(prep.info.shape),
               "num_classes": prep.info.num_classes, "sources": prep.sources,
               "full_epochs": full_epochs, "trials": {t["label"]: t for t in pending}, "zca": zca}
        if progress:
            print(f"[evaluate] {len(pending)} trials to run ({len(reused)} reused) → {storage}/{experiment}",
                  flush=True)
        from ..raycluster import init_ray
        init_ray(ray_cfg)
        ran = _run_tune(ctx, [t["label"] for t in pending], storage, experiment, resources, progress,
                        scheduler, journal)
        returned = {r["label"] for r in ran}
        # trials Tune never started (an interrupted sweep) count as unfinished, so counts match the plan
        ran += [dict(t, status="unfinished", error="") for t in pending if t["label"] not in returned]
        for r in ran:
            r["experiment"] = experiment

    order = {label: i for i, label in enumerate(planned)}
    trials = sorted(reused + ran, key=lambda t: order.get(t["label"], len(order)))
    failed = [t for t in trials if t["status"] != "ok"]
    # finished trials of other grids stay on file (not in the table), so narrowing a sweep loses nothing
    planned_keys = {t["key"] for t in planned.values()}
    meta = {"other_trials": [t for k, t in previous.items() if k not in planned_keys],
            "complete": not failed,
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


def _check_settings(ecfg: EvalConfig) -> None:
    """Settings given from Python skip the YAML loader, so validate them here too."""
    ecfg.validate("evaluate")


def _trial_device(device: str, res: Resources) -> str:
    if device == "cuda" and res.gpus <= 0:
        raise ConfigError("evaluate.resources.gpus: 0 with device cuda; give each trial a (fractional) GPU")
    if device == "cpu" and res.gpus > 0:
        raise ConfigError(f"evaluate.resources.gpus: {res.gpus} with device cpu; set gpus to 0 or device auto")
    return "cuda" if res.gpus > 0 else "cpu"


def _reusable(results: Path, journal: Path) -> dict[str, dict[str, Any]]:
    """Finished trials of earlier sweeps by key: the last report's, then any the journal adds (a
    driver killed before writing its report)."""
    records: list[dict[str, Any]] = []
    if results.exists():
        try:
            doc = read_json(results)
            records += doc.get("trials", []) + doc.get("other_trials", [])
        except (RayddError, AttributeError, TypeError):  # unreadable: the journal still holds the trials
            pass
    records += read_journal(journal)
    out: dict[str, dict[str, Any]] = {}
    for t in records:
        if isinstance(t, dict) and t.get("status") == "ok" and t.get("key"):
            out.setdefault(t["key"], t)
    return out


def _experiment(name: str, pending: list[dict[str, Any]], storage: str) -> str:
    """Named after its trials; a fresh name when an earlier (killed) invocation left that one."""
    from ray import tune

    base = f"{name}-{digest(sorted(t['key'] for t in pending))[:10]}"
    taken = lambda e: (Path(storage, e).exists() if "://" not in storage  # noqa: E731
                       else tune.Tuner.can_restore(f"{storage.rstrip('/')}/{e}"))
    n = 1
    while taken(exp := base if n == 1 else f"{base}-{n}"):
        n += 1
    return exp


def _storage(storage_path: str | None, out: Path) -> str:
    """An absolute local path (one given is created and probed for writing) or a URI left to Tune's
    filesystem. The default, OUT/tune, is left to Tune to create: a refusal must not leave it behind."""
    if storage_path and "://" in storage_path:
        return storage_path
    if not storage_path:
        return str((out / "tune").resolve())
    p = Path(storage_path).expanduser().resolve()
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise RayddError(f"evaluate.storage_path {str(p)!r} cannot be written ({e.strerror or e}); "
                         f"expected a writable directory or a URI such as s3://bucket/path") from None
    return str(p)


def _run_tune(ctx: dict[str, Any], labels: list[str], storage: str, experiment: str, res: Resources,
              progress: bool, scheduler: Any, journal: Path) -> list[dict[str, Any]]:
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
    callbacks = [_journal(journal, ctx["trials"], experiment)] + ([_trial_lines(len(labels))] if progress else [])
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(labels), "ctx": ctx},
        # reuse_actors: a trial's worker keeps torch/timm imported for the next one (seconds each)
        tune_config=tune.TuneConfig(max_concurrent_trials=min(slots, len(labels)), scheduler=scheduler,
                                    reuse_actors=True),
        run_config=tune.RunConfig(storage_path=storage, name=experiment, verbose=0, callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=1),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    grid = tuner.fit()
    out = []
    for r in grid:
        cfg = r.config or {}
        trial = cfg.get("ctx", {}).get("trials", {}).get(cfg.get("trial"), {})
        if trial:
            out.append(_record(trial, r.metrics or {}, r.error))
    return out


RESULT_KEYS = ("test_acc", "train_loss_first", "train_loss_last", "epochs", "seconds", "teacher_acc", "elf_adapted")


def _record(trial: dict[str, Any], m: dict[str, Any], error: BaseException | None) -> dict[str, Any]:
    """A trial's row: its plan, its Tune id and start time, and its result or why it has none."""
    rec = {**trial, "trial_id": m.get("trial_id"), "started_at": m.get("started_at")}
    if error is None and "test_acc" in m:
        rec.update(status="ok", **{k: m[k] for k in RESULT_KEYS if k in m})
    else:
        rec.update(status="error" if error is not None else "unfinished",
                   error=_first_line(error) if error is not None else "")
    return rec


def _journal(path: Path, plan: dict[str, dict[str, Any]], experiment: str) -> Any:
    """A Tune callback appending each trial to ``path`` as soon as its final result reaches the driver."""
    from ray import tune

    class Journal(tune.Callback):
        def __init__(self) -> None:
            self.written: set[str] = set()

        def _write(self, trial: Any, result: dict[str, Any] | None) -> None:
            label = trial.config.get("trial")
            if label in self.written or label not in plan or "test_acc" not in (result or {}):
                return
            append_journal(path, dict(_record(plan[label], result, None), experiment=experiment))
            self.written.add(label)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("phase") == "done":
                self._write(trial, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._write(trial, trial.last_result)

    return Journal()


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


def eval_trainable(config: dict[str, Any]) -> None:
    """The Tune trainable: one trial, reporting every epoch and the final test accuracy."""
    from ray import tune

    from ..data import load_info
    from ..train import set_threads

    started = time.time()
    ctx, label = config["ctx"], config["trial"]
    t = ctx["trials"][label]
    set_threads(ctx["cpus"])
    ecfg = section(EvalConfig, ctx["ecfg"], "evaluate")
    if t.get("dsa") is not None:
        ecfg = dataclasses.replace(ecfg, dsa=bool(t["dsa"]))
    info = load_info(ctx["data"])
    src = ctx["sources"][t["source"]]
    whiten = whitener(ctx.get("zca"))
    epochs = None
    if t["source"] == "full":
        train: Any = real_train(info, whiten, ecfg.batch_size, int(t["seed"]))
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
                           real_test(info, whiten), ecfg,
                           image_shape=tuple(ctx["shape"]), num_classes=int(ctx["num_classes"]),
                           lr=float(t["lr"]), epochs=epochs, dsa_strategy=ctx["dsa_strategy"],
                           device=ctx["device"], on_epoch=on_epoch)
    tune.report({**base, "phase": "done", **result})
