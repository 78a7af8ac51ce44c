"""Evaluation reports: ``results.json`` (every trial + the aggregate), ``results.csv`` (one row per
trial), ``results.md`` (accuracy table) and ``plot.png`` (grouped bars with error bars).

Aggregation: test accuracy mean ± std over seeds per (source, architecture, mode, lr); the std is
the population std (``numpy.std``), as the dataset-distillation papers report it. With an lr
search the table shows, per (source, architecture, mode), the lr with the best mean — selected on
test accuracy, as the field's evaluation scripts do — and names it in the cell.

Where the trials allow it, DD-Ranking's HLR/IOR/LRS/ARS (:mod:`.scores`) follow: a ``scores``
section per architecture in ``results.json`` and a second table in ``results.md``. Trials marked
``dsa`` against the sweep's ``evaluate.dsa`` (run for ARS) stay out of the accuracy table.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Iterable

from ..io import write_bytes, write_json, write_text
from .scores import SCORES_NOTE, compute_scores, scores_markdown, trial_dsa

CSV_FIELDS = ("source", "arch", "mode", "seed", "lr", "dsa", "status", "test_acc", "train_loss_first",
              "train_loss_last", "epochs", "seconds", "teacher_acc", "elf_adapted", "key", "experiment",
              "trial_id", "error")

Column = tuple[str, str]  # (source, mode)


def column_label(col: Column) -> str:
    source, mode = col
    return mode if source == "distilled" else f"{source} · {mode}"


def aggregate(trials: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std of finished trials per (source, arch, mode, lr); ``best`` marks each group's best lr."""
    groups: dict[tuple, list[dict]] = {}
    for t in trials:
        if t.get("status") == "ok":
            groups.setdefault((t["source"], t["arch"], t["mode"], float(t["lr"])), []).append(t)
    rows = []
    for (source, arch, mode, lr), ts in groups.items():
        ts = sorted(ts, key=lambda t: t["seed"])
        accs = [float(t["test_acc"]) for t in ts]
        mean = sum(accs) / len(accs)
        std = math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs))
        rows.append({"source": source, "arch": arch, "mode": mode, "lr": lr, "n": len(accs), "mean": mean,
                     "std": std, "seeds": [t["seed"] for t in ts], "test_accs": accs, "best": False})
    best: dict[tuple, dict] = {}
    for r in rows:
        k = (r["source"], r["arch"], r["mode"])
        if k not in best or r["mean"] > best[k]["mean"]:
            best[k] = r
    for r in best.values():
        r["best"] = True
    rows.sort(key=lambda r: (r["arch"], r["source"], r["mode"], r["lr"]))
    return rows


def _cells(agg: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(r["arch"], r["source"], r["mode"]): r for r in agg if r["best"]}


