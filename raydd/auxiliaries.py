"""Auxiliary pools (MetaDD, paper 000): one frozen classifier per ``auxiliaries.archs`` spec (or
the dataset's defaults), pre-trained on the real training shards.

Each auxiliary is the teacher machinery run for one spec (``raydd.teachers.train_teachers`` with
``teachers.arch`` = the spec, ``count`` = 1, the teachers' recipe): a Ray task, resumable,
checksummed safetensors and a json record with its test accuracy, in
``RUN/auxiliaries/aux-KK/teachers/``. All specs train at the same time (one driver thread each,
the tasks share the cluster). ``RUN/auxiliaries/auxiliaries.json`` is the pool's manifest.
Before any work, :func:`check_auxiliaries` builds every spec for the data and refuses one that
cannot give a CAM; :func:`load_auxiliaries` refuses nets trained for another dataset.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .config import Config
from .errors import ConfigError, RayddError
from .io import write_json

AUX_DIR = "auxiliaries"
INDEX = "auxiliaries.json"
SEED_STRIDE = 7919   # auxiliary k trains from seed (run seed + 7919·(k+1)): not any teacher's seed


def aux_name(k: int) -> str:
    return f"aux-{k:02d}"


def aux_specs(cfg: Config) -> list[str]:
    return cfg.auxiliaries.specs(cfg.data.source)


def _aux_config(cfg: Config, k: int, spec: str) -> Config:
    """The run's config as the teacher machinery sees it when training auxiliary ``k``."""
    t = dataclasses.replace(cfg.teachers, arch=spec, count=1,
                            epochs=cfg.auxiliaries.epochs or cfg.teachers.epochs)
    return dataclasses.replace(cfg, teachers=t, seed=cfg.seed + SEED_STRIDE * (k + 1))


def check_auxiliaries(cfg: Config, info: Any) -> list[str]:
    """The canonical specs; a spec that does not build for the data or has no CAM layer is a
    one-line :class:`ConfigError` naming ``auxiliaries.archs[k]``."""
    from .methods.metadd import CamNet
    from .models import build
    specs, given = [], bool(cfg.auxiliaries.archs)
    for k, spec in enumerate(aux_specs(cfg)):
        key = f"auxiliaries.archs[{k}]" if given else f"auxiliaries (default {k} for {cfg.data.source})"
        try:
            net = build(spec, info.in_channels, info.num_classes, info.image_size)
            CamNet(net)
        except RayddError as e:
            raise ConfigError(f"{key}: {e}") from None
        specs.append(net.spec)
    return specs


def train_auxiliaries(cfg: Config, run_dir: str | os.PathLike, *, progress: bool = True) -> list[dict]:
    """Train the missing auxiliaries (all specs in parallel); returns the pool's records."""
    from .data import load_info
    from .teachers import train_teachers

    run_dir = Path(run_dir)
    info = load_info(cfg.data.dir)
    specs = check_auxiliaries(cfg, info)
    root = run_dir / AUX_DIR
    root.mkdir(parents=True, exist_ok=True)
    if cfg.data.zca:   # the run's whitening, fitted once for teachers, auxiliaries and distillation
        from .data.zca import ZCA_FILE, ZCA_INDEX, ensure_zca
        ensure_zca(cfg, run_dir, info)
        for k in range(len(specs)):
            (root / aux_name(k)).mkdir(exist_ok=True)
            for name in (ZCA_FILE, ZCA_INDEX):
                shutil.copy2(run_dir / name, root / aux_name(k) / name)

    if not all(_looks_done(root / aux_name(k), spec) for k, spec in enumerate(specs)):
        from .raycluster import init_ray
        init_ray(cfg.ray)   # once, before the driver threads (each would otherwise race to start it)

    def one(k: int) -> dict:
        (rec,) = train_teachers(_aux_config(cfg, k, specs[k]), root / aux_name(k), progress=False)
        if progress:
            print(f"[auxiliaries] {aux_name(k)} {specs[k]}: test accuracy {rec['test_acc']:.2%}",
                  file=sys.stderr, flush=True)
        return rec

    with ThreadPoolExecutor(max(1, len(specs))) as pool:
        recs = list(pool.map(one, range(len(specs))))
    return _write_manifest(root, info, specs, recs)


def _looks_done(where: Path, spec: str) -> bool:
    """A record of this spec with its file present (train_teachers re-checks it fully)."""
    from .io import read_json
    from .teachers import INDEX as TEACHER_INDEX
    from .teachers import TEACHERS_DIR
    try:
        recs = read_json(where / TEACHERS_DIR / TEACHER_INDEX)["teachers"]
        return any(r["spec"] == spec and (where / TEACHERS_DIR / r["file"]).is_file() for r in recs)
    except (RayddError, KeyError, TypeError):
        return False


def _write_manifest(root: Path, info: Any, specs: list[str], recs: list[dict]) -> list[dict]:
    from .teachers import TEACHERS_DIR
    out = [{"index": k, "name": aux_name(k), "spec": spec,
            "file": f"{aux_name(k)}/{TEACHERS_DIR}/{rec['file']}", "sha256": rec["sha256"],
            "test_acc": rec["test_acc"], "epochs": rec["epochs"], "seed": rec["seed"],
            "train_seconds": rec.get("train_seconds")}
           for k, (spec, rec) in enumerate(zip(specs, recs))]
    write_json(root / INDEX, {"dataset": _dataset(info), "auxiliaries": out})
    return out


def _dataset(info: Any) -> dict:
    return {"source": info.source, "classes": info.classes, "shape": list(info.shape)}


def load_auxiliaries(cfg: Config, run_dir: str | os.PathLike, info: Any) -> tuple[list[torch.nn.Module], list[dict]]:
    """The pool's nets (CPU, eval) after checking checksums, specs and that each was trained for
    this dataset (source, classes and shape); a mismatch is a one-line :class:`RayddError`."""
    from .io import read_json
    from .teachers import INDEX as TEACHER_INDEX
    from .teachers import TEACHERS_DIR, load_teachers

    root = Path(run_dir) / AUX_DIR
    want = _dataset(info)
    specs = check_auxiliaries(cfg, info)
    models, records = [], []
    for k, spec in enumerate(specs):
        where = root / aux_name(k)
        index = where / TEACHERS_DIR / TEACHER_INDEX
        if not index.is_file():
            raise RayddError(f"auxiliary {aux_name(k)} ({spec}) is not trained in {where}; "
                             f"`raydd run CONFIG` or `raydd distill CONFIG` trains them first")
        got = read_json(index).get("dataset")
        if got != want:
            raise RayddError(f"auxiliary {aux_name(k)} ({spec}) was trained for {_describe(got)} but the data is "
                             f"{_describe(want)}; retrain it (delete {where}) or use a new --out")
        (net,), (rec,) = load_teachers(where, expect_classes=info.num_classes, expect_shape=tuple(info.shape))
        if rec["spec"] != spec:
            raise RayddError(f"auxiliary {aux_name(k)} is {rec['spec']} but auxiliaries lists {spec}; "
                             f"retrain it (delete {where}) or restore the config")
        models.append(net)
        records.append({"index": k, "name": aux_name(k), **{key: rec[key] for key in ("spec", "sha256", "test_acc")},
                        "file": str(where / TEACHERS_DIR / rec["file"])})
    return models, records


def _describe(dataset: Any) -> str:
    if not isinstance(dataset, dict):
        return "an unknown dataset"
    shape = "x".join(str(v) for v in dataset.get("shape") or [])
    return f"{dataset.get('source')} ({len(dataset.get('classes') or [])} classes, {shape})"
