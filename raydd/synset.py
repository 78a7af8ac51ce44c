"""The synthetic dataset on disk: ``DIR/synset.safetensors`` + ``DIR/manifest.json``.

Tensor keys: ``images`` (N×C×H×W, normalised space), ``labels`` (N, int64), and optionally
``soft_labels`` (N×classes teacher logits), ``groups`` (N, int64 provenance) and ``elf_features``
(N×…, features of the un-augmented images from the ELF feature model).

A synset is usable on its own, without the data directory it came from: the manifest records the
normalisation (``normalisation.mean/std``) and, when the images are ZCA-whitened, ``DIR/zca.safetensors``
holds the whitening (see :mod:`raydd.data.zca`), so :attr:`Synset.pixels` turns the stored images back
into pixels. Synsets written before that fall back to the data directory named in their manifest.

    syn = raydd.load_synset("runs/digits/synset")
    loader = syn.dataloader(64, augment="color_crop_cutout_flip_scale_rotate", soft_labels=True)
    for x, y, soft in loader: ...       # x normalised (as stored), DSA per image
"""
from __future__ import annotations

import datetime
import functools
import importlib.metadata
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.utils.data

from .errors import RayddError
from .io import load_tensors, read_json, save_tensors, write_json

TENSOR_FILE = "synset.safetensors"
MANIFEST = "manifest.json"
ZCA_FILE = "zca.safetensors"
OPTIONAL_KEYS = ("soft_labels", "groups", "elf_features")


