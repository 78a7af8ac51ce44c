"""The Tune side of a sweep: experiments, the driver's callbacks (journal, curves, progress lines)
and the records they make of each trial.

Brackets. A scheduler or searcher compares trials, and only trials of one (source, mode,
architecture) bracket are comparable: a ResNet's validation accuracy at epoch 30 says nothing
about whether an MLP's trial should stop. So with a ``scheduler`` or ``search_alg`` every bracket
(DSA-flipped ARS trials form their own) runs as its own Tune experiment with its own fresh copy of
the scheduler, one after another, each filling the cluster with its trials; without either, all
trials form one experiment as before. A ``search_alg`` optimises one training configuration, so
its unit is a *study* — one bracket at one seed — of ``num_samples`` trials whose values it
chooses; a rerun counts the study's finished trials and asks the searcher only for the rest (a
fresh searcher: earlier points are not replayed into it). All experiments of one invocation live
under ``STORAGE/NAME-HASH/`` (the invocation's ``experiment``), one subdirectory each.

Records. A trial that reported its final result is ``ok`` (val and test accuracy); one a scheduler
stopped is ``stopped`` with its last validation accuracy and epoch; both are journalled the moment
the driver sees them and never run again (a stopped trial is reused only by sweeps that have a
scheduler: without one it runs to the end). Each trial's reports go to ``OUT/curves/KEY.csv``.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator

from ..config import Resources
from ..errors import ConfigError, RayddError
from ..io import write_text
from .journal import append_journal
from .sources import digest
from .tune_space import params_label, plain

RESULT_KEYS = ("test_acc", "val_acc", "train_loss_first", "train_loss_last", "epochs", "seconds", "teacher_acc",
               "elf_adapted")
CURVE_FIELDS = ("training_iteration", "phase", "epoch", "train_loss", "val_acc", "test_acc", "time_total_s")
METRIC, METRIC_MODE = "val_acc", "max"   # what schedulers and searchers compare unless told otherwise


@contextlib.contextmanager
def scoped_environ() -> Iterator[None]:
    """Run the body, then give ``os.environ`` back exactly as it was: raydd and Ray set variables
    for the driver (usage stats off, Tune's classic output); the caller's process keeps none of them."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for k in set(os.environ) - set(saved):
            del os.environ[k]
        for k, v in saved.items():
            if os.environ.get(k) != v:
                os.environ[k] = v


def identity(plan: dict[str, dict[str, Any]], config: dict[str, Any]) -> dict[str, Any] | None:
    """A trial's plan entry; a study's trial gets its label, key and lr from the values chosen for it."""
    t = plan.get(config.get("trial"))
    if t is None or not t.get("study"):
        return t
    params = {k: plain(v) for k, v in (config.get("params") or {}).items()}
    return {**{k: v for k, v in t.items() if k not in ("study", "done")}, "label": t["label"] + params_label(params),
            "key": digest([t["key"], params])[:16], "params": params, "study": t["key"],
            "lr": float(params.get("lr", t["lr"]))}


def record(trial: dict[str, Any], m: dict[str, Any], error: BaseException | None) -> dict[str, Any]:
    """A trial's row: its plan, its Tune id and start time, and its result or why it has none."""
    rec = {**trial, "trial_id": m.get("trial_id"), "started_at": m.get("started_at")}
    if error is None and "test_acc" in m:
        rec.update(status="ok", **{k: m[k] for k in RESULT_KEYS if k in m})
    elif error is None and m.get("done") and m.get("phase") != "done" and "epoch" in m:
        rec.update(status="stopped", stopped_at=m["epoch"], **({"val_acc": m[METRIC]} if METRIC in m else {}))
    else:
        rec.update(status="error" if error is not None else "unfinished",
                   error=first_line(error) if error is not None else "")
    return rec


def fresh(obj: Any, what: str) -> Any:
    """One scheduler/searcher per experiment: a factory is called, an instance deep-copied."""
    if obj is None:
        return None
    if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "on_trial_result")
                                 and not hasattr(obj, "on_trial_complete")):
        return obj()
    try:
        return copy.deepcopy(obj)
    except Exception as e:  # noqa: BLE001 - whatever the object holds
        raise ConfigError(f"{what}: {type(obj).__name__} cannot be copied for each bracket ({first_line(e)}); "
                          f"expected a fresh instance or a factory such as lambda: {type(obj).__name__}(...)") from None


