"""What the trials of a sweep train on, prepared once before them: the synset (checked against
the data), the random baselines, the whole-data baseline, ELF features — each with a fingerprint
that goes into the keys of the trials using it.

Sources: ``distilled`` (the synset), ``random`` (a random real subset of the same IPC per seed,
hard labels and — when teachers exist — soft labels from the first teacher, the synset's rule)
and ``full`` (the whole training set, hard labels). Files under the evaluation directory ``OUT``
(``RUN/eval`` for ``raydd evaluate``)::

    random/seed-S/                 the random baseline of seed S (a synset: images, labels,
                                   soft_labels, elf_features), rebuilt when its inputs change
    val/                           the validation split held out of the training data (holdout)
    curves/KEY.csv                 each trial's intermediate reports (epoch, losses, val accuracy)
    elf_feature_model.{safetensors,json}   the ELF feature model, trained once on real data
    elf_features.{safetensors,json}        ELF features of the distilled synset (kept beside it,
                                   so the synset and its checksum stay untouched)
    tune/NAME-HASH/                Tune experiments (``storage_path`` may point elsewhere)
    results.{json,csv,md}, plot.png
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import EvalConfig, Resources
from ..errors import DataError, RayddError
from ..io import read_json
from ..synset import MANIFEST, Synset, load_synset, save_synset
from .baselines import random_subset
from .elf import distilled_features, elf_refusal, ensure_feature_model, shape_text
from .holdout import ensure_val, val_per_class


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tensor_digest(s: Synset) -> str:
    h = hashlib.sha256()
    for k, t in sorted(s.tensors().items()):
        h.update(k.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(info: Any) -> str:
    return digest({"shards": getattr(info, "shards", None), "shape": list(info.shape),
                  "classes": info.num_classes, "mean": list(info.mean), "std": list(info.std)})


@dataclass
class Prepared:
    synset_dir: Path
    synset: Synset
    synset_sha: str
    info: Any
    ipc: int
    runs: list[tuple[str, str]]          # (source, mode) pairs to run
    columns: list[tuple[str, str]]
    notes: list[str]
    skip: set[tuple[str, str]]           # (arch, mode) pairs that cannot run (ELF without a split)
    sources: dict[str, dict[str, Any]]   # per source: synset path / features path / fingerprint
    val: dict[str, Any] | None = None    # the validation split (holdout.ensure_val), if any


def prepare_sources(synset: str | Path | Synset, data: str, ecfg: EvalConfig, seeds: list[int], baselines: list[str],
             teachers_dir: Path | None, dsa_strategy: str, out: Path, resources: Resources, device: str,
             progress: bool, zca: dict[str, str] | None, ray_cfg: Any, needs_val: bool = False,
             val_seed: int = 0) -> Prepared:
    from ..data import load_info
    from ..models import build

    info = load_info(data)
    shape, classes = tuple(int(v) for v in info.shape), int(info.num_classes)
    if isinstance(synset, Synset):
        synset.check()
        syn_dir = out / "synset"
        save_synset(syn_dir, synset)
    else:
        syn_dir = Path(synset)
    syn = load_synset(syn_dir)
    manifest = read_json(syn_dir / MANIFEST)
    syn_sha = manifest.get("sha256") or tensor_digest(syn)
    if tuple(syn.shape) != shape:
        raise DataError(f"synset {syn_dir} holds {shape_text(syn.shape)} images but the data {data} is {shape_text(shape)}")
    if syn.num_classes != classes:
        raise DataError(f"synset {syn_dir} has {syn.num_classes} classes but the data {data} has {classes}; "
                        f"expected num_classes {classes} in its {MANIFEST}")
    if int(syn.labels.max()) >= classes:
        raise DataError(f"synset {syn_dir} has labels up to {int(syn.labels.max())}, but the data {data} has "
                        f"{classes} classes; expected labels in 0..{classes - 1}")
    per_class = torch.bincount(syn.labels, minlength=classes)
    ipc = max(1, round(syn.labels.numel() / classes))
    notes: list[str] = []
    packing = (manifest.get("counts") or {}).get("packing")
    if isinstance(packing, dict) and isinstance(packing.get("stored_per_class"), int):
        # A packed synset (HMDC's multi-formation) stores fewer, full-size images than it trains on; the
        # random subset gets the same storage budget, as IDC/HMDC compare: stored images per class.
        ipc = max(1, packing["stored_per_class"])
        notes.append(f"the synset packs {packing.get('per_stored')} images into each stored one; the random "
                     f"baseline uses its storage budget, {ipc} real images per class")
    if int(per_class.min()) != int(per_class.max()):
        notes.append(f"the synset has {int(per_class.min())}–{int(per_class.max())} images per class; "
                     f"the random baseline uses {ipc} per class")
    modes = list(ecfg.modes)
    if "soft" in modes and syn.soft_labels is None:
        raise RayddError(f"mode 'soft' needs soft labels, but the synset {syn_dir} has none; use modes: [hard]")
    if syn.soft_labels is not None and tuple(syn.soft_labels.shape[1:]) != (classes,):
        raise DataError(f"synset {syn_dir} soft labels have {syn.soft_labels.shape[1]} classes, the data {classes}")

    teachers, teacher_sha = None, None
    if "random" in baselines:
        if teachers_dir is not None:
            from ..teachers import load_teachers
            models, records = load_teachers(teachers_dir, expect_classes=classes, expect_shape=shape)
            teachers, teacher_sha = models[0], records[0].get("sha256")
        else:
            notes.append("random · soft omitted: no teachers (RUN/teachers) to label the random subset")
    random_modes = [m for m in dict.fromkeys(modes + ["hard", "soft"]) if m != "soft" or teachers is not None]

    runs = [("distilled", m) for m in modes]
    columns = []
    for m in modes:
        columns.append(("distilled", m))
        if "random" in baselines and m in random_modes:
            columns.append(("random", m))
    if "random" in baselines:
        runs += [("random", m) for m in random_modes]
        columns += [("random", m) for m in random_modes if m not in modes]
    if "full" in baselines:
        runs.append(("full", "hard"))
        columns.append(("full", "hard"))

    fp = digest([data_fingerprint(info), zca["sha256"] if zca else None])
    per_class = val_per_class(ecfg.val_size, needs_val, info)
    val = ensure_val(out, info, fp, per_class, val_seed, progress) if per_class else None
    held = [val["sha256"]] if val else []   # sources drawn from the training split change with it
    sources: dict[str, dict[str, Any]] = {
        # templates filled with str.format(seed=…) in each trial: braces of the paths themselves are escaped
        "distilled": {"synset": _literal(syn_dir.resolve()), "features": None, "fingerprint": [syn_sha, fp],
                      "images": int(syn.labels.numel())},
        "random": {"synset": _literal((out / "random").resolve()) + "/seed-{seed}", "features": None,
                   "fingerprint": [fp, teacher_sha, *held], "images": ipc * classes},
        "full": {"fingerprint": [fp, *held] if held else fp}}

    skip: set[tuple[str, str]] = set()
    feature_model, feature_sha = None, None
    if "elf" in modes:
        feature_model, feature_sha, fshape = ensure_feature_model(ecfg, data, info, fp, dsa_strategy, out,
                                                                resources, device, zca, ray_cfg, progress)
        fshapes = {fshape, tuple(syn.elf_features.shape[1:]) if syn.elf_features is not None else fshape}
        elf_archs = [a for a in ecfg.archs if ecfg.mode_archs.allows("elf", a)]  # the others never try it
        for arch in elf_archs:
            net = build(arch, shape[0], classes, shape[1])
            reason = next((r for r in (elf_refusal(net, shape, fs) for fs in fshapes) if r), "")
            if reason:
                skip.add((arch, "elf"))
                notes.append(f"elf not evaluated for {arch}: {reason}")
        if len(skip) == len(elf_archs):
            raise RayddError(f"mode 'elf' fits none of the architectures {', '.join(elf_archs)}; "
                             f"{notes[-1].split(': ', 1)[1]}")
        if syn.elf_features is None:
            sources["distilled"]["features"] = str(distilled_features(syn, syn_sha, feature_model, feature_sha,
                                                                       out).resolve())
            sources["distilled"]["elf"] = feature_sha
        else:
            notes.append("elf uses the feature maps stored with the synset")
        sources["random"]["elf"] = feature_sha   # in the keys of elf trials only
    if "random" in baselines:
        for seed in seeds:
            random_subset(out / "random" / f"seed-{seed}", info, fp, ipc, seed, teachers, teacher_sha,
                           feature_model if "elf" in random_modes else None, feature_sha, zca, progress, val)
    if val:
        notes.append(f"validation: {len(val['samples'])} held-out training images ({per_class} per class); "
                     f"the baselines train without them")
    return Prepared(syn_dir, syn, syn_sha, info, ipc, runs, columns, notes, skip, sources, val)


def _literal(path: Path) -> str:
    """``path`` as a str.format template that yields ``path`` itself."""
    return str(path).replace("{", "{{").replace("}", "}}")