@dataclass
class Synset:
    images: torch.Tensor
    labels: torch.Tensor
    soft_labels: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    elf_features: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # How the images were made from pixels: per-channel mean/std, then the ZCA whitening (or None).
    # Saved with the synset; a loaded synset reads its ZCA file only on first use (it can be large).
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    zca: Any = None                      # raydd.data.zca.ZCA
    directory: Path | None = field(default=None, repr=False, compare=False)

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

    # ------------------------------------------------------------------ as a dataset
    @property
    def pixels(self) -> torch.Tensor:
        """The images in pixel units (ZCA undone, then ``x·std + mean``): [0, 1] for real images.
        Not clamped: distilled pixels may stray a little outside [0, 1], and ``from_pixels`` of
        this gives back ``images`` exactly (to float precision). Clamp for display; export does."""
        return self.to_pixels(self.images)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """N×C×H×W images in this synset's normalised (and whitened) space → pixel units."""
        return _to_pixels(x, *self.normalisation())

    def from_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """N×C×H×W pixel-unit images → this synset's space: ``(x - mean) / std``, then ZCA."""
        mean, std, zca = self.normalisation()
        z = (x - mean.to(x)) / std.to(x)
        return zca.transform(z) if zca is not None else z

    def to_dataset(self, *, soft_labels: bool = False, pixels: bool = False) -> torch.utils.data.Dataset:
        """A ``TensorDataset`` of ``(image, label)``, or ``(image, label, soft)`` with ``soft_labels``
        (the teachers' logits, N×classes); images as stored (normalised), or in pixel units."""
        x = self.pixels if pixels else self.images
        return torch.utils.data.TensorDataset(x, self.labels.long(), *([self._soft()] if soft_labels else []))

    def dataloader(self, batch_size: int, augment: str | None = None, *, shuffle: bool = True,
                   soft_labels: bool = False, pixels: bool = False,
                   generator: torch.Generator | None = None, **kwargs: Any) -> torch.utils.data.DataLoader:
        """Batches of :meth:`to_dataset`; ``augment``: a DSA strategy (``"color_crop_cutout_flip_scale_rotate"``)
        applied to each batch with parameters drawn per image, in the stored space as raydd's own
        training does (before any conversion to pixels). ``generator`` seeds shuffling and DSA;
        other keyword arguments go to ``torch.utils.data.DataLoader``."""
        from .augment import DSA, validate_strategy
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise RayddError(f"batch_size {batch_size!r} is invalid; expected an integer >= 1")
        dsa = None
        if augment is not None:
            validate_strategy(augment, "augment")
            dsa = DSA(augment)
        collate = _Collate(dsa, self.normalisation() if pixels else None, generator)
        return torch.utils.data.DataLoader(self.to_dataset(soft_labels=soft_labels), batch_size=batch_size,
                                           shuffle=shuffle, collate_fn=collate, generator=generator, **kwargs)

    def _soft(self) -> torch.Tensor:
        if self.soft_labels is None:
            raise RayddError(f"synset {self.directory or '(in memory)'} has no soft labels; use soft_labels=False")
        return self.soft_labels

    def normalisation(self) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(mean C×1×1, std C×1×1, ZCA or None): from the synset itself, else (synsets written
        before raydd recorded it) from the data directory and run named in its manifest."""
        if self.mean is None or self.std is None:
            self.mean, self.std, self.zca = _legacy_normalisation(self)
        elif self.zca is None:
            rec = (self.meta.get("normalisation") or {}).get("zca")
            if rec and self.directory is not None:
                from .data.zca import ZCA
                self.zca = ZCA.from_state(load_tensors(self.directory / rec["file"], sha256=rec.get("sha256")))
        c = self.images.shape[1]
        mean, std = (torch.tensor([float(v) for v in t], dtype=torch.float32).view(-1, 1, 1)
                     for t in (self.mean, self.std))
        if mean.shape[0] != c or std.shape[0] != c:
            raise RayddError(f"synset normalisation has {mean.shape[0]} means and {std.shape[0]} stds for "
                             f"{c}-channel images")
        return mean, std, self.zca


class _Collate:
    """Stack a batch, apply DSA to the images, convert them to pixels if asked (picklable for workers)."""

    def __init__(self, dsa: Any, norm: tuple | None, generator: torch.Generator | None):
        self.dsa, self.norm, self.generator = dsa, norm, generator

    def __call__(self, items: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        cols = [torch.stack(c) for c in zip(*items)]
        if self.dsa is not None:
            cols[0] = self.dsa(cols[0], self.generator)
        if self.norm is not None:
            cols[0] = _to_pixels(cols[0], *self.norm)
        return tuple(cols)


def _to_pixels(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, zca: Any) -> torch.Tensor:
    if zca is not None:
        x = zca.inverse(x)
    return x * std.to(x) + mean.to(x)


def _legacy_normalisation(syn: Synset) -> tuple[list[float], list[float], Any]:
    """An old synset's normalisation: dataset.json of its data directory, RUN/zca.safetensors."""
    from .data import load_info
    from .data.zca import ZCA, ZCA_INDEX
    ds = syn.meta.get("dataset") or {}
    where = syn.directory or "in memory"
    if not ds.get("dir"):
        raise RayddError(f"synset {where} records no normalisation (mean/std) and no data directory; "
                         "expected a synset written by raydd's distillation")
    try:
        info = load_info(ds["dir"])
    except RayddError as e:
        raise RayddError(f"synset {where} records no normalisation (written by an older raydd) and its data "
                         f"directory is not readable: {e}") from None
    zca = None
    if ds.get("zca"):
        run = Path(syn.directory).parent if syn.directory is not None else None
        if run is None or not (run / ZCA_INDEX).exists():
            raise RayddError(f"synset {where} is ZCA-whitened but records no whitening (written by an older "
                             f"raydd) and its run has no {ZCA_INDEX}")
        rec = read_json(run / ZCA_INDEX)
        zca = ZCA.from_state(load_tensors(run / rec.get("file", ZCA_FILE), sha256=rec.get("sha256")))
    return list(info.mean), list(info.std), zca


