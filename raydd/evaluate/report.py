"""Evaluation reports: ``results.json`` (every trial + the aggregate), ``results.csv`` (one row per
trial), ``results.md`` (accuracy table) and ``plot.png`` (grouped bars with error bars, the y-axis
zoomed to the data, the teachers' and the full-data accuracy as reference lines).

OUT (``RUN/eval``) holds the latest evaluation's files; every evaluation also keeps its own copy in
``OUT/reports/ID/`` (ID: a hash of its trials' keys, so a rerun of the same sweep updates its own
report and a different sweep never overwrites another's), listed in ``OUT/index.md`` with what each
evaluated.

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
import hashlib
import io
import json
import math
import time
from pathlib import Path
from typing import Any, Iterable

from ..errors import RayddError
from ..io import read_json, write_bytes, write_json, write_text
from .metadd_split import split_markdown
from .scores import SCORES_NOTE, compute_scores, scores_markdown, trial_dsa

CSV_FIELDS = ("source", "arch", "mode", "seed", "lr", "params", "dsa", "status", "test_acc", "val_acc", "stopped_at",
              "train_loss_first",
              "train_loss_last", "epochs", "seconds", "teacher_acc", "elf_adapted", "key", "experiment",
              "trial_id", "error")

Column = tuple[str, str]  # (source, mode)
REPORTS_DIR = "reports"
INDEX_MD, INDEX_JSON = "index.md", "index.json"   # OUT/index.md, OUT/reports/index.json


def column_label(col: Column) -> str:
    source, mode = col
    return mode if source == "distilled" else f"{source} · {mode}"


def aggregate(trials: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std of finished trials per (source, arch, mode, lr, sampled params); ``best`` marks each
    (source, arch, mode)'s best variant: by validation accuracy when every variant has one (a
    scheduler's or searcher's sweep), else by test accuracy (the lr search of ``evaluate.lr_search``)."""
    groups: dict[tuple, list[dict]] = {}
    for t in trials:
        if t.get("status") == "ok":
            params = json.dumps(t.get("params") or {}, sort_keys=True)
            groups.setdefault((t["source"], t["arch"], t["mode"], float(t["lr"]), params), []).append(t)
    rows = []
    for (source, arch, mode, lr, params), ts in groups.items():
        ts = sorted(ts, key=lambda t: t["seed"])
        accs = [float(t["test_acc"]) for t in ts]
        mean = sum(accs) / len(accs)
        std = math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs))
        vals = [float(t["val_acc"]) for t in ts if isinstance(t.get("val_acc"), (int, float))]
        rows.append({"source": source, "arch": arch, "mode": mode, "lr": lr, "params": json.loads(params),
                     "n": len(accs), "mean": mean, "std": std, "seeds": [t["seed"] for t in ts],
                     "test_accs": accs, "val_mean": sum(vals) / len(vals) if len(vals) == len(ts) else None,
                     "best": False})
    by_bracket: dict[tuple, list[dict]] = {}
    for r in rows:
        by_bracket.setdefault((r["source"], r["arch"], r["mode"]), []).append(r)
    for rs in by_bracket.values():
        on_val = all(r["val_mean"] is not None for r in rs)
        max(rs, key=lambda r: r["val_mean"] if on_val else r["mean"])["best"] = True
    rows.sort(key=lambda r: (r["arch"], r["source"], r["mode"], r["lr"], json.dumps(r["params"], sort_keys=True)))
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
        w.writerow({k: json.dumps(v, sort_keys=True) if isinstance(v := t.get(k, ""), dict) else v
                    for k in CSV_FIELDS})
    return buf.getvalue()


def plot_label(col: Column) -> str:
    """The plot's legend names the synset's bars too ("distilled · soft"); the table's columns do not."""
    return f"distilled · {col[1]}" if col[0] == "distilled" else column_label(col)


def teacher_references(records: Iterable[dict[str, Any]]) -> list[tuple[str, float]]:
    """(label, mean test accuracy in %) per teacher spec of RUN/teachers/teachers.json's records."""
    by_spec: dict[str, list[float]] = {}
    for r in records:
        if isinstance(r, dict) and isinstance(r.get("test_acc"), (int, float)):
            by_spec.setdefault(str(r.get("spec", "?")), []).append(100 * float(r["test_acc"]))
    return [(f"teachers · {spec} ({len(v)}): {sum(v) / len(v):.1f}", sum(v) / len(v)) for spec, v in by_spec.items()]


def _read_teachers(path: Path) -> list[dict[str, Any]]:
    try:
        doc = read_json(path)
    except RayddError:
        return []
    return [r for r in (doc.get("teachers") or []) if isinstance(r, dict)] if isinstance(doc, dict) else []


