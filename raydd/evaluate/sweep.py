"""Evaluation sweeps on Ray Tune: architecture × seed × (source, mode) [× lr × searched values], then reports.

Every trial is one plain-torch :func:`~raydd.evaluate.protocol.evaluate_once` inside a Tune
function trainable that loads its data from disk itself (paths travel in the config, never
tensors); what it trains on is prepared by :mod:`raydd.evaluate.sources`.

Resuming: a trial is identified by (source, mode, arch, seed, lr, searched values) plus a hash of
every setting that changes its result (:mod:`raydd.evaluate.tune_space` draws searched values
reproducibly, so they are known before Tune starts). The driver appends each trial to ``trials.jsonl`` (fsynced) the moment it
finishes, so whatever kills the driver, no finished trial runs twice: trials found there or in
``results.json`` are reused (those of other grids are kept under ``other_trials``, outside the
table), and only the rest form this invocation's Tune experiment. A changed grid only runs the new
trials. (Trials keep no checkpoints, so restoring a Tune experiment would resume nothing more.)
"""
from __future__ import annotations

import dataclasses
import itertools
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
from .holdout import val_batches
from .journal import read_journal
from .protocol import evaluate_once
from .sources import digest, prepare_sources
from .tune_run import check_callbacks, dataframe, identity, run_experiments, scoped_environ
from .tune_space import NOT_SETTINGS, Space, apply_params, describe, params_label, variants

TRIALS_FILE = "trials.jsonl"   # the journal of finished trials, beside results.json
REPORTS = 10                # intermediate Tune results of a trial unless evaluate.report_every says otherwise
# Settings that only one mode reads (its name is their prefix), so changing them re-runs only that mode.
MODE_SETTINGS = {"soft_loss", "soft_temperature", "hard_cutmix", "kd", "elf"}


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
    result_grid: Any = None     # Tune's ResultGrid of this invocation (a list: one per bracket), None: all reused

    def dataframe(self) -> Any:
        """The trials as a pandas DataFrame: plan, status, val/test accuracy, searched values (``config/KEY``)."""
        return dataframe(self.trials)

    def __repr__(self) -> str:
        return f"SweepResult({len(self.trials)} trials, {self.md})\n{self.table}"


def execute(*, synset: str | Path | Synset, data: str, ecfg: EvalConfig, seeds: list[int],
             lrs: list[float], baselines: list[str], resources: Resources, teachers_dir: Path | None,
             dsa_strategy: str, device: str, out_dir: Path, storage_path: str | None, name: str,
             progress: bool, ray_cfg: Any, title: str, config: dict | None,
             full_epochs: int | None = None, scheduler: Any = None,
             zca_of: tuple[Config, Path] | None = None, space: Space | None = None, num_samples: int = 1,
             search_alg: Any = None, callbacks: Any = None, val_seed: int = 0) -> SweepResult:
    """The sweep; ``os.environ`` is the caller's again when it returns (or raises)."""
    with scoped_environ():
        return _execute(synset=synset, data=data, ecfg=ecfg, seeds=seeds, lrs=lrs, baselines=baselines,
                        resources=resources, teachers_dir=teachers_dir, dsa_strategy=dsa_strategy, device=device,
                        out_dir=out_dir, storage_path=storage_path, name=name, progress=progress,
                        ray_cfg=ray_cfg, title=title, config=config, full_epochs=full_epochs, zca_of=zca_of,
                        space=space or Space(lrs=list(lrs)), num_samples=num_samples, val_seed=val_seed,
                        tune_opts={"scheduler": scheduler, "search_alg": search_alg, "num_samples": num_samples,
                                   "callbacks": check_callbacks(callbacks) if callbacks else []})