def seconds_per_trial(trials: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Mean wall seconds of a finished trial (training and test pass) per architecture."""
    by_arch: dict[str, list[float]] = {}
    for t in trials:
        if t.get("status") == "ok" and isinstance(t.get("seconds"), (int, float)):
            by_arch.setdefault(t["arch"], []).append(float(t["seconds"]))
    return {a: sum(v) / len(v) for a, v in by_arch.items()}


def max_concurrent(trials: Iterable[dict[str, Any]]) -> int:
    """The most trials that were running at one instant, from their start times and durations."""
    spans = [(float(t["started_at"]), float(t["started_at"]) + float(t["seconds"])) for t in trials
             if t.get("status") == "ok" and t.get("started_at") is not None and t.get("seconds") is not None]
    return max((sum(s <= start < e for s, e in spans) for start, _ in spans), default=0)


def table_markdown(agg: list[dict[str, Any]], archs: list[str], columns: list[Column], *,
                   lr_search: bool = False, notes: Iterable[str] = (),
                   seconds: dict[str, float] | None = None) -> str:
    """Rows: architectures; columns: the synset's modes beside the baselines; cells mean ± std (n) in %;
    with ``seconds``, a last column of mean seconds per trial."""
    cells = _cells(agg)
    head = "| architecture | " + " | ".join(column_label(c) for c in columns) + (" | s/trial" if seconds else "") + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1 + bool(seconds))]
    for arch in archs:
        row = []
        for source, mode in columns:
            r = cells.get((arch, source, mode))
            if r is None:
                row.append("—")
                continue
            text = f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f} ({r['n']})"
            row.append(text + (f" @ lr {r['lr']:g}" if lr_search else ""))
        if seconds:
            row.append(f"{seconds[arch]:.0f}" if arch in seconds else "—")
        lines.append(f"| {arch} | " + " | ".join(row) + " |")
    text = "\n".join(lines)
    notes = list(notes)
    if notes:
        text += "\n\n" + "\n".join(f"- {n}" for n in notes)
    return text + "\n"


def trials_csv(trials: Iterable[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for t in trials:
        w.writerow({k: t.get(k, "") for k in CSV_FIELDS})
    return buf.getvalue()


def plot_png(agg: list[dict[str, Any]], archs: list[str], columns: list[Column], title: str = "") -> bytes:
    """Grouped bars (architecture groups, one bar per column) with std error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _cells(agg)
    width = 0.8 / max(1, len(columns))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.35 * len(archs) * max(1, len(columns)) + 3), 4.5))
    for j, col in enumerate(columns):
        xs, means, stds = [], [], []
        for i, arch in enumerate(archs):
            r = cells.get((arch, *col))
            if r is not None:
                xs.append(i - 0.4 + width * (j + 0.5))
                means.append(100 * r["mean"])
                stds.append(100 * r["std"])
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=column_label(col))
    ax.set_xticks(range(len(archs)))
    ax.set_xticklabels(archs, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a bar
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def write_reports(out_dir: str | Path, trials: list[dict[str, Any]], *, archs: list[str],
                  columns: list[Column], config: dict[str, Any], seconds: float, notes: list[str],
                  lr_search: bool = False, extra: dict[str, Any] | None = None,
                  title: str = "") -> dict[str, Any]:
    """Write all four reports atomically; returns their paths, the aggregate and the table."""
    out = Path(out_dir)
    # trials without a ``dsa`` field ran under the sweep's evaluate.dsa; the accuracy table shows
    # that setting only, the other one (run for ARS) enters the scores alone
    default_dsa = bool((config.get("evaluate") or {}).get("dsa", True))
    agg = aggregate(t for t in trials if trial_dsa(t, default_dsa) == default_dsa)
    table = table_markdown(agg, archs, columns, lr_search=lr_search, notes=notes,
                           seconds=seconds_per_trial(trials))
    experiment = (extra or {}).get("experiment")
    ran = [t for t in trials if experiment is not None and t.get("experiment") == experiment]
    timing = (f"{len(trials)} trials: {len(ran)} in this sweep's Tune experiment ({seconds:.0f} s wall, "
              f"at most {max_concurrent(ran)} at once), {len(trials) - len(ran)} reused from earlier sweeps.\n")
    paths = {"results_json": out / "results.json", "csv": out / "results.csv", "md": out / "results.md",
             "plot": out / "plot.png"}
    scores = compute_scores(trials, default_dsa=default_dsa)
    write_json(paths["results_json"], {"trials": trials, "aggregate": agg,
                                       "columns": [list(c) for c in columns], "archs": archs,
                                       "notes": notes, "config": config, "seconds": seconds,
                                       "scores": scores, **(extra or {})})
    write_text(paths["csv"], trials_csv(trials))
    heading = (f"# Evaluation{': ' + title if title else ''}\n\nTest accuracy (%), mean ± std (n seeds); "
               f"s/trial: mean wall seconds of one trial (training and test pass).\n\n")
    honest = (f"\n## Honest scores (DD-Ranking)\n\n{scores_markdown(scores, archs)}\n{SCORES_NOTE}\n"
              if scores else "")
    write_text(paths["md"], heading + table + "\n" + timing + honest)
    write_bytes(paths["plot"], plot_png(agg, archs, columns, title))
    return {**paths, "aggregate": agg, "table": table}
