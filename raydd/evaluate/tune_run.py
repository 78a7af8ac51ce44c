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
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from ..config import Resources
from ..errors import ConfigError, RayddError
from ..io import write_text
from .journal import append_journal
from .sources import digest
from .tune_space import params_label, plain

RESULT_KEYS = ("test_acc", "val_acc", "train_loss_first", "train_loss_last", "epochs", "seconds", "teacher_acc",
               "elf_adapted", "stacked")
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


def records(plan: dict[str, dict[str, Any]], t: dict[str, Any], m: dict[str, Any],
            error: BaseException | None) -> list[dict[str, Any]]:
    """:func:`record`, or for a pack of stacked trials one row per member (``stacked_with``: the pack)."""
    if not t.get("members"):
        return [record(t, m, error)]
    done = m.get("members") or {}
    return [dict(record(plan[label], {**m, **done[label]} if label in done else
                        {k: v for k, v in m.items() if k != "test_acc"}, error), stacked_with=t["label"])
            for label in t["members"]]


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


def trial_cap(total: dict[str, float], res: Resources, max_concurrent: int | None,
              joined: bool) -> tuple[int | None, str | None]:
    """How many trials Tune may run at once (None: no cap) and a line for the user, if any.

    A local Ray's resources are fixed: the cap is what fits in ``total`` (``max_concurrent`` lowers
    it) and trials that fit nowhere are refused. A joined cluster may autoscale: its current
    resources cap and refuse nothing, since the queued trials are the demand its autoscaler adds
    nodes for; only ``max_concurrent`` caps there.
    """
    fit = res.copies_in(total)
    has = f"{total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU"
    each = f"{res.cpus:g} CPU, {res.gpus:g} GPU per trial"
    if not joined:
        if fit < 1:
            raise RayddError(f"evaluate.resources ({each}) exceed the Ray cluster ({has})")
        return (fit if max_concurrent is None else min(fit, max_concurrent)), None
    note = (f"the Ray cluster has {has} now, too little for one trial ({each}); the trials wait until "
            f"it provides the resources (an autoscaler adds nodes for them)") if fit < 1 else None
    return max_concurrent, note


def joined_cluster() -> bool:
    """Whether this driver joined a running Ray cluster (ray.address), which may autoscale, rather
    than starting its own local instance, whose resources are all there will ever be."""
    import ray
    try:
        from ray.util.client import ray as client
        if client.is_connected():   # Ray Client (ray://): always somebody else's cluster
            return True
    except Exception:  # noqa: BLE001 - Ray Client is optional
        pass
    try:   # a private API (as in raycluster); if Ray stops offering it, a local instance's rules hold
        node = ray._private.worker._global_node
    except AttributeError:
        return False
    return node is not None and getattr(node, "head", True) is False