def _execute(*, synset, data, ecfg, seeds, lrs, baselines, resources, teachers_dir, dsa_strategy, device, out_dir,
             storage_path, name, progress, ray_cfg, title, config, full_epochs, zca_of, space, num_samples,
             val_seed, tune_opts) -> SweepResult:
    t0 = time.time()
    _check_settings(ecfg)
    for b in baselines:
        if b not in ("random", "full"):
            raise ConfigError(f"evaluate.baselines: {b!r} is invalid; expected random and/or full")
    compared = tune_opts["scheduler"] is not None or tune_opts["search_alg"] is not None
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ConfigError(f"num_samples: {num_samples!r} is invalid; expected an integer >= 1")
    if num_samples > 1 and not space.domains:
        raise ConfigError(f"num_samples: {num_samples} would repeat identical trials; expected 1 without a "
                          f"domain (tune.uniform, tune.choice, ...) in param_space (seeds repeat trials)")
    if compared and ecfg.val_size == 0:
        raise ConfigError("evaluate.val_size: 0 with a scheduler or search_alg; they compare trials on the "
                          "validation accuracy, so expected null or a number of held-out images")
    if compared and ecfg.stack > 1:
        raise ConfigError(f"evaluate.stack: {ecfg.stack} with a scheduler or search_alg; they compare each "
                          f"trial's own intermediate reports, so expected 1")
    search = tune_opts["search_alg"] is not None
    draws = [{}] if search else variants(space, num_samples, val_seed)
    for v in draws:
        apply_params(ecfg, v)  # a drawn value the settings refuse is refused now, before any compute
    trial_device = _trial_device(device, resources)
    out_dir = Path(out_dir).resolve()
    storage = _storage(storage_path, out_dir)  # out_dir itself is made by the first file written there

    zca = run_zca(*zca_of) if zca_of is not None else None
    prep = prepare_sources(synset, data, ecfg, seeds, baselines, teachers_dir, dsa_strategy, out_dir, resources,
                    trial_device, progress, zca, ray_cfg, needs_val=compared or space.searched, val_seed=val_seed)
    settings = {k: v for k, v in dataclasses.asdict(ecfg).items() if k not in NOT_SETTINGS | MODE_SETTINGS}
    settings["dsa_strategy"] = dsa_strategy
    if settings.get("precision") == "fp32":   # the default keeps the trial keys of before the setting existed
        del settings["precision"]

    multi_lr = len(lrs) > 1
    if multi_lr and ecfg.arch_lr:
        raise ConfigError(f"evaluate.arch_lr: {ecfg.arch_lr} cannot be combined with an lr search "
                          f"over {lrs}; expected one of the two")
    own = {arch: lr for arch in ecfg.archs if (lr := ecfg.lr_of(arch)) is not None}
    if own:
        prep.notes.append(f"lr {lrs[0]:g}, except " + ", ".join(f"{a} {lr:g}" for a, lr in own.items())
                          + " (evaluate.arch_lr)")
    # extra identity of every trial beside a validation split / in a search (absent: the keys of before)
    extra = {**({"val": prep.val["sha256"]} if prep.val else {}),
             **({"study": describe(space.tune_params()), "search_alg": type(tune_opts["search_alg"]).__name__}
                if search else {})}
    planned: dict[str, dict[str, Any]] = {}
    for arch in ecfg.archs:
        own_lr = own.get(arch)
        for source, mode in prep.runs:
            if (arch, mode) in prep.skip or not ecfg.mode_archs.allows(mode, arch):
                continue
            # ARS compares synset and random subset with and without DSA: the flipped trials carry
            # ``dsa`` (in their key too), the others run under evaluate.dsa and keep their keys
            flips = [False, True] if ecfg.ars and source != "full" else [False]
            for seed, lr, flip, params in itertools.product(seeds, [own_lr] if own_lr is not None else lrs, flips,
                                                            draws):
                # values another mode's settings take do not split this mode's trials (same label, one trial)
                params = {k: v for k, v in params.items()
                          if k.split(".")[0] not in MODE_SETTINGS or k.startswith(mode)}
                label = (f"{source}/{mode} {arch} s{seed}" + (f" lr{lr:g}" if multi_lr else "")
                         + ((" noaug" if ecfg.dsa else " aug") if flip else "") + params_label(params))
                # a setting left at null is left out: the keys of before it existed
                mode_settings = {k: v for k in MODE_SETTINGS
                                 if k.startswith(mode) and (v := getattr(ecfg, k)) is not None}
                key = digest({"label": label, "lr": lr, "settings": settings, "mode": mode_settings,
                             "epochs": full_epochs if source == "full" else None,
                             "source": prep.sources[source]["fingerprint"],
                             "elf": prep.sources[source].get("elf") if mode == "elf" else None,
                             **({"dsa": not ecfg.dsa} if flip else {}), **extra,
                             **({"params": params} if params else {})})[:16]
                planned[label] = {"label": label, "source": source, "mode": mode, "arch": arch, "seed": seed,
                                  "lr": float(params.get("lr", lr)), "key": key,
                                  **({"dsa": not ecfg.dsa} if flip else {}), **({"params": params} if params else {}),
                                  **({"study": True} if search else {})}
    journal = out_dir / TRIALS_FILE
    previous = _reusable(out_dir / "results.json", journal, stopped=tune_opts["scheduler"] is not None)
    if search:  # a study is pending while it holds fewer than num_samples trials
        for t in planned.values():
            t["done"] = sum(r.get("study") == t["key"] for r in previous.values())
        reused = [r for r in previous.values() if r.get("study") in {t["key"] for t in planned.values()}]
        pending = [t for t in planned.values() if t["done"] < num_samples]
    else:
        pending = [t for t in planned.values() if t["key"] not in previous]
        reused = [dict(previous[t["key"]], label=t["label"]) for t in planned.values() if t["key"] in previous]

    experiment, grids = None, []
    ran: list[dict[str, Any]] = []
    units = _packs(pending, ecfg, prep) if ecfg.stack > 1 else pending
    if pending:
        experiment = _experiment(name, pending, storage)
        ctx = {"data": prep.info.root, "ecfg": dataclasses.asdict(ecfg), "dsa_strategy": dsa_strategy,
               "device": trial_device, "cpus": resources.cpus, "shape": list(prep.info.shape),
               "num_classes": prep.info.num_classes, "sources": prep.sources, "val": prep.val and prep.val["path"],
               "full_epochs": full_epochs, "trials": {t["label"]: t for t in pending + units}, "zca": zca,
               "holdout": prep.val and {"positions": prep.val["positions"], "samples": prep.val["samples"]}}
        if progress:
            packed = sum(len(u["members"]) for u in units if u.get("members"))
            print(f"[evaluate] {len(pending)} {'studies' if search else 'trials'} to run ({len(reused)} reused) "
                  + (f"in {len(units)} runs, {packed} of them stacked up to {ecfg.stack} at a time " if packed else "")
                  + f"→ {storage}/{experiment}", flush=True)
        from ..raycluster import init_ray
        init_ray(ray_cfg, progress=progress)
        ran, grids = run_experiments(eval_trainable, ctx, units, storage, experiment, resources, progress,
                                     {**tune_opts, "space": space.tune_params()}, journal, out_dir)
        returned = {r["label"] for r in ran}
        # trials Tune never started (an interrupted sweep) count as unfinished, so counts match the plan
        ran += [dict({k: v for k, v in t.items() if k not in ("study", "done")}, status="unfinished", error="",
                     experiment=experiment)
                for t in pending if t["label"] not in returned and not search]

    order = {label: i for i, label in enumerate(planned)}
    trials = sorted(reused + ran, key=lambda t: order.get(t["label"], len(order)))
    failed = [t for t in trials if t["status"] not in ("ok", "stopped")]
    stopped = [t for t in trials if t["status"] == "stopped"]
    notes = list(prep.notes) + ([f"{len(stopped)} trials stopped early by the scheduler (last val accuracy): "
                                 + ", ".join(f"{t['label']} at epoch {t.get('stopped_at')} "
                                             f"({100 * t.get('val_acc', 0):.1f} %)" for t in stopped)]
                                if stopped else [])
    # finished trials of other grids stay on file (not in the table), so narrowing a sweep loses nothing
    kept = {t["key"] for t in trials}
    meta = {"other_trials": [t for k, t in previous.items() if k not in kept],
            "complete": not failed,
            "synset": str(prep.synset_dir), "synset_sha256": prep.synset_sha, "ipc": prep.ipc,
            "seeds": seeds, "lrs": lrs, "storage_path": storage, "experiment": experiment,
            **({"val": {k: prep.val[k] for k in ("path", "sha256")}} if prep.val else {})}
    written = report.write_reports(out_dir, trials, archs=list(ecfg.archs), columns=prep.columns,
                                   config=config or {"evaluate": dataclasses.asdict(ecfg), "data": data},
                                   seconds=time.time() - t0, notes=notes, lr_search=multi_lr or "lr" in space.domains,
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
                       seconds=time.time() - t0, notes=notes,
                       result_grid=None if not grids else grids[0] if len(grids) == 1 else grids)


