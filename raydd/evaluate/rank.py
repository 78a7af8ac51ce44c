"""Distilled sets as a proxy for architecture search (APM, Sec. 4.4): do candidates trained on the
synset rank as they rank trained on the whole training set?

``raydd rank`` trains every candidate on the synset, on a random real subset of the same size and
on the full training data (``evaluate.full_epochs``) in one evaluation sweep (:func:`run_rank`),
then compares the orders: Spearman's ρ and Kendall's τ-b between the proxy's accuracy and the
full-data accuracy across candidates, the random subset beside the synset as the bar to clear.
With a handful of candidates a point estimate says little, so each comes with a percentile
bootstrap interval over candidates (resampled with replacement, a fixed seed: reruns agree).

The statistics, the table and the plot are pure functions of per-candidate accuracies (no Ray).
Files, in the evaluation's own report directory ``RUN/eval/reports/ID/``: ``rank.json``,
``rank.md``, ``rank.png``.
"""
from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError, RayddError

PROXIES = ("synset", "random")      # the sources compared with the full data
SOURCES = ("synset", "random", "full")
SOURCE_OF = {"synset": "distilled", "random": "random", "full": "full"}   # the sweep's names
MIN_CANDIDATES = 3
RESAMPLES, BOOTSTRAP_SEED, LEVEL = 2000, 0, 0.95


# --------------------------------------------------------------------------- statistics

