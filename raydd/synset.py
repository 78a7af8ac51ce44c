"""The synthetic dataset on disk: ``DIR/synset.safetensors`` + ``DIR/manifest.json``.

Tensor keys: ``images`` (N×C×H×W, normalised space), ``labels`` (N, int64), and optionally
``soft_labels`` (N×classes teacher logits), ``groups`` (N, int64 provenance) and ``elf_features``
(N×…, features of the un-augmented images from the ELF feature model).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import RayddError
from .io import load_tensors, read_json, save_tensors, write_json

TENSOR_FILE = "synset.safetensors"
MANIFEST = "manifest.json"
OPTIONAL_KEYS = ("soft_labels", "groups", "elf_features")


@dataclass
class Synset:
    images: torch.Tensor
    labels: torch.Tensor
    soft_labels: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    elf_features: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes", int(self.labels.max()) + 1))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def check(self) -> None:
        """Refuse what would poison training: non-finite values or ragged tensors."""
        n = self.images.shape[0]
        if self.labels.shape != (n,):
            raise RayddError(f"synset labels have shape {tuple(self.labels.shape)}, expected ({n},)")
        if n and int(self.labels.min()) < 0:
            raise RayddError(f"synset labels go down to {int(self.labels.min())}; expected class indices >= 0")
        for key in ("images",) + OPTIONAL_KEYS:
            t = getattr(self, key)
            if t is None:
                continue
            if t.shape[0] != n:
                raise RayddError(f"synset {key} has {t.shape[0]} rows, expected {n}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise RayddError(f"synset {key} holds non-finite values; refusing to use it")

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"images": self.images.float(), "labels": self.labels.long()}
        for key in OPTIONAL_KEYS:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def save_synset(directory: str | Path, synset: Synset, manifest: dict[str, Any] | None = None) -> Path:
    """Write tensors then the manifest (with their checksum); the manifest's presence marks completion."""
    synset.check()
    directory = Path(directory)
    sha = save_tensors(directory / TENSOR_FILE, synset.tensors())
    counts = torch.bincount(synset.labels.long(), minlength=synset.num_classes).tolist()
    doc = {
        "file": TENSOR_FILE,
        "sha256": sha,
        "num_images": int(synset.images.shape[0]),
        "num_classes": synset.num_classes,
        "shape": list(synset.shape),
        "per_class": counts,
        "keys": sorted(synset.tensors()),
        **synset.meta,
        **(manifest or {}),
    }
    write_json(directory / MANIFEST, doc)
    return directory


def load_synset(directory: str | Path) -> Synset:
    directory = Path(directory)
    if not (directory / MANIFEST).exists():
        raise RayddError(f"no synset at {directory}: {MANIFEST} is missing (distillation not finished?)")
    doc = read_json(directory / MANIFEST)
    if not isinstance(doc, dict):
        raise RayddError(f"{directory / MANIFEST} holds a JSON {type(doc).__name__}; expected an object "
                         f"with file, sha256 and num_classes")
    t = load_tensors(directory / doc.get("file", TENSOR_FILE), sha256=doc.get("sha256"))
    if "images" not in t or "labels" not in t:
        raise RayddError(f"{directory / TENSOR_FILE} lacks 'images' or 'labels'")
    syn = Synset(images=t["images"], labels=t["labels"].long(),
                 **{k: t.get(k) for k in OPTIONAL_KEYS}, meta=doc)
    syn.check()
    return syn