def _packs(pending: list[dict[str, Any]], ecfg: EvalConfig, prep: Any) -> list[dict[str, Any]]:
    """The runs of ``pending`` under ``evaluate.stack``: trials of one (mode, architecture, lr, DSA
    flip, searched values, set size) in packs of up to ``stack`` trained together
    (:mod:`raydd.evaluate.stacked`), the rest alone. A pack's result is journalled per member."""
    from .stacked import stack_refusal, stackable

    refused: dict[str, str | None] = {}
    bins: dict[str, list[dict[str, Any]]] = {}
    units = []
    for t in pending:
        if t["source"] != "full" and stackable(t["mode"], ecfg) and t["arch"] not in refused:
            refused[t["arch"]] = stack_refusal(t["arch"], tuple(prep.info.shape), int(prep.info.num_classes))
        if t["source"] == "full" or not stackable(t["mode"], ecfg) or refused[t["arch"]]:
            units.append(t)
            continue
        size = prep.sources[t["source"]]["images"]
        bins.setdefault(digest([t["mode"], t["arch"], t["lr"], t.get("dsa"), t.get("params"), size]), []).append(t)
    for trials in bins.values():
        for i in range(0, len(trials), ecfg.stack):
            chunk = trials[i:i + ecfg.stack]
            if len(chunk) == 1:
                units += chunk
                continue
            first = chunk[0]
            units.append({**{k: first[k] for k in ("mode", "arch", "lr", "dsa", "params") if k in first},
                          "label": f"stack of {len(chunk)}: " + ", ".join(t["label"] for t in chunk),
                          "source": "+".join(dict.fromkeys(t["source"] for t in chunk)), "seed": first["seed"],
                          "key": digest(sorted(t["key"] for t in chunk))[:16], "members": [t["label"] for t in chunk]})
    alone = sorted(a for a, why in refused.items() if why)
    if alone:
        prep.notes.append("trained alone (not stackable): " + "; ".join(f"{a}: {refused[a]}" for a in alone))
    return units


