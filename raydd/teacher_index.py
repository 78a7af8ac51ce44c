"""The teacher pool's files: ``RUN/teachers/teacher-NNN.safetensors`` and the index
``RUN/teachers/teachers.json`` that lists them (spec, seed, recipe, test accuracy, sha256).

A finished teacher is reused only when its record asks for the same training and its file still
matches its checksum. The index records, as synset manifests do, the versions and git commit that
last trained into it (``provenance``) and each teacher's ``created`` time; indexes of older runs
lack both and still load. ``load_teachers`` verifies checksums, specs and the data's shape.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import RayddError
from .io import load_tensors, read_json, save_tensors, sha256_file, write_json
from .synset import utc_now

TEACHERS_DIR = "teachers"
INDEX = "teachers.json"


def teacher_name(index: int) -> str:
    return f"teacher-{index:03d}"


def read_index(out: Path) -> tuple[dict[int, dict], dict | None]:
    """Records and provenance of an earlier run; an unreadable index only means everything is
    retrained, and one without provenance (an older raydd) is read as None."""
    try:
        doc = read_json(out / INDEX)
        records = {int(r["index"]): r for r in doc["teachers"]}
    except (RayddError, KeyError, TypeError, ValueError, AttributeError):
        return {}, None
    prov = doc.get("provenance")
    return records, prov if isinstance(prov, dict) else None


def write_index(out: Path, dataset: dict, records: dict[int, dict], prov: dict | None = None) -> None:
    doc = {"dataset": dataset, "teachers": [records[i] for i in sorted(records)]}
    if prov is not None:
        doc["provenance"] = prov
    write_json(out / INDEX, doc)


def trained_provenance(prev: dict | None, mine: dict) -> dict:
    """The index's provenance once this process has trained a teacher into it: this process's
    versions and git commit (``mine``, from :func:`raydd.synset.provenance`, asked once per run),
    ``updated`` now, ``created`` kept from the first writer."""
    now = utc_now()
    return {**mine, "created": (prev or {}).get("created", now), "updated": now}


def reusable(rec: dict | None, want: dict, out: Path) -> bool:
    """A finished teacher of these settings: reused. A finished one whose file is gone or changed
    is an error, not a silent retrain: the run's synset and baselines may have been made with it."""
    if rec is None or any(rec.get(k) != v for k, v in want.items()):
        return False
    path = out / rec.get("file", "")
    if not path.is_file():
        problem = "is missing"
    elif sha256_file(path) != rec.get("sha256"):
        problem = "fails its sha256 in teachers.json (changed or damaged)"
    else:
        return True
    raise RayddError(f"teacher file {path} {problem}; to retrain on purpose, delete {out} and the "
                     f"stages made with it ({out.parent}/distill, synset, eval), or use a new --out")


def same_dataset(out: Path, dataset: dict) -> bool:
    try:
        return read_json(out / INDEX).get("dataset") == dataset
    except (RayddError, AttributeError):
        return False


def save_teacher(out: Path, index: int, state: dict, acc: float, seconds: float, cpu_seconds: float,
                  want: dict) -> dict:
    name = teacher_name(index)
    meta = {"spec": want["spec"], "seed": str(want["seed"]), "num_classes": str(want["num_classes"]),
            "shape": "x".join(map(str, want["shape"]))}
    sha = save_tensors(out / f"{name}.safetensors", state, metadata=meta)
    return {"index": index, "file": f"{name}.safetensors", **want, "test_acc": acc,
            "train_seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1), "sha256": sha,
            "created": utc_now()}


# ---------------------------------------------------------------------------- loading

def _shape_text(shape) -> str:
    return "x".join(str(int(v)) for v in shape)


def load_teachers(run_dir: str | os.PathLike, *, expect_classes: int | None = None,
                  expect_shape: tuple[int, int, int] | None = None) -> tuple[list[torch.nn.Module], list[dict]]:
    """The run's teachers on the CPU in eval mode, after checking checksum, spec and data fit."""
    from .models import build

    out = Path(run_dir) / TEACHERS_DIR
    if not (out / INDEX).is_file():
        raise RayddError(f"no teachers in {out}; train them first with `raydd teachers train CONFIG`")
    doc = read_json(out / INDEX)
    records = (doc.get("teachers") if isinstance(doc, dict) else None) or []
    if not records:
        raise RayddError(f"{out / INDEX} lists no finished teachers; train them with `raydd teachers train CONFIG`")
    models = []
    for i, rec in enumerate(records):
        _check_record(rec, i, out / INDEX)
        name = Path(rec["file"]).stem
        shape = tuple(rec["shape"])
        if (expect_classes is not None and rec["num_classes"] != expect_classes) or \
                (expect_shape is not None and shape != tuple(expect_shape)):
            data_shape = _shape_text(expect_shape) if expect_shape is not None else _shape_text(shape)
            data_classes = expect_classes if expect_classes is not None else rec["num_classes"]
            raise RayddError(f"{name} is {rec['spec']} for {rec['num_classes']} classes at {_shape_text(shape)} "
                             f"but the data is {data_shape} with {data_classes} classes")
        state = load_tensors(out / rec["file"], sha256=rec["sha256"])
        model = build(rec["spec"], shape[0], rec["num_classes"], shape[1])
        if model.spec != rec["spec"]:
            raise RayddError(f"{name} was trained as {rec['spec']} but that spec now builds {model.spec}")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise RayddError(f"{name}: its weights do not fit {rec['spec']} "
                             f"({str(e).strip().splitlines()[0]})") from None
        models.append(model.eval())
    return models, records


RECORD_KEYS = {"file": str, "spec": str, "num_classes": int, "shape": list, "sha256": str}


def _check_record(rec: Any, i: int, index: Path) -> None:
    """A record edited or damaged by hand is an error naming the record and key, not a traceback."""
    if not isinstance(rec, dict):
        raise RayddError(f"{index}: teachers[{i}] is a JSON {type(rec).__name__}; expected an object")
    for key, kind in RECORD_KEYS.items():
        if key not in rec:
            raise RayddError(f"{index}: teachers[{i}] lacks {key!r}; retrain with `raydd teachers train CONFIG`")
        if not isinstance(rec[key], kind) or isinstance(rec[key], bool):
            raise RayddError(f"{index}: teachers[{i}].{key} is {rec[key]!r}; expected a {kind.__name__}")
    if len(rec["shape"]) != 3 or not all(isinstance(v, int) and v > 0 for v in rec["shape"]):
        raise RayddError(f"{index}: teachers[{i}].shape is {rec['shape']!r}; expected [channels, height, width]")