@functools.lru_cache(maxsize=None)
def git_commit(package_dir: str | None = None) -> dict[str, Any] | None:
    """{commit, dirty} of the git checkout holding ``package_dir`` (raydd's own by default), or None
    when it is not a git checkout (an installed wheel) or git is missing; never raises."""
    d = Path(package_dir) if package_dir else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            p = subprocess.run(["git", "-C", str(d), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return p.stdout.strip() if p.returncode == 0 else None

    # The package's own file must be tracked: a site-packages copy inside some other repo is not a checkout.
    if git("ls-files", "--error-unmatch", "__init__.py") is None or not (sha := git("rev-parse", "HEAD")):
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": sha, "dirty": bool(status) if status is not None else None}


def versions() -> dict[str, str | None]:
    """raydd, torch, Ray and Python versions (Ray's from its package metadata: no import)."""
    from . import __version__
    try:
        ray = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        ray = None
    return {"raydd": __version__, "torch": torch.__version__, "ray": ray, "python": sys.version.split()[0]}


def utc_now() -> str:
    """Now as ISO 8601 in UTC, to the second: the timestamps of manifests and indexes."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def provenance() -> dict[str, Any]:
    """What made an output and when: ``created`` (ISO 8601, UTC), ``versions``, ``git``."""
    return {"created": utc_now(), "versions": versions(), "git": git_commit()}


def save_synset(directory: str | Path, synset: Synset, manifest: dict[str, Any] | None = None) -> Path:
    """Write tensors then the manifest (with their checksum); the manifest's presence marks completion."""
    synset.check()
    directory = Path(directory)
    norm = {}
    if synset.mean is not None and synset.std is not None:
        mean, std, zca = synset.normalisation()
        norm = {"normalisation": {"mean": mean.flatten().tolist(), "std": std.flatten().tolist(), "zca": None}}
        if zca is not None:
            norm["normalisation"]["zca"] = {"file": ZCA_FILE, "sha256": save_tensors(directory / ZCA_FILE,
                                                                                     zca.state_dict())}
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
    }
    # what a loaded synset's meta carries over must not contradict the files just written
    carried = {**synset.meta, **(manifest or {})}
    doc.update({k: v for k, v in carried.items() if k not in doc and k != "normalisation"})
    doc.update(**norm, **provenance())
    write_json(directory / MANIFEST, doc)
    return directory


def load_synset(directory: str | Path) -> Synset:
    """A synset directory as a :class:`Synset`: checksum verified, tensors checked; ``.pixels``,
    ``.to_dataset()`` and ``.dataloader()`` make it a training set."""
    directory = Path(directory)
    if not (directory / MANIFEST).exists():
        raise RayddError(f"no synset at {directory}: {MANIFEST} is missing (distillation not finished?)")
    doc = read_json(directory / MANIFEST)
    if not isinstance(doc, dict):
        raise RayddError(f"{directory / MANIFEST} holds a JSON {type(doc).__name__}; expected an object "
                         f"with file, sha256 and num_classes")
    _check_manifest(directory / MANIFEST, doc)
    t = load_tensors(directory / doc.get("file", TENSOR_FILE), sha256=doc.get("sha256"))
    if "images" not in t or "labels" not in t:
        raise RayddError(f"{directory / TENSOR_FILE} lacks 'images' or 'labels'")
    norm = doc.get("normalisation") or {}
    syn = Synset(images=t["images"], labels=t["labels"].long(),
                 **{k: t.get(k) for k in OPTIONAL_KEYS}, meta=doc,
                 mean=norm.get("mean"), std=norm.get("std"), directory=directory)
    syn.check()
    return syn


def _check_manifest(path: Path, doc: dict[str, Any]) -> None:
    """The fields load_synset relies on, typed, before any file they name is opened: a hand-edited
    manifest must not read a file outside its directory or fail deep inside with a TypeError."""
    file = doc.get("file", TENSOR_FILE)
    if not isinstance(file, str) or not file or Path(file).name != file or file in (".", ".."):
        raise RayddError(f"{path}: file {file!r} is invalid; expected the name of a file beside it, "
                         f"e.g. {TENSOR_FILE!r}")
    sha = doc.get("sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64
                                and all(c in "0123456789abcdef" for c in sha)):
        raise RayddError(f"{path}: sha256 {sha!r} is invalid; expected 64 lowercase hex digits")
    n = doc.get("num_classes")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise RayddError(f"{path}: num_classes {n!r} is invalid; expected an integer >= 1")