def _check_settings(ecfg: EvalConfig) -> None:
    """Settings given from Python skip the YAML loader, so validate them here too."""
    ecfg.validate("evaluate")


def _trial_device(device: str, res: Resources) -> str:
    if device == "cuda" and res.gpus <= 0:
        raise ConfigError("evaluate.resources.gpus: 0 with device cuda; give each trial a (fractional) GPU")
    if device == "cpu" and res.gpus > 0:
        raise ConfigError(f"evaluate.resources.gpus: {res.gpus} with device cpu; set gpus to 0 or device auto")
    return "cuda" if res.gpus > 0 else "cpu"


def _reusable(results: Path, journal: Path, stopped: bool = False) -> dict[str, dict[str, Any]]:
    """Finished trials of earlier sweeps by key: the last report's, then any the journal adds (a
    driver killed before writing its report); with ``stopped``, trials a scheduler stopped too
    (a finished run of the same trial wins)."""
    records: list[dict[str, Any]] = []
    if results.exists():
        try:
            doc = read_json(results)
            records += doc.get("trials", []) + doc.get("other_trials", [])
        except (RayddError, AttributeError, TypeError):  # unreadable: the journal still holds the trials
            pass
    records += read_journal(journal)
    out: dict[str, dict[str, Any]] = {}
    for status in ("ok", "stopped") if stopped else ("ok",):
        for t in records:
            if isinstance(t, dict) and t.get("status") == status and t.get("key"):
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