def run_experiments(trainable: Any, ctx: dict[str, Any], pending: list[dict[str, Any]], storage: str,
                    experiment: str, res: Resources, progress: bool, tune_opts: dict[str, Any],
                    journal: Path, out_dir: Path) -> tuple[list[dict[str, Any]], list[Any]]:
    """Run ``pending`` (trials, or studies with a search_alg); returns their records and ResultGrids."""
    import ray
    from ray import tune

    cap, note = trial_cap(ray.cluster_resources(), res, ctx["ecfg"].get("max_concurrent"), joined_cluster())
    if note and progress:
        print(f"[evaluate] {note}", flush=True)
    # Tune's new console output prints an experiment banner even at verbose=0; the classic one stays
    # silent, leaving the per-trial lines of _trial_lines (scoped: the caller's environment is restored)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    scheduler, search_alg = tune_opts.get("scheduler"), tune_opts.get("search_alg")
    plan = ctx["trials"]
    planned = [t["arch"] for t in pending
               for _ in range(tune_opts["num_samples"] - t.get("done", 0) if t.get("study") else 1)]
    shared = ([trial_lines(plan, planned)] if progress else []) + list(tune_opts.get("callbacks") or [])
    trainable = tune.with_resources(trainable, {"cpu": res.cpus, "gpu": res.gpus})
    done, grids = [], []
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
        if progress:
            from ..services import resources_text
            each = resources_text(res)
            at_once = f"up to {min(cap, len(trials) * n)}" if cap else "as many as the cluster provides"
            print(f"[evaluate] {'bracket ' + bracket + ': ' if bracket else ''}{len(trials) * n} trials, "
                  f"{at_once} at a time ({each} each)", flush=True)
        callbacks = [curves_journal(journal, out_dir, plan, experiment, type(sched).__name__ if sched else None)]
        tuner = tune.Tuner(
            trainable, param_space={**space, "ctx": ctx},
            # reuse_actors: a trial's worker keeps torch/timm imported for the next one (seconds each)
            tune_config=tune.TuneConfig(max_concurrent_trials=min(cap, len(trials) * n) if cap else None,
                                        scheduler=sched,
                                        search_alg=search, num_samples=n, reuse_actors=True, **metric),
            run_config=tune.RunConfig(storage_path=storage, name=name, verbose=0, callbacks=callbacks + shared,
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        grid = tuner.fit()
        grids.append(grid)
        for r in grid:
            t = identity(plan, r.config or {})
            for rec in records(plan, t, r.metrics or {}, r.error) if t else []:
                rec["experiment"] = experiment
                if (out_dir / "curves" / f"{t['key']}.csv").exists():
                    rec["curve"] = f"curves/{t['key']}.csv"
                if rec["status"] == "stopped":
                    rec["stopped_by"] = type(sched).__name__
                done.append(rec)
    return done, grids


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
            recs = [r for r in records(plan, t, result or {}, None) if r["status"] in ("ok", "stopped")]
            if not recs:
                return
            curve = self._curve(trial, t["key"])
            for rec in recs:
                rec.update(experiment=experiment, curve=curve,
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


EPOCH_LINE_EVERY_S = 30.0   # a running trial gets an "epoch 40/100" line at most this often (none before)


def weighted_eta(elapsed: float, finished: list[tuple[str, float]], unfinished: list[tuple[str, float]],
                 cut_seconds: float = 0.0) -> float | None:
    """Seconds left of a sweep, each unfinished trial weighted by its architecture (a ResNet trial can
    take twenty MLP trials' time, so counting trials alone misleads).

    ``finished``: (architecture, seconds) of each trial that completed; ``unfinished``: (architecture,
    fraction of its epochs done) of each planned trial not ended yet; ``cut_seconds``: the time of trials
    that ended early (stopped, failed), work done that predicts nothing. A trial is expected to take the
    mean seconds of the completed trials of its architecture, the mean of all completed ones for an
    architecture none has completed; wall seconds per expected trial-second so far (``elapsed`` over
    the work done, running trials' parts included) turn the work left into seconds. None before any
    trial completed."""
    if not finished or elapsed <= 0:
        return None
    by_arch: dict[str, list[float]] = {}
    for arch, sec in finished:
        by_arch.setdefault(arch, []).append(sec)
    overall = sum(sec for _, sec in finished) / len(finished)
    expect = {arch: sum(v) / len(v) for arch, v in by_arch.items()}
    done = sum(sec for _, sec in finished) + cut_seconds + sum(expect.get(a, overall) * f for a, f in unfinished)
    left = sum(expect.get(a, overall) * (1 - f) for a, f in unfinished)
    return elapsed * left / done if done > 0 else None


def eta_text(eta: float | None) -> str:
    return "?" if eta is None else f"{eta:.0f}s"


def trial_fraction(mode: str, result: dict[str, Any]) -> float:
    """How much of a trial an intermediate report says is done: ``kd`` trains its teacher, then the student."""
    total = result.get("total_epochs") or 0
    frac = min(1.0, result.get("epoch", 0) / total) if total else 0.0
    if mode == "kd":
        frac = (frac + (result.get("phase") != "teacher")) / 2
    return frac


def trial_lines(plan: dict[str, dict[str, Any]], planned: list[str]) -> Any:
    """A Tune callback printing one line per finished, stopped or failed trial with count and ETA, and
    for a trial running longer than EPOCH_LINE_EVERY_S its epoch (Tune's own tables are too loud for a
    terminal). ``planned``: the architecture of every trial to run, for :func:`weighted_eta`."""
    from ray import tune

    total = len(planned)

    class TrialLines(tune.Callback):
        def __init__(self) -> None:
            self.done, self.t0 = 0, time.time()
            self.finished: list[tuple[str, float]] = []   # (arch, seconds) of completed trials
            self.ended: list[str] = []                    # the arch of every ended trial
            self.cut = 0.0                                # seconds of trials that ended early
            self.running: dict[str, tuple[str, float]] = {}   # trial id -> (arch, fraction done)
            self.started: dict[str, float] = {}
            self.last_line: dict[str, float] = {}

        def eta(self) -> float | None:
            left = dict(Counter(planned) - Counter(self.ended))
            unfinished = []
            for arch, frac in self.running.values():
                if left.get(arch, 0) > 0:
                    left[arch] -= 1
                    unfinished.append((arch, frac))
            unfinished += [(arch, 0.0) for arch, n in left.items() for _ in range(n)]
            return weighted_eta(time.time() - self.t0, self.finished, unfinished, self.cut)

        def _ended(self, trial: Any, seconds: float | None, complete: bool) -> None:
            t = identity(plan, trial.config) or {}
            arch = t.get("arch", "?")
            self.running.pop(trial.trial_id, None)
            self.ended.append(arch)
            took = seconds if seconds is not None else time.time() - self.started.get(trial.trial_id, time.time())
            if complete:
                self.finished.append((arch, took))
            else:
                self.cut += took

        def _line(self, trial: Any, what: str) -> None:
            self.done += 1
            elapsed = time.time() - self.t0
            label = trial.config.get("trial") + params_label(trial.config.get("params") or {})
            print(f"[evaluate] {self.done}/{total} trials ({elapsed:.0f}s, ETA {eta_text(self.eta())}) · "
                  f"{label}: {what}", flush=True)

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started.setdefault(trial.trial_id, time.time())

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("phase") in (None, "done") or "epoch" not in result:
                return
            t = identity(plan, trial.config) or {}
            self.running[trial.trial_id] = (t.get("arch", "?"), trial_fraction(t.get("mode", ""), result))
            now = time.time()
            since = self.last_line.get(trial.trial_id, self.started.setdefault(trial.trial_id, now))
            if now - since < EPOCH_LINE_EVERY_S:
                return
            self.last_line[trial.trial_id] = now
            label = trial.config.get("trial") + params_label(trial.config.get("params") or {})
            phase = "teacher epoch" if result.get("phase") == "teacher" else "epoch"
            of = f"/{result['total_epochs']}" if result.get("total_epochs") else ""
            print(f"[evaluate] {label}: {phase} {result['epoch']}{of} "
                  f"({now - self.started[trial.trial_id]:.0f}s in; sweep ETA {eta_text(self.eta())})", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            acc = r.get("test_acc")
            self._ended(trial, r.get("time_total_s"), acc is not None)
            if acc is not None:
                self._line(trial, f"{acc:.2%} in {r.get('seconds', 0):.0f}s")
            elif r.get("epoch") is not None and METRIC in r:
                self._line(trial, f"stopped at epoch {r['epoch']} (val {r[METRIC]:.2%})")
            else:
                self._line(trial, "finished")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._ended(trial, (trial.last_result or {}).get("time_total_s"), False)
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

