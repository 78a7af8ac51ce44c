"""Set several synsets' evaluations side by side, split into the architectures each was distilled
with, the auxiliaries MetaDD saw and the unseen rest, with what each distillation cost.

    python tools/compare_synsets.py APM=RUN/eval/reports/ID1/results.json \\
        pool=RUN/eval/reports/ID2/results.json MetaDD=RUN/eval/reports/ID3/results.json [--mode soft]

Each results.json is one ``raydd evaluate`` report; its synset's manifest gives the distillation's
cost (compute seconds per round, summed over groups, split into student training, image step,
teacher service and auxiliary services; each group worker's peak RSS). The random real subset is
read from the reports that hold one; every cell is mean ± population std over seeds, and a gap
smaller than the two stds together is marked as inside the noise (``~``). The seen set is the
auxiliaries of the report whose synset was made with MetaDD (``--seen`` overrides it).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydd.evaluate.metadd_split import _canonical, distilled_specs, seen_specs  # noqa: E402
from raydd.io import read_json  # noqa: E402
from raydd.synset import MANIFEST  # noqa: E402


def cells(doc: dict, mode: str) -> dict[tuple[str, str], dict]:
    """(source, canonical arch) -> the best-lr aggregate row of ``mode``."""
    return {(r["source"], _canonical(r["arch"])): r for r in doc["aggregate"] if r["best"] and r["mode"] == mode}


def fmt(r: dict | None) -> str:
    return f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}" if r else "—"


def cost(manifest: dict) -> str:
    groups = manifest.get("groups", [])
    rounds = max((g.get("rounds") or 0 for g in groups), default=0)
    split: dict[str, float] = {}
    for g in groups:
        for k, v in (g.get("seconds") or {}).items():
            split[k] = split.get(k, 0.0) + float(v)
    total = sum(split.values())
    parts = ", ".join(f"{k} {v / max(rounds, 1):.2f}" for k, v in split.items())
    rss = [g["memory"]["rss_mb"] for g in groups if g.get("memory")]
    share = f"; auxiliaries {split['auxiliaries'] / total:.0%} of it" if "auxiliaries" in split and total else ""
    return (f"{len(groups)} groups × {rounds} rounds; {total / max(rounds, 1):.2f} s of group compute per round "
            f"({parts}){share}; peak RSS per group worker "
            + (", ".join(f"{m:,.0f}" for m in rss) + " MB" if rss else "not recorded"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", help="NAME=path/to/results.json, one per synset")
    p.add_argument("--mode", default="soft", help="evaluation mode to compare (default soft)")
    p.add_argument("--seen", nargs="*", help="auxiliary specs (default: the MetaDD synset's)")
    args = p.parse_args(argv)
    runs = []
    for item in args.reports:
        name, sep, path = item.partition("=")
        if not sep:
            p.error(f"{item!r}: expected NAME=path/to/results.json")
        doc = read_json(path)
        manifest = read_json(Path(doc["synset"]) / MANIFEST)
        runs.append((name, doc, manifest))
    random = {}
    for _, doc, _ in runs:
        random.update({a: r for (s, a), r in cells(doc, args.mode).items() if s == "random"})
    # each synset's own distilled-with and auxiliary nets; one partition (their union) serves all
    # columns, so the part means run over the same architectures
    own = {n: ({_canonical(a) for a in distilled_specs(m.get("config", {}))},
               seen_specs(m.get("config", {})) or set()) for n, _, m in runs}
    seen = ({_canonical(s) for s in args.seen} if args.seen else set().union(*(v for _, v in own.values())))
    archs = list(dict.fromkeys(a for _, doc, _ in runs for a in doc["archs"]))
    distilled = set().union(*(d for d, _ in own.values())) - seen

    def part(a: str) -> str:
        c = _canonical(a)
        return "distilled with" if c in distilled else "seen (auxiliaries)" if c in seen else "unseen"

    def by_whom(a: str) -> str:
        """The part, naming the synsets it holds for when not all of them."""
        c, label = _canonical(a), part(a)
        if label == "unseen" or args.seen:
            return label
        which = [n for n, (d, aux) in own.items() if c in (d if label == "distilled with" else aux)]
        if len(which) == len(runs):
            return label
        return f"{label} ({', '.join(which)})" if label == "distilled with" else f"seen (auxiliaries of {', '.join(which)})"

    names = [n for n, _, _ in runs]
    print(f"| architecture ({args.mode}) | part | " + " | ".join(names) + " | random real |")
    print("|---|---|" + "---|" * (len(names) + 1))
    means: dict[tuple[str, str], list[float]] = {}
    for a in archs:
        c = _canonical(a)
        row = []
        for name, doc, _ in runs:
            r = cells(doc, args.mode).get(("distilled", c))
            noise = ""
            if r and c in random:
                noise = " ~" if abs(r["mean"] - random[c]["mean"]) < r["std"] + random[c]["std"] else ""
            row.append(fmt(r) + noise)
            if r:
                means.setdefault((part(a), name), []).append(100 * r["mean"])
        if c in random:
            means.setdefault((part(a), "random real"), []).append(100 * random[c]["mean"])
        print(f"| {a} | {by_whom(a)} | " + " | ".join(row) + f" | {fmt(random.get(c))} |")
    for label in ("distilled with", "seen (auxiliaries)", "unseen"):
        vals = [means.get((label, n)) for n in names + ["random real"]]
        if any(vals):
            print(f"| **{label} mean** | | " + " | ".join(
                f"{statistics.fmean(v):.2f} ({len(v)})" if v else "—" for v in vals) + " |")
    print()
    for name, doc, manifest in runs:
        print(f"- {name}: {doc['synset']}: {cost(manifest)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
