"""The stages of a run and their order: prepare → teachers → distill → evaluate.

Each stage is resumable from the run directory and skips work that is already complete,
so ``raydd run`` can simply call them all in order.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .config import Config
from .errors import ConfigError
from .rundir import claim


def check_dir(path: Path, what: str) -> None:
    """Refuse a directory path that is a file or lies under one, before anything is written."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == path else f"lies under the file {p}"
                raise ConfigError(f"{what} {path} {where}; expected a directory")
            return


def run_dir_for(cfg: Config, out: str | Path | None) -> Path:
    return Path(out) if out is not None else Path("runs") / cfg.name


def _is_local(location: str) -> bool:
    return "://" not in location and not location.startswith("pipe:")


def ensure_data(cfg: Config) -> None:
    """Prepare the embedded digits when the data directory is local and not prepared yet; any other
    source is prepared on purpose with `raydd data prepare` (a typo in data.dir must not start a
    conversion into a new directory)."""
    loc = cfg.data.dir
    if not _is_local(loc):
        return
    check_dir(Path(loc), "data.dir")
    if (Path(loc) / "dataset.json").exists():
        return
    if cfg.data.source != "digits":
        src = f" --src {cfg.data.src}" if cfg.data.src else " --src RAW"
        raise ConfigError(f"data.dir {loc} holds no prepared dataset (no dataset.json); prepare "
                          f"{cfg.data.source} first: raydd data prepare {cfg.data.source}{src} --out {loc}")
    from .data import prepare
    print(f"[data] preparing {cfg.data.source} into {loc}", flush=True)
    t0 = time.time()
    prepare(cfg.data.source, loc, src=cfg.data.src, image_size=cfg.data.image_size,
            shard_size=cfg.data.shard_size)
    print(f"[data] done in {time.time() - t0:.1f}s", flush=True)


def stage_teachers(cfg: Config, run_dir: Path) -> list[dict]:
    claim(cfg, run_dir, "teachers")
    ensure_data(cfg)  # each stage starts Ray itself, only when it has work to do
    from .teachers import train_teachers
    t0 = time.time()
    records = train_teachers(cfg, run_dir)
    accs = [r["test_acc"] for r in records]
    print(f"[teachers] {len(records)} teachers in {run_dir / 'teachers'}; test accuracy "
          f"min {min(accs):.2%} / mean {sum(accs) / len(accs):.2%} / max {max(accs):.2%} "
          f"({time.time() - t0:.1f}s)", flush=True)
    return records


def stage_auxiliaries(cfg: Config, run_dir: Path) -> list[dict]:
    """MetaDD's auxiliary pool (``distill.metadd.enabled``), trained like the teachers."""
    claim(cfg, run_dir, "auxiliaries")
    ensure_data(cfg)
    from .auxiliaries import train_auxiliaries
    t0 = time.time()
    records = train_auxiliaries(cfg, run_dir)
    accs = ", ".join(f"{r['spec']} {r['test_acc']:.2%}" for r in records)
    print(f"[auxiliaries] {len(records)} in {run_dir / 'auxiliaries'}: {accs} ({time.time() - t0:.1f}s)",
          flush=True)
    return records


def stage_distill(cfg: Config, run_dir: Path):
    ensure_data(cfg)
    if cfg.distill.metadd.enabled and not (run_dir / "auxiliaries" / "auxiliaries.json").exists():
        stage_auxiliaries(cfg, run_dir)   # `raydd distill` alone: the pool first
    from .distillation import run_distill
    result = run_distill(cfg, run_dir)
    print(f"[distill] synset: {result.synset_dir} (grid: {result.grid_path}; {result.seconds:.0f} s)", flush=True)
    return result


def stage_evaluate(cfg: Config, run_dir: Path, synset_dir: Path | None = None):
    claim(cfg, run_dir, "evaluate")
    ensure_data(cfg)
    from .evaluate import run_evaluation
    result = run_evaluation(cfg, run_dir, synset_dir=synset_dir)
    print(result.table, flush=True)
    print(f"[evaluate] {result.results_md} · {result.plot}", flush=True)
    return result


def run(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """The whole job; every stage resumes or skips what ``run_dir`` already holds."""
    t0 = time.time()
    metadd = cfg.distill.metadd.enabled
    if metadd:   # a bad auxiliary spec is refused before any work
        from .auxiliaries import check_auxiliaries
        from .data import load_info
        ensure_data(cfg)
        check_auxiliaries(cfg, load_info(cfg.data.dir))
    teachers = stage_teachers(cfg, run_dir)
    auxiliaries = stage_auxiliaries(cfg, run_dir) if metadd else None
    distilled = stage_distill(cfg, run_dir)
    evaluated = stage_evaluate(cfg, run_dir)
    print(f"[run] finished in {time.time() - t0:.1f}s → {run_dir}", flush=True)
    return {"teachers": teachers, "auxiliaries": auxiliaries, "distill": distilled, "evaluate": evaluated}
