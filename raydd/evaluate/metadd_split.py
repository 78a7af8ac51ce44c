"""MetaDD's seen/unseen split of the results table (paper 000, Tables 1-2): the evaluated
architectures that were auxiliary nets while distilling ("seen"), the ones the images were
distilled with (the teachers' and students' main architecture), and the others ("unseen"), as the
mean of each column over each part."""
from __future__ import annotations

from typing import Any

from ..errors import RayddError


def _canonical(spec: str) -> str:
    from ..models import canonical_spec
    try:
        return canonical_spec(spec)
    except RayddError:
        return spec


def seen_specs(config: dict[str, Any]) -> set[str] | None:
    """Canonical specs of the run's auxiliaries; None when the synset was not made with MetaDD."""
    metadd = (config.get("distill") or {}).get("metadd") or {}
    if not metadd.get("enabled"):
        return None
    from ..config.metadd import DEFAULT_AUXILIARIES, PAPER_AUXILIARIES
    source = (config.get("data") or {}).get("source")
    specs = (config.get("auxiliaries") or {}).get("archs") or DEFAULT_AUXILIARIES.get(source, PAPER_AUXILIARIES)
    return {_canonical(s) for s in specs}


def distilled_specs(config: dict[str, Any]) -> list[str]:
    """The architectures the images were distilled with: the teachers' and the students' main one,
    or HMDC's model pair (its teachers only give the soft labels)."""
    distill = config.get("distill") or {}
    if distill.get("method") == "hmdc":
        hmdc = distill.get("hmdc") or {}
        return [a for a in (hmdc.get("model1"), hmdc.get("model2")) if a]
    teachers = (config.get("teachers") or {}).get("arch")
    return [a for a in (teachers, distill.get("arch") or teachers) if a]


def split_markdown(agg: list[dict[str, Any]], archs: list[str], columns: list[tuple[str, str]],
                   config: dict[str, Any]) -> str:
    """A second small table (empty text without MetaDD): per column, the mean over seen and unseen
    architectures of the best-lr cells, with how many architectures entered each mean."""
    seen = seen_specs(config)
    if seen is None:
        return ""
    from .report import column_label
    cells = {(r["arch"], r["source"], r["mode"]): r for r in agg if r["best"]}
    distilled = {_canonical(a) for a in distilled_specs(config)} - seen
    parts = {"distilled with": [a for a in archs if _canonical(a) in distilled],
             "seen (auxiliaries)": [a for a in archs if _canonical(a) in seen],
             "unseen": [a for a in archs if _canonical(a) not in seen | distilled]}
    parts = {k: v for k, v in parts.items() if v or k != "distilled with"}
    lines = ["| MetaDD split | " + " | ".join(column_label(c) for c in columns) + " |",
             "|" + "---|" * (len(columns) + 1)]
    for label, group in parts.items():
        row = []
        for source, mode in columns:
            means = [cells[(a, source, mode)]["mean"] for a in group if (a, source, mode) in cells]
            row.append(f"{100 * sum(means) / len(means):.2f} ({len(means)})" if means else "—")
        lines.append(f"| {label}: {', '.join(group) or 'none'} | " + " | ".join(row) + " |")
    return "\n" + "\n".join(lines) + "\n"