def _correlation(name: str, x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    from scipy import stats
    x, y = np.asarray(x, float), np.asarray(y, float)
    if _constant(x) or _constant(y):
        return math.nan, math.nan
    r = getattr(stats, name)(x, y)
    return float(r.statistic), float(r.pvalue)


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Spearman's ρ (ties: average ranks) and its two-sided p-value; nan for a constant input."""
    return _correlation("spearmanr", x, y)


def kendall(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Kendall's τ-b (accounts for ties) and its two-sided p-value; nan for a constant input."""
    return _correlation("kendalltau", x, y)


def _constant(v: np.ndarray) -> bool:
    return v.size < 2 or bool(np.all(v == v[0]))


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """ρ of every row pair of ``x``, ``y`` (B × n) at once: the Pearson correlation of average
    ranks; nan where a row is constant (2000 scipy calls per statistic would dominate a report)."""
    from scipy.stats import rankdata
    rx, ry = rankdata(x, axis=1), rankdata(y, axis=1)
    rx, ry = rx - rx.mean(axis=1, keepdims=True), ry - ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx ** 2).sum(axis=1) * (ry ** 2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(axis=1) / np.where(den > 0, den, 1), np.nan)


def kendall_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """τ-b of every row pair at once: Σ sign(Δx)·sign(Δy) / √(Σ sign(Δx)² · Σ sign(Δy)²) over pairs."""
    sx = np.sign(x[:, :, None] - x[:, None, :])
    sy = np.sign(y[:, :, None] - y[:, None, :])
    den = np.sqrt((sx ** 2).sum(axis=(1, 2)) * (sy ** 2).sum(axis=(1, 2)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (sx * sy).sum(axis=(1, 2)) / np.where(den > 0, den, 1), np.nan)


def bootstrap_indices(n: int, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """``resamples`` × ``n`` candidate indices drawn with replacement; one draw serves every proxy,
    so the synset's and the random subset's intervals come from the same resampled candidate sets."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentile_ci(values: np.ndarray, level: float = LEVEL) -> tuple[float, float] | None:
    """The percentile interval of the finite bootstrap values (resamples whose accuracies are all
    equal have no rank correlation and are dropped); None with fewer than two."""
    v = values[np.isfinite(values)]
    if v.size < 2:
        return None
    lo, hi = np.percentile(v, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def correlations(proxy: Sequence[float], full: Sequence[float], *, resamples: int = RESAMPLES,
                 seed: int = BOOTSTRAP_SEED, level: float = LEVEL,
                 indices: np.ndarray | None = None) -> dict[str, Any]:
    """ρ and τ between ``proxy`` and ``full`` accuracies (one value per candidate, same order), each
    ``{"value", "p", "ci": [lo, hi] or None, "valid": finite resamples}``."""
    x, y = np.asarray(full, float), np.asarray(proxy, float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"expected two equal-length lists of accuracies, got {x.shape} and {y.shape}")
    idx = bootstrap_indices(len(x), resamples, seed) if indices is None else indices
    out: dict[str, Any] = {}
    for name, point, rows in (("spearman", spearman, spearman_rows), ("kendall", kendall, kendall_rows)):
        value, p = point(x, y)
        boot = rows(x[idx], y[idx])
        ci = percentile_ci(boot, level)
        out[name] = {"value": value, "p": p, "ci": list(ci) if ci else None,
                     "valid": int(np.isfinite(boot).sum())}
    return out


def ranks(values: Sequence[float]) -> list[int]:
    """1 = the highest accuracy; ties share the better rank."""
    from scipy.stats import rankdata
    return [int(r) for r in rankdata(-np.asarray(values, float), method="min")]


def summarize(accuracy: dict[str, dict[str, dict[str, Any]]], candidates: Sequence[str], *,
              modes: dict[str, str], resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
              level: float = LEVEL) -> dict[str, Any]:
    """The ranking document from per-candidate accuracies ``accuracy[candidate][source] =
    {"mean", "std", "n"}`` (fractions, mean over seeds; sources synset, random, full)."""
    candidates = list(candidates)
    missing = [f"{c} ({s})" for c in candidates for s in SOURCES if s not in accuracy.get(c, {})]
    if missing:
        raise RayddError(f"no accuracy for {', '.join(missing)}; expected every candidate on every source")
    if len(candidates) < MIN_CANDIDATES:
        raise ConfigError(f"{len(candidates)} candidates; expected at least {MIN_CANDIDATES} to rank")
    mean = {s: [float(accuracy[c][s]["mean"]) for c in candidates] for s in SOURCES}
    idx = bootstrap_indices(len(candidates), resamples, seed)
    corr = {p: correlations(mean[p], mean["full"], indices=idx, level=level) for p in PROXIES}
    return {"candidates": candidates, "modes": dict(modes),
            "accuracy": {c: {s: dict(accuracy[c][s]) for s in SOURCES} for c in candidates},
            "ranks": {s: dict(zip(candidates, ranks(mean[s]))) for s in SOURCES},
            "correlation": corr,
            "bootstrap": {"resamples": resamples, "seed": seed, "level": level, "method": "percentile",
                          "over": "candidates"}}


# --------------------------------------------------------------------------- reports

def source_label(doc: dict[str, Any], source: str) -> str:
    return f"{source} · {doc['modes'][source]}"


def _corr_text(c: dict[str, Any]) -> str:
    if not math.isfinite(c["value"]):
        return "— (constant accuracies)"
    ci = f" [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}]" if c["ci"] else " [—]"
    return f"{c['value']:.2f}{ci}"


def table_markdown(doc: dict[str, Any]) -> str:
    """Candidates (in full-data order) with each source's accuracy and rank, then the correlations."""
    cands = sorted(doc["candidates"], key=lambda c: (doc["ranks"]["full"][c], c))
    head = "| candidate | " + " | ".join(source_label(doc, s) for s in ("full", *PROXIES)) + " |"
    lines = [head, "|---|---|---|---|"]
    for c in cands:
        cells = []
        for s in ("full", *PROXIES):
            a = doc["accuracy"][c][s]
            cells.append(f"{100 * a['mean']:.2f} ± {100 * a['std']:.2f} ({a['n']}) #{doc['ranks'][s][c]}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    pct = f"{100 * doc['bootstrap']['level']:g} %"
    lines += ["", f"| proxy vs full data | Spearman ρ [{pct} CI] | Kendall τ [{pct} CI] |", "|---|---|---|"]
    for p in PROXIES:
        c = doc["correlation"][p]
        lines.append(f"| {source_label(doc, p)} | {_corr_text(c['spearman'])} | {_corr_text(c['kendall'])} |")
    b = doc["bootstrap"]
    valid = min(doc["correlation"][p][k]["valid"] for p in PROXIES for k in ("spearman", "kendall"))
    lines += ["", f"Test accuracy (%), mean ± std (n seeds) #rank (1 = best). Intervals: percentile bootstrap "
                  f"over the {len(doc['candidates'])} candidates, {b['resamples']} resamples (seed {b['seed']})"
              + (f"; resamples with all-equal accuracies are dropped (at least {valid} kept)."
                 if valid < b["resamples"] else ".")]
    return "\n".join(lines) + "\n"


def plot_figure(doc: dict[str, Any]) -> Any:
    """x: full-data accuracy, y: the proxies' accuracy, one named point per candidate; ρ/τ in the legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 5.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = [100 * doc["accuracy"][c]["full"]["mean"] for c in doc["candidates"]]
    for p, marker, color in zip(PROXIES, ("o", "s"), ("tab:blue", "tab:orange")):
        y = [100 * doc["accuracy"][c][p]["mean"] for c in doc["candidates"]]
        c = doc["correlation"][p]
        fmt = lambda v: f"{v:.2f}" if math.isfinite(v) else "—"  # noqa: E731
        ax.scatter(x, y, marker=marker, color=color, zorder=3,
                   label=f"{source_label(doc, p)}: ρ = {fmt(c['spearman']['value'])}, "
                         f"τ = {fmt(c['kendall']['value'])}")
        for xi, yi, name in zip(x, y, doc["candidates"]):
            ax.annotate(name, (xi, yi), xytext=(4, 3), textcoords="offset points", fontsize=7, color=color)
    ax.set_xlabel(f"test accuracy after training on the full data, {doc['modes']['full']} labels (%)")
    ax.set_ylabel("test accuracy after training on the proxy (%)")
    ax.set_title("Architecture ranking: proxy vs full data", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_png(doc: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    plot_figure(doc).savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def write_rank(report_dir: str | Path, doc: dict[str, Any], title: str = "") -> dict[str, Path]:
    """rank.json, rank.md and rank.png, each written atomically into ``report_dir``."""
    from ..io import write_bytes, write_json, write_text
    d = Path(report_dir)
    paths = {"json": d / "rank.json", "md": d / "rank.md", "png": d / "rank.png"}
    md = (f"# Architecture ranking{': ' + title if title else ''}\n\nDo the candidates rank on the proxy "
          f"as they rank trained on the full data?\n\n" + table_markdown(doc)
          + "".join(f"\n- {n}" for n in doc.get("notes") or []) + ("\n" if doc.get("notes") else ""))
    write_json(paths["json"], doc)
    write_text(paths["md"], md)
    write_bytes(paths["png"], plot_png(doc))
    return paths


# --------------------------------------------------------------------------- the sweep

@dataclass
class RankResult:
    doc: dict[str, Any]
    table: str
    json: Path
    md: Path
    plot: Path
    sweep: Any          # the evaluation's SweepResult (trials, results.json, Tune's result grid)

    def __repr__(self) -> str:
        return f"RankResult({self.md})\n{self.table}"


def check_candidates(candidates: Any) -> list[str]:
    """At least three distinct, known model specs, refused before any compute."""
    from ..models import canonical_spec
    if isinstance(candidates, str) or not isinstance(candidates, (list, tuple)) \
            or not all(isinstance(c, str) and c.strip() for c in candidates):
        raise ConfigError(f"candidates: {candidates!r} is invalid; expected a list of model specs")
    candidates = [c.strip() for c in candidates]
    if len(candidates) < MIN_CANDIDATES:
        raise ConfigError(f"candidates: {len(candidates)} given ({', '.join(candidates) or 'none'}); expected at "
                          f"least {MIN_CANDIDATES} model specs to rank")
    seen: dict[str, str] = {}
    for c in candidates:
        try:
            canon = canonical_spec(c)
            if canon.startswith("timm:"):
                from ..models.timm_nets import _timm   # imported only for timm candidates
                name = canon[len("timm:"):].split(":")[0].split(".")[0]
                if not _timm().is_model(name):
                    raise RayddError(f"unknown timm model {name!r} (see timm.list_models())")
        except RayddError as e:
            raise ConfigError(f"candidate {c!r} is unknown: {e}; see raydd models list --options") from None
        if canon in seen:
            raise ConfigError(f"candidates: {c!r} is the same model as {seen[canon]!r}; expected distinct specs")
        seen[canon] = c
    return candidates


def check_synset(synset_dir: Path) -> None:
    from ..synset import MANIFEST
    if not (synset_dir / MANIFEST).is_file():
        raise RayddError(f"no synset in {synset_dir} (no {MANIFEST}); distil one first (raydd distill) "
                         f"or pass --synset DIR")


def run_rank(cfg: Any, run_dir: str | Path, candidates: Sequence[str], *, synset_dir: str | Path | None = None,
             resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED, level: float = LEVEL,
             progress: bool = True) -> RankResult:
    """Rank ``candidates`` on RUN/synset (or ``synset_dir``), the random subset and the full data in
    one sweep into RUN/eval (so trials ``raydd evaluate`` already ran are reused), then report.

    The synset is evaluated in the first of ``evaluate.modes``; the random subset in that mode
    too when the sweep has it (soft needs RUN/teachers), else hard; the full data in hard."""
    from ..config import ModeArchs
    from ..models import build
    from ..pipeline import ensure_data
    from ..rundir import claim
    from ..tracking import tune_callbacks
    from .api import _seed_list
    from .sweep import execute
    from .tune_run import scoped_environ

    run_dir = Path(run_dir)
    candidates = check_candidates(candidates)
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 100:
        raise ConfigError(f"resamples: {resamples!r} is invalid; expected an integer >= 100")
    if not 0 < level < 1:
        raise ConfigError(f"level: {level!r} is invalid; expected a confidence level between 0 and 1")
    syn = Path(synset_dir) if synset_dir is not None else run_dir / "synset"
    check_synset(syn)
    base = cfg.evaluate
    base.validate("evaluate")
    mode = base.modes[0]
    ecfg = dataclasses.replace(base, archs=list(candidates), modes=[mode], mode_archs=ModeArchs(),
                               baselines=["random", "full"], ars=False,
                               kd=dataclasses.replace(base.kd), elf=dataclasses.replace(base.elf))
    claim(cfg, run_dir, "evaluate")
    ensure_data(cfg)
    from ..data import load_info
    info = load_info(cfg.data.dir)
    for c in candidates:   # options the data's shape refuses (a timm net too big for 8 px, ...), before trials
        try:
            build(c, int(info.shape[0]), int(info.num_classes), int(info.shape[1]))
        except RayddError as e:
            raise ConfigError(f"candidate {c!r} cannot be built for {'×'.join(map(str, info.shape))} images: "
                              f"{e}") from None
    if progress:
        print(f"[rank] {len(candidates)} candidates × (synset · {mode}, random subset, full data "
              f"{base.full_epochs or base.epochs} epochs) × {base.seeds} seeds", flush=True)
    with scoped_environ():
        res = execute(synset=syn, data=cfg.data.dir, ecfg=ecfg, seeds=_seed_list(base.seeds, cfg.seed),
                      lrs=base.lr_search or [base.lr], baselines=["random", "full"], resources=base.resources,
                      teachers_dir=run_dir if (run_dir / "teachers").exists() else None,
                      dsa_strategy=cfg.data.dsa_strategy, device=cfg.device, out_dir=run_dir / "eval",
                      storage_path=base.storage_path, name="eval", progress=progress, ray_cfg=cfg.ray,
                      title=f"{cfg.name} · rank", config=dataclasses.replace(cfg, evaluate=ecfg).to_dict(),
                      full_epochs=base.full_epochs, zca_of=(cfg, run_dir), val_seed=cfg.seed,
                      callbacks=tune_callbacks(cfg.tracking))
    return _report(res, candidates, mode, resamples=resamples, seed=seed, level=level, title=cfg.name,
                   full_epochs=base.full_epochs or base.epochs)


def _report(res: Any, candidates: list[str], mode: str, *, resamples: int, seed: int, level: float,
            title: str, full_epochs: int) -> RankResult:
    from ..io import read_json
    best = {(r["source"], r["arch"], r["mode"]): r for r in res.aggregate if r["best"]}
    random_mode = mode if any(k[0] == "random" and k[2] == mode for k in best) else "hard"
    modes = {"synset": mode, "random": random_mode, "full": "hard"}
    accuracy: dict[str, dict[str, dict[str, Any]]] = {}
    for c in candidates:
        accuracy[c] = {}
        for s in SOURCES:
            r = best.get((SOURCE_OF[s], c, modes[s]))
            if r is not None:
                accuracy[c][s] = {"mean": r["mean"], "std": r["std"], "n": r["n"], "seeds": r["seeds"],
                                  "lr": r["lr"]}
    doc = summarize(accuracy, candidates, modes=modes, resamples=resamples, seed=seed, level=level)
    notes = list(res.notes)
    if random_mode != mode:
        notes.append(f"the random subset is evaluated with {random_mode} labels (no {mode} column in the sweep)")
    notes.append(f"full data: {full_epochs} epochs (evaluate.full_epochs), hard labels")
    report_id = read_json(res.results_json)["report"]
    report_dir = Path(res.out_dir) / "reports" / report_id
    doc.update(notes=notes, report=report_id, results_json=str(report_dir / "results.json"))
    paths = write_rank(report_dir, doc, title)
    return RankResult(doc=doc, table=table_markdown(doc), json=paths["json"], md=paths["md"], plot=paths["png"],
                      sweep=res)