def zoomed_limits(values: list[float]) -> tuple[float, float]:
    """The y-range of the data with a margin, inside [0, 100] (0-100 hides the differences that matter)."""
    if not values:
        return 0.0, 100.0
    lo, hi = min(values), max(values)
    pad = max(1.0, 0.15 * (hi - lo))
    return max(0.0, math.floor((lo - pad) / 5) * 5), min(100.0, math.ceil((hi + pad) / 5) * 5)


def plot_figure(agg: list[dict[str, Any]], archs: list[str], columns: list[Column], title: str = "",
                teachers: Iterable[dict[str, Any]] = ()) -> Any:
    """Grouped bars (architecture groups, one bar per column) with std error bars; full-data columns
    are drawn as a horizontal line over their architecture's group, the teachers' mean test accuracy
    as a line across the plot. Returns the matplotlib Figure (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells = _cells(agg)
    bars = [c for c in columns if c[0] != "full"]
    width = 0.8 / max(1, len(bars))
    fig = Figure(figsize=(max(7.0, 0.35 * len(archs) * max(1, len(bars)) + 3), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    values: list[float] = []
    for j, col in enumerate(bars):
        xs, means, stds = [], [], []
        for i, arch in enumerate(archs):
            r = cells.get((arch, *col))
            if r is not None:
                xs.append(i - 0.4 + width * (j + 0.5))
                means.append(100 * r["mean"])
                stds.append(100 * r["std"])
        values += [m - s for m, s in zip(means, stds)] + [m + s for m, s in zip(means, stds)]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=plot_label(col))
    for k, col in enumerate(c for c in columns if c[0] == "full"):
        label = f"full data · {col[1]}"
        for i, arch in enumerate(archs):
            r = cells.get((arch, *col))
            if r is not None:
                values.append(100 * r["mean"])
                ax.hlines(100 * r["mean"], i - 0.45, i + 0.45, colors="black", linestyles=("-", "-.")[k % 2],
                          linewidth=1.5, label=label)
                label = None  # one legend entry per full-data column
    for k, (label, acc) in enumerate(teacher_references(teachers)):
        values.append(acc)
        ax.axhline(acc, color=("tab:red", "tab:purple")[k % 2], linestyle="--", linewidth=1.2, label=label)
    ax.set_xticks(range(len(archs)))
    ax.set_xticklabels(archs, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(*zoomed_limits(values))
    ax.set_title(title, fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    rank = {"distilled": 0, "full": 2, "teachers": 3}   # bars (synset first), then the reference lines
    order = sorted(range(len(labels)), key=lambda i: (rank.get(labels[i].split(" ")[0], 1), i))
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1.0))  # outside: never hides a bar
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_png(agg: list[dict[str, Any]], archs: list[str], columns: list[Column], title: str = "",
             teachers: Iterable[dict[str, Any]] = ()) -> bytes:
    buf = io.BytesIO()
    plot_figure(agg, archs, columns, title, teachers).savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def report_id(trials: Iterable[dict[str, Any]], archs: list[str], columns: list[Column]) -> str:
    """What an evaluation evaluated, as a name: its trials' keys (every setting that changes a result)
    with its table's rows and columns."""
    what = {"keys": sorted(str(t.get("key", t.get("label", ""))) for t in trials), "archs": list(archs),
            "columns": [list(c) for c in columns]}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _summary(rid: str, trials: list[dict[str, Any]], archs: list[str], columns: list[Column],
             config: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """An index entry: what the evaluation ran, in the words of its config."""
    ev = config.get("evaluate") or {}
    lrs = extra.get("lrs") or ([ev["lr"]] if "lr" in ev else [])
    return {"id": rid, "updated": time.strftime("%Y-%m-%d %H:%M:%S"), "synset": extra.get("synset"),
            "synset_sha256": extra.get("synset_sha256"), "ipc": extra.get("ipc"), "archs": list(archs),
            "columns": [column_label(c) for c in columns], "seeds": extra.get("seeds"),
            "epochs": ev.get("epochs"), "full_epochs": ev.get("full_epochs"), "lrs": lrs,
            "arch_lr": ev.get("arch_lr") or {}, "soft_loss": ev.get("soft_loss"), "dsa": ev.get("dsa"),
            "trials": len(trials), "ok": sum(t.get("status") == "ok" for t in trials)}


def _index_markdown(entries: list[dict[str, Any]]) -> str:
    lines = ["# Evaluations", "", "Newest first; each report's own files are in reports/ID/ (results.md, plot.png, "
             "results.csv, results.json). results.md and plot.png beside this file are the latest one's.", "",
             "| report | updated | synset | IPC | architectures | columns | seeds | epochs | lr | soft loss | trials ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        syn = f"{e.get('synset') or '—'}" + (f" ({e['synset_sha256'][:8]})" if e.get("synset_sha256") else "")
        lr = ", ".join(f"{v:g}" for v in e.get("lrs") or []) + "".join(
            f"; {a} {v:g}" for a, v in (e.get("arch_lr") or {}).items())
        epochs = f"{e.get('epochs')}" + (f" (full {e['full_epochs']})" if e.get("full_epochs") else "")
        seeds = ", ".join(map(str, e.get("seeds") or [])) or "—"
        lines.append(f"| [{e['id']}]({REPORTS_DIR}/{e['id']}/results.md) | {e['updated']} | {syn} | "
                     f"{e.get('ipc') or '—'} | {', '.join(e['archs'])} | {', '.join(e['columns'])} | {seeds} | "
                     f"{epochs} | {lr or '—'} | {e.get('soft_loss') or '—'} | {e['ok']}/{e['trials']} |")
    return "\n".join(lines) + "\n"


def _update_index(out: Path, entry: dict[str, Any]) -> Path:
    """OUT/reports/index.json (the entries) and OUT/index.md (their table), this entry first."""
    path = out / REPORTS_DIR / INDEX_JSON
    try:
        old = read_json(path).get("reports", []) if path.exists() else []
    except (RayddError, AttributeError):
        old = []  # a damaged index is rebuilt from here on
    entries = [entry] + [e for e in old if isinstance(e, dict) and e.get("id") != entry["id"] and "archs" in e]
    write_json(path, {"reports": entries})
    write_text(out / INDEX_MD, _index_markdown(entries))
    return out / INDEX_MD


def write_reports(out_dir: str | Path, trials: list[dict[str, Any]], *, archs: list[str],
                  columns: list[Column], config: dict[str, Any], seconds: float, notes: list[str],
                  lr_search: bool = False, extra: dict[str, Any] | None = None,
                  title: str = "", teachers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write all four reports atomically, into OUT (the latest) and OUT/reports/ID (this evaluation's
    own), and list it in OUT/index.md; returns their paths, the aggregate and the table.

    ``teachers``: teacher records for the plot's reference line; None reads ``OUT/../teachers/teachers.json``
    when there is one (OUT = RUN/eval)."""
    out = Path(out_dir)
    if teachers is None:
        teachers = _read_teachers(out.parent / "teachers" / "teachers.json")
    # trials without a ``dsa`` field ran under the sweep's evaluate.dsa; the accuracy table shows
    # that setting only, the other one (run for ARS) enters the scores alone
    default_dsa = bool((config.get("evaluate") or {}).get("dsa", True))
    agg = aggregate(t for t in trials if trial_dsa(t, default_dsa) == default_dsa)
    table = table_markdown(agg, archs, columns, lr_search=lr_search, notes=notes,
                           seconds=seconds_per_trial(trials))
    table += split_markdown(agg, archs, columns, config)   # MetaDD runs: seen vs unseen architectures
    experiment = (extra or {}).get("experiment")
    ran = [t for t in trials if experiment is not None and t.get("experiment") == experiment]
    timing = (f"{len(trials)} trials: {len(ran)} in this sweep's Tune experiment ({seconds:.0f} s wall, "
              f"at most {max_concurrent(ran)} at once), {len(trials) - len(ran)} reused from earlier sweeps.\n")
    rid = report_id(trials, archs, columns)
    own = out / REPORTS_DIR / rid
    paths = {"results_json": out / "results.json", "csv": out / "results.csv", "md": out / "results.md",
             "plot": out / "plot.png", "report_dir": own, "index": out / INDEX_MD}
    scores = compute_scores(trials, default_dsa=default_dsa)
    doc = {"trials": trials, "aggregate": agg, "columns": [list(c) for c in columns], "archs": archs,
           "notes": notes, "config": config, "seconds": seconds, "scores": scores, **(extra or {}), "report": rid}
    heading = (f"# Evaluation{': ' + title if title else ''}\n\nTest accuracy (%), mean ± std (n seeds); "
               f"s/trial: mean wall seconds of one trial (training and test pass).\n\n")
    honest = (f"\n## Honest scores (DD-Ranking)\n\n{scores_markdown(scores, archs)}\n{SCORES_NOTE}\n"
              if scores else "")
    md = heading + table + "\n" + timing + honest
    png = plot_png(agg, archs, columns, title, teachers)
    # this evaluation's own copy first (its results.json without the other grids' trials), then the latest
    write_json(own / "results.json", {k: v for k, v in doc.items() if k != "other_trials"})
    write_text(own / "results.csv", trials_csv(trials))
    write_text(own / "results.md", md)
    write_bytes(own / "plot.png", png)
    write_json(paths["results_json"], doc)
    write_text(paths["csv"], trials_csv(trials))
    write_text(paths["md"], md + f"\nThis evaluation's own copy: {REPORTS_DIR}/{rid}/; every evaluation: {INDEX_MD}.\n")
    write_bytes(paths["plot"], png)
    _update_index(out, _summary(rid, trials, archs, columns, config, extra or {}))
    return {**paths, "aggregate": agg, "table": table}
