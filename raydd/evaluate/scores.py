"""DD-Ranking's honest scores (Li et al., arXiv 2505.13300) from the trials a sweep already ran.

Soft labels and augmentation can lift random real images to a synset's accuracy, so accuracy alone
does not say how informative the synset is. Per architecture, with accuracies as fractions:

- HLR = Acc(full, hard) − Acc(synset, hard): what the synset's images miss without label help;
- IOR(mode) = Acc(synset, mode) − Acc(random subset, mode), under the same protocol
  (hard, soft, kd or elf);
- α = w·IOR − (1−w)·HLR (w = 0.5), LRS = (e^α − e^−1)/(e − e^−1);
- β = γ·(Acc_syn,aug − Acc_rdm,aug) + (1−γ)·(Acc_syn,no-aug − Acc_rdm,no-aug) (γ = 0.5),
  ARS = (e^β − e^−1)/(e − e^−1), per mode.

α and β lie in [−1, 1], so LRS and ARS lie in [0, 1]; 1/(e+1) ≈ 0.269 means no gain over random.

Seeds: each input accuracy is first averaged over its seeds (per source, arch, mode, augmentation;
with an lr search, the lr with the best mean is taken, as in the accuracy table); the scores are
then computed from those means. The ``ddranking`` package instead scores each evaluation run and
averages the scores: identical for HLR and IOR, and for LRS/ARS it differs only by the curvature of
e^x over the seed spread. Every score keeps its inputs (mean, std over seeds, n) beside it.

Augmentation: a trial's ``dsa`` field says whether DSA was on; a trial without it ran under the
sweep's ``evaluate.dsa`` setting (``default_dsa``). HLR and IOR use the trials under that setting;
ARS needs both settings. A score whose inputs are missing is absent, never 0.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

W_LRS = 0.5      # w: weight of IOR against HLR
GAMMA_ARS = 0.5  # γ: weight of the augmented gap against the non-augmented one

_Key = tuple[str, str, str, bool]  # (source, arch, mode, dsa)


def normalise(x: float) -> float:
    """Map a gain in [−1, 1] onto [0, 1]: (e^x − e^−1)/(e − e^−1)."""
    return (math.exp(x) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


def trial_dsa(trial: dict[str, Any], default_dsa: bool = True) -> bool:
    """Whether DSA was on in ``trial``: its ``dsa`` field, else the sweep's ``evaluate.dsa``."""
    return bool(trial["dsa"]) if trial.get("dsa") is not None else bool(default_dsa)


def mean_accuracies(trials: Iterable[dict[str, Any]], default_dsa: bool = True) -> dict[_Key, dict[str, Any]]:
    """Mean ± population std of finished trials per (source, arch, mode, dsa), at the best-mean lr:
    the accuracy table's aggregate, once per augmentation setting."""
    from .report import aggregate   # report imports this module

    trials = [t for t in trials if isinstance(t.get("test_acc"), (int, float))]
    best: dict[_Key, dict[str, Any]] = {}
    for dsa in (True, False):
        for r in aggregate(t for t in trials if trial_dsa(t, default_dsa) == dsa):
            if r["best"]:
                best[(r["source"], r["arch"], r["mode"], dsa)] = {k: r[k] for k in ("mean", "std", "n", "lr")}
    return best


