"""`raydd data prepare`: turn a raw dataset into WebDataset shards plus ``dataset.json``.

Layout written into OUT::

    train-000000.tar, ..., test-000000.tar   members NNNNNNNN.png (lossless) + NNNNNNNN.cls
    dataset.json                              classes, shape, counts, mean/std, shards with sha256

``dataset.json`` is written last and removed first when a directory is rewritten, so OUT
either holds a complete dataset or none: a failed run deletes the shards it left behind.
Re-running with the same inputs is a no-op: the manifest stores a fingerprint of the source
files (relative path, size, mtime), the format version and the settings, and nothing is
touched when it matches and every listed shard is present with its recorded size.
Different inputs or settings rewrite the directory cleanly (stale shards are removed).

Tar members get fixed metadata (mtime 0, uid 0, mode 0644) so identical inputs give
byte-identical shards. Images are encoded (and, for files, decoded and resized) in a
process pool, because PNG/JPEG coding is the bottleneck of this step.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import tarfile
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError, RayddError
from ..io import atomic_path, read_json, sha256_file, write_json
from .sources import LOADERS, SOURCES, Source, resolve_src

FORMAT = "raydd-webdataset/1"
SHARD_RE = re.compile(r"^(train|test)-\d{6}\.tar$")


# ---------------------------------------------------------------------------- entry point

def prepare(source: str, out: str | os.PathLike, src: str | os.PathLike | None = None,
            image_size: int | None = None, shard_size: int = 10000, workers: int = 2) -> dict:
    """Write OUT/{train,test}-NNNNNN.tar and OUT/dataset.json for ``source``.

    Returns the manifest (as written to dataset.json) plus ``run``: {skipped, processes},
    which is not stored. ``workers`` processes decode/resize/encode images.
    """
    if source not in SOURCES:
        raise DataError(f"unknown dataset source {source!r}; expected one of: {', '.join(SOURCES)}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise DataError(f"--shard-size {shard_size!r} is invalid; expected an integer >= 1")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or not 4 <= image_size <= 512):
        raise DataError(f"--image-size {image_size!r} is invalid; expected an integer in [4, 512]")
    if not isinstance(workers, int) or workers < 1:
        raise DataError(f"workers {workers!r} is invalid; expected an integer >= 1")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; expected a directory")

    src_path = resolve_src(source, src)
    spec = LOADERS[source](src_path, image_size)
    if image_size is not None:
        spec.size = image_size
    for split, (items, _) in spec.splits.items():
        if len(items) == 0:
            raise DataError(f"{source} at {src_path}: the {split} split is empty")
    fingerprint = _fingerprint(source, spec, shard_size)
    done = _complete_manifest(out, fingerprint)
    if done is not None:
        return {**done, "run": {"skipped": True, "processes": 0}}

    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").unlink(missing_ok=True)  # the directory is incomplete from here on
    processes = min(workers, os.cpu_count() or 1)
    encode = partial(_encode, size=spec.size, channels=spec.channels)
    try:
        with _Mapper(processes) as imap:
            shards, sums = {}, {}
            for split, (items, labels) in spec.splits.items():
                shards[split], sums[split] = _write_split(out, split, items, labels, shard_size,
                                                          encode, imap, spec.channels)
    except BaseException:
        _remove_shards(out, keep=())
        raise
    manifest = _manifest(source, spec, shards, sums["train"], fingerprint,
                         dict(src=None if src_path is None else str(src_path),
                              image_size=image_size, shard_size=shard_size))
    write_json(out / "dataset.json", manifest)
    _readable(out / "dataset.json")
    _remove_shards(out, keep={s["name"] for entries in shards.values() for s in entries})
    return {**manifest, "run": {"skipped": False, "processes": processes}}


# ---------------------------------------------------------------------------- encoding (pool workers)

def _encode(item: Any, size: int, channels: int) -> tuple[bytes, list[int], list[int]]:
    """Array or image path -> (PNG bytes, per-channel pixel sum, per-channel sum of squares)."""
    mode = "L" if channels == 1 else "RGB"
    if isinstance(item, np.ndarray):
        img = Image.fromarray(item)
    else:
        try:
            with Image.open(item) as im:
                img = im.convert(mode)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(f"cannot read image {item} ({e})") from None
    if img.size != (size, size):
        img = _fit(img, size)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    px = np.asarray(img, dtype=np.int64).reshape(-1, channels)
    return buf.getvalue(), px.sum(0).tolist(), (px * px).sum(0).tolist()


def _fit(img: Image.Image, size: int) -> Image.Image:
    """Center-crop to a square, then resize: BOX (area average) when shrinking, BICUBIC when enlarging."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    return img.resize((size, size), Image.Resampling.BOX if size < s else Image.Resampling.BICUBIC)