def groups(pending: list[dict[str, Any]], separate: bool) -> list[tuple[str, list[dict[str, Any]]]]:
    """The experiments: one per bracket (and study) when trials are compared, else one."""
    if not separate:
        return [("", pending)]
    out: dict[str, list[dict[str, Any]]] = {}
    for t in pending:
        b = f"{t['source']}-{t['mode']}-{t['arch']}" + (f"-dsa{int(t['dsa'])}" if "dsa" in t else "")
        b += f"-s{t['seed']}" if t.get("study") else ""
        out.setdefault("".join(c if c.isalnum() or c in "-_.=" else "_" for c in b), []).append(t)
    return list(out.items())


def run_experiments(trainable: Any, ctx: dict[str, Any], pending: list[dict[str, Any]], storage: str,
                    experiment: str, res: Resources, progress: bool, tune_opts: dict[str, Any],
                    journal: Path, out_dir: Path) -> tuple[list[dict[str, Any]], list[Any]]:
    """Run ``pending`` (trials, or studies with a search_alg); returns their records and ResultGrids."""
    import ray
    from ray import tune

    total = ray.cluster_resources()
    slots = math.floor(total.get("CPU", 0) / res.cpus + 1e-9)
    if res.gpus > 0:
        slots = min(slots, math.floor(total.get("GPU", 0) / res.gpus + 1e-9))
    if slots < 1:
        raise RayddError(f"evaluate.resources ({res.cpus:g} CPU, {res.gpus:g} GPU per trial) exceed the Ray "
                         f"cluster ({total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU)")
    # Tune's new console output prints an experiment banner even at verbose=0; the classic one stays
    # silent, leaving the per-trial lines of _trial_lines (scoped: the caller's environment is restored)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    scheduler, search_alg = tune_opts.get("scheduler"), tune_opts.get("search_alg")
    plan = ctx["trials"]
    n_trials = sum(tune_opts["num_samples"] - t.get("done", 0) if t.get("study") else 1 for t in pending)
    shared = ([trial_lines(n_trials)] if progress else []) + list(tune_opts.get("callbacks") or [])
    trainable = tune.with_resources(trainable, {"cpu": res.cpus, "gpu": res.gpus})
    records, grids = [], []
    for bracket, trials in groups(pending, scheduler is not None or search_alg is not None):
        name = f"{experiment}/{bracket}" if bracket else experiment
        sched, search = fresh(scheduler, "scheduler"), fresh(search_alg, "search_alg")
        own = [getattr(o, "metric", None) for o in (sched, search) if o is not None]
        metric = {} if any(own) or not own else {"metric": METRIC, "mode": METRIC_MODE}
        if search is not None:
            (t,) = trials
            space, n = {"trial": t["label"], "params": tune_opts["space"]}, tune_opts["num_samples"] - t.get("done", 0)
        else:
            space, n = {"trial": tune.grid_search([t["label"] for t in trials])}, 1
        callbacks = [curves_journal(journal, out_dir, plan, experiment, type(sched).__name__ if sched else None)]
        tuner = tune.Tuner(
            trainable, param_space={**space, "ctx": ctx},
            # reuse_actors: a trial's worker keeps torch/timm imported for the next one (seconds each)
            tune_config=tune.TuneConfig(max_concurrent_trials=min(slots, len(trials) * n), scheduler=sched,
                                        search_alg=search, num_samples=n, reuse_actors=True, **metric),
            run_config=tune.RunConfig(storage_path=storage, name=name, verbose=0, callbacks=callbacks + shared,
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        grid = tuner.fit()
        grids.append(grid)
        for r in grid:
            t = identity(plan, r.config or {})
            if t:
                rec = dict(record(t, r.metrics or {}, r.error), experiment=experiment)
                if (out_dir / "curves" / f"{t['key']}.csv").exists():
                    rec["curve"] = f"curves/{t['key']}.csv"
                if rec["status"] == "stopped":
                    rec["stopped_by"] = type(sched).__name__
                records.append(rec)
    return records, grids


def curves_journal(path: Path, out_dir: Path, plan: dict[str, dict[str, Any]], experiment: str,
                   scheduler: str | None) -> Any:
    """A Tune callback appending each trial to the journal as soon as its final result — or the
    scheduler's stop — reaches the driver, and writing its reports to ``OUT/curves/KEY.csv``."""
    from ray import tune

    class Journal(tune.Callback):
        def __init__(self) -> None:
            self.written: set[str] = set()
            self.rows: dict[str, list[dict[str, Any]]] = {}

        def _write(self, trial: Any, result: dict[str, Any] | None) -> None:
            t = identity(plan, trial.config)
            if t is None or trial.trial_id in self.written:
                return
            rec = record(t, result or {}, None)
            if rec["status"] not in ("ok", "stopped"):
                return
            rec.update(experiment=experiment, curve=self._curve(trial, t["key"]),
                       **({"stopped_by": scheduler} if rec["status"] == "stopped" else {}))
            append_journal(path, rec)
            self.written.add(trial.trial_id)

        def _curve(self, trial: Any, key: str) -> str:
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, extrasaction="ignore", lineterminator="\n")
            w.writeheader()
            w.writerows(self.rows.get(trial.trial_id, []))
            write_text(out_dir / "curves" / f"{key}.csv", buf.getvalue())
            return f"curves/{key}.csv"

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.rows.setdefault(trial.trial_id, []).append({k: result.get(k, "") for k in CURVE_FIELDS})
            if result.get("phase") == "done" or result.get("done"):   # finished, or stopped by the scheduler
                self._write(trial, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._write(trial, trial.last_result)

    return Journal()


def trial_lines(total: int) -> Any:
    """A Tune callback printing one line per finished, stopped or failed trial with count and ETA
    (Tune's own tables are too loud for a terminal)."""
    from ray import tune

    class TrialLines(tune.Callback):
        def __init__(self) -> None:
            self.done, self.t0 = 0, time.time()

        def _line(self, trial: Any, what: str) -> None:
            self.done += 1
            elapsed = time.time() - self.t0
            eta = elapsed / self.done * max(0, total - self.done)
            label = trial.config.get("trial") + params_label(trial.config.get("params") or {})
            print(f"[evaluate] {self.done}/{total} trials ({elapsed:.0f}s, ETA {eta:.0f}s) · {label}: {what}",
                  flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            acc = r.get("test_acc")
            if acc is not None:
                self._line(trial, f"{acc:.2%} in {r.get('seconds', 0):.0f}s")
            elif r.get("epoch") is not None and METRIC in r:
                self._line(trial, f"stopped at epoch {r['epoch']} (val {r[METRIC]:.2%})")
            else:
                self._line(trial, "finished")

        def on_trial_error(self, iteration, trials, trial, **info):
            path = Path(trial.error_file) if trial.error_file else None
            text = path.read_text() if path is not None and path.exists() else "error"
            self._line(trial, f"FAILED: {first_line(Exception(text))}")

    return TrialLines()


def check_callbacks(callbacks: Any) -> list[Any]:
    from ray import tune
    callbacks = list(callbacks or [])
    bad = [c for c in callbacks if not isinstance(c, tune.Callback)]
    if bad:
        raise ConfigError(f"callbacks: {bad[0]!r} is invalid; expected ray.tune.Callback instances")
    return callbacks


def dataframe(trials: list[dict[str, Any]]) -> Any:
    """One row per trial: plan, status, val/test accuracy, and each searched value as ``config/KEY``."""
    import pandas as pd
    cols = ("label", "source", "mode", "arch", "seed", "lr", "status", "val_acc", "test_acc", "stopped_at",
            "epochs", "seconds", "key", "experiment", "trial_id", "curve")
    rows = [{**{c: t.get(c) for c in cols}, **{f"config/{k}": v for k, v in (t.get("params") or {}).items()}}
            for t in trials]
    return pd.DataFrame(rows, columns=None if rows else list(cols))


def first_line(e: BaseException) -> str:
    for line in reversed(str(e).strip().splitlines()):
        if line.strip() and not line.startswith(" "):
            return line.strip()[:300]
    return type(e).__name__