def compute_scores(trials: Iterable[dict[str, Any]], default_dsa: bool = True, *, w: float = W_LRS,
                   gamma: float = GAMMA_ARS) -> dict[str, dict[str, Any]]:
    """Per architecture: ``hlr``, ``modes`` (per mode: ``ior``, and ``alpha``/``lrs`` when HLR exists)
    and ``ars`` (per mode: ``beta``/``ars`` with both augmentation settings); only what the trials allow.

    Every score is a fraction (LRS/ARS in [0, 1] for gains in [−1, 1]); its ``inputs`` hold the
    mean accuracies it came from. Architectures with no computable score are left out.
    """
    acc = mean_accuracies(trials, default_dsa)
    on = bool(default_dsa)
    archs = sorted({k[1] for k in acc})
    out: dict[str, dict[str, Any]] = {}
    for arch in archs:
        entry: dict[str, Any] = {}
        full, syn_hard = acc.get(("full", arch, "hard", on)), acc.get(("distilled", arch, "hard", on))
        hlr = None
        if full is not None and syn_hard is not None:
            hlr = full["mean"] - syn_hard["mean"]
            entry["hlr"] = {"value": hlr, "inputs": {"full_hard": full, "distilled_hard": syn_hard}}
        modes = sorted({k[2] for k in acc if k[0] == "distilled" and k[1] == arch})
        per_mode: dict[str, Any] = {}
        ars: dict[str, Any] = {}
        for mode in modes:
            syn, rdm = acc.get(("distilled", arch, mode, on)), acc.get(("random", arch, mode, on))
            if syn is not None and rdm is not None:
                ior = syn["mean"] - rdm["mean"]
                rec: dict[str, Any] = {"ior": ior, "inputs": {"distilled": syn, "random": rdm}}
                if hlr is not None:
                    alpha = w * ior - (1 - w) * hlr
                    rec.update(alpha=alpha, lrs=normalise(alpha))
                per_mode[mode] = rec
            cells = {(src, d): acc.get((src, arch, mode, d)) for src in ("distilled", "random") for d in (True, False)}
            if all(c is not None for c in cells.values()):
                gap_aug = cells[("distilled", True)]["mean"] - cells[("random", True)]["mean"]
                gap_plain = cells[("distilled", False)]["mean"] - cells[("random", False)]["mean"]
                beta = gamma * gap_aug + (1 - gamma) * gap_plain
                ars[mode] = {"beta": beta, "ars": normalise(beta), "gap_aug": gap_aug, "gap_no_aug": gap_plain,
                             "inputs": {f"{src}_{'aug' if d else 'no_aug'}": c for (src, d), c in cells.items()}}
        if per_mode:
            entry["modes"] = per_mode
        if ars:
            entry["ars"] = ars
        if entry:
            out[arch] = entry
    return out


def scores_markdown(scores: dict[str, dict[str, Any]], archs: Iterable[str] | None = None) -> str:
    """One row per (architecture, mode): HLR and IOR in percentage points, LRS and ARS ×100;
    '' when nothing is computable."""
    if not scores:
        return ""
    order = [a for a in (archs or []) if a in scores] + sorted(a for a in scores if a not in set(archs or []))
    lines = ["| architecture | HLR | IOR (mode) | LRS | ARS |", "|---|---|---|---|---|"]
    for arch in order:
        s = scores[arch]
        hlr = f"{100 * s['hlr']['value']:.2f}" if "hlr" in s else "—"
        modes = sorted(set(s.get("modes", {})) | set(s.get("ars", {})))
        for mode in modes or [None]:
            m = s.get("modes", {}).get(mode, {})
            ior = f"{100 * m['ior']:+.2f} ({mode})" if "ior" in m else (f"— ({mode})" if mode else "—")
            lrs = f"{100 * m['lrs']:.2f}" if "lrs" in m else "—"
            a = s.get("ars", {}).get(mode)
            ars = f"{100 * a['ars']:.2f}" if a else "—"
            lines.append(f"| {arch} | {hlr} | {ior} | {lrs} | {ars} |")
    return "\n".join(lines) + "\n"


SCORES_NOTE = ("HLR = full·hard − synset·hard and IOR = synset − random under the same mode, in points; "
               "LRS = (e^α − e^−1)/(e − e^−1) with α = ½IOR − ½HLR, and ARS likewise from the "
               "synset−random gaps with and without DSA, both ×100 (26.89 = no gain over random); "
               "seed means first (DD-Ranking, arXiv 2505.13300).")