class _Mapper:
    """Ordered map over a process pool (or in-process for one worker)."""

    def __init__(self, processes: int):
        self.pool = multiprocessing.get_context().Pool(processes) if processes > 1 else None
        self.processes = processes

    def __enter__(self) -> Callable[[Callable, Sequence], Iterator]:
        def imap(fn: Callable, items: Sequence) -> Iterator:
            if self.pool is None:
                return map(fn, items)
            chunk = max(1, min(256, len(items) // (self.processes * 8)))
            return self.pool.imap(fn, items, chunksize=chunk)
        return imap

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


# ---------------------------------------------------------------------------- writing

def _write_split(out: Path, split: str, items: Sequence[Any], labels: np.ndarray, shard_size: int,
                 encode: Callable, imap: Callable, channels: int) -> tuple[list[dict], np.ndarray]:
    sums = np.zeros((2, channels), dtype=np.int64)
    encoded = imap(encode, items)
    entries = []
    for first in range(0, len(items), shard_size):
        name = f"{split}-{first // shard_size:06d}.tar"
        count = min(shard_size, len(items) - first)
        with atomic_path(out / name) as tmp:
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for i in range(first, first + count):
                    png, s, ss = next(encoded)
                    sums += (s, ss)
                    _add(tar, f"{i:08d}.png", png)
                    _add(tar, f"{i:08d}.cls", str(int(labels[i])).encode())
            _readable(tmp)
        path = out / name
        entries.append({"name": name, "count": count, "bytes": path.stat().st_size,
                        "sha256": sha256_file(path)})
    return entries, sums


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _readable(path: Path) -> None:
    """Temporary files are created private (0600); shards and manifest are data for any reader."""
    os.chmod(path, 0o644)


def _remove_shards(out: Path, keep: Iterable[str]) -> None:
    keep = set(keep)
    for p in out.iterdir():
        if SHARD_RE.match(p.name) and p.name not in keep:
            p.unlink(missing_ok=True)


def _manifest(source: str, spec: Source, shards: dict[str, list[dict]], sums: np.ndarray,
              fingerprint: str, inputs: dict) -> dict:
    counts = {}
    for split, (items, labels) in spec.splits.items():
        per_class = np.bincount(labels, minlength=len(spec.classes)).tolist()
        counts[split] = {"total": len(items), "per_class": per_class}
    n = counts["train"]["total"] * spec.size * spec.size
    mean = sums[0] / (255.0 * n)
    var = sums[1] / (255.0 ** 2 * n) - mean ** 2
    std = np.sqrt(np.maximum(var, 0.0))
    std[std == 0] = 1.0  # a constant channel carries nothing; avoid dividing by zero
    manifest = {
        "format": FORMAT, "source": source, "name": source,
        "classes": spec.classes, "num_classes": len(spec.classes),
        "shape": [spec.channels, spec.size, spec.size],
        "mean": mean.tolist(), "std": std.tolist(),
        "counts": counts, "shards": shards,
        "keys": {"image": "png", "label": "cls"},
        "inputs": inputs, "fingerprint": fingerprint,
    }
    if spec.class_ids is not None:
        manifest["class_ids"] = spec.class_ids
    return manifest


# ---------------------------------------------------------------------------- idempotence

def _fingerprint(source: str, spec: Source, shard_size: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT, source, spec.size, shard_size]).encode())
    for line in spec.inputs:
        h.update(line.encode() + b"\n")
    return h.hexdigest()


def _complete_manifest(out: Path, fingerprint: str) -> dict | None:
    """The existing manifest if OUT already holds exactly this dataset, else None."""
    path = out / "dataset.json"
    if not path.is_file():
        return None
    try:
        manifest = read_json(path)
    except RayddError:
        return None
    if not isinstance(manifest, dict) or manifest.get("fingerprint") != fingerprint:
        return None
    for entries in manifest.get("shards", {}).values():
        for s in entries:
            p = out / s["name"]
            if not p.is_file() or p.stat().st_size != s.get("bytes"):
                return None
    return manifest