def eval_trainable(config: dict[str, Any]) -> None:
    """The Tune trainable: one trial, reporting every ``report_every`` epochs (with the validation
    accuracy beside a validation split) and, folded into its last report, the test accuracy —
    so a scheduler's last decision never comes before the result."""
    from ray import tune

    from ..data import load_info
    from ..train import set_threads

    started = time.time()
    ctx = config["ctx"]
    t = identity(ctx["trials"], config)
    set_threads(ctx["cpus"])
    ecfg = apply_params(section(EvalConfig, ctx["ecfg"], "evaluate"), t.get("params") or {})
    if t.get("dsa") is not None:
        ecfg = dataclasses.replace(ecfg, dsa=bool(t["dsa"]))
    info = load_info(ctx["data"])
    whiten = whitener(ctx.get("zca"))
    val = val_batches(ctx["val"], whiten) if ctx.get("val") else None
    base = {"started_at": started, "total_epochs": int(ecfg.epochs)}   # the driver's "epoch 40/100" lines
    if t.get("members"):
        return _stacked_trial(ctx, t, ecfg, info, base, val)
    src = ctx["sources"][t["source"]]
    epochs = None
    if t["source"] == "full":
        train: Any = real_train(info, whiten, ecfg.batch_size, int(t["seed"]), ctx.get("holdout"))
        if isinstance(train, tuple):
            train = Synset(*train)
        epochs = ctx.get("full_epochs")
    else:
        train = load_synset(src["synset"].format(seed=t["seed"]))
        if src.get("features"):
            train.elf_features = load_tensors(src["features"])["elf_features"]
    total = int(epochs or ecfg.epochs)
    base["total_epochs"] = total
    every = _report_every(ecfg, total)

    def on_epoch(phase: str, ep: int, loss: float, val_acc: Any = None) -> None:
        # beside a validation split only the evaluated net reports: every result holds the metric
        if ep % every == 0 and not (phase == "train" and ep == total) and (val is None or phase == "train"):
            tune.report({**base, "phase": phase, "epoch": ep, "train_loss": loss,
                         **({"val_acc": val_acc()} if val_acc is not None else {})})

    result = evaluate_once(t["arch"], t["mode"], int(t["seed"]), train,
                           real_test(info, ctx.get("zca")), ecfg,
                           image_shape=tuple(ctx["shape"]), num_classes=int(ctx["num_classes"]),
                           lr=float(t["lr"]), epochs=epochs, dsa_strategy=ctx["dsa_strategy"],
                           device=ctx["device"], on_epoch=on_epoch, val_batches=(lambda: val) if val else None)
    tune.report({**base, "phase": "done", "epoch": total, "train_loss": result["train_loss_last"], **result})


def _report_every(ecfg: EvalConfig, total: int) -> int:
    return ecfg.report_every or max(1, round(total / REPORTS))


def _stacked_trial(ctx: dict[str, Any], pack: dict[str, Any], ecfg: EvalConfig, info: Any,
                   base: dict[str, Any], val: Any) -> None:
    """A pack's run: its members trained as one wide net; the last report holds each member's result
    under ``members`` (the driver journals them one by one) and their mean beside it."""
    from ray import tune

    from .stacked import evaluate_stacked

    members = [ctx["trials"][label] for label in pack["members"]]
    every = _report_every(ecfg, int(ecfg.epochs))
    trains = [load_synset(ctx["sources"][m["source"]]["synset"].format(seed=m["seed"])) for m in members]

    def on_epoch(ep: int, losses: list[float]) -> None:
        if ep % every == 0 and ep != int(ecfg.epochs):
            tune.report({**base, "phase": "train", "epoch": ep, "train_loss": sum(losses) / len(losses)})

    results = evaluate_stacked(pack["arch"], pack["mode"], [int(m["seed"]) for m in members], trains,
                               real_test(info, ctx.get("zca")), ecfg, image_shape=tuple(ctx["shape"]),
                               num_classes=int(ctx["num_classes"]), lr=float(pack["lr"]),
                               dsa_strategy=ctx["dsa_strategy"], device=ctx["device"], on_epoch=on_epoch,
                               val_batches=(lambda: val) if val else None)
    mean = lambda k: sum(r[k] for r in results) / len(results)  # noqa: E731
    tune.report({**base, "phase": "done", "epoch": int(ecfg.epochs), "train_loss": mean("train_loss_last"),
                 "test_acc": mean("test_acc"), "seconds": sum(r["seconds"] for r in results),
                 "members": {m["label"]: r for m, r in zip(members, results)}})
