"""The validation split of a sweep: a small class-balanced set of real *training* images, held out
so that schedulers and searches compare trials on something other than the test set.

Which images: ``per_class`` images of every class, drawn by per-class reservoir sampling over the
training split with a generator fixed by the run seed (the same run seed, data and size give the
same images on every rerun and every node). While a sweep holds a validation split, the random
baselines draw their subsets from the remaining images and the whole-data baseline trains without
it, so no trial trains on an image it is validated on; the test split is never touched. The synset
itself was distilled from the whole training split (teachers included): the validation accuracy
of a distilled set is therefore an optimistic, but test-free, signal for comparing trials.

Stored as ``OUT/val/`` (a synset: images normalised, not whitened; the manifest lists the held-out
samples as ``shard/key`` and their positions in the split), rebuilt when its inputs change.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import ConfigError, DataError
from ..io import read_json
from ..synset import MANIFEST, Synset, load_synset, save_synset

VAL_DIR = "val"
AUTO_SIZE = 500         # images when evaluate.val_size is null and a metric is needed
AUTO_FRACTION = 10      # ... but at most a tenth of the training split


def val_per_class(val_size: int | None, needed: bool, info: Any) -> int:
    """Images per class of the validation split (0: none)."""
    classes, total = int(info.num_classes), int(info.counts["train"]["total"])
    if val_size is None:
        return max(1, min(AUTO_SIZE, total // AUTO_FRACTION) // classes) if needed else 0
    if val_size and val_size < classes:
        raise ConfigError(f"evaluate.val_size: {val_size} is invalid; expected 0 or at least one image per "
                          f"class ({classes})")
    return val_size // classes


def ensure_val(out: Path, info: Any, fp: str, per_class: int, seed: int, progress: bool) -> dict[str, Any]:
    """The validation split in ``out/val`` (made once); returns its path, checksum and held-out samples."""
    directory = out / VAL_DIR
    want = {"source": "val", "seed": seed, "per_class": per_class, "data": fp}
    doc = read_json(directory / MANIFEST) if (directory / MANIFEST).exists() else {}
    if not all(doc.get(k) == v for k, v in want.items()):
        if progress:
            print(f"[evaluate] holding out {per_class} training images per class for validation (seed {seed})",
                  flush=True)
        x, y, ids, positions = sample_classes(info, per_class, random.Random(f"raydd-val-{seed}"))
        save_synset(directory, Synset(x, y, meta={"num_classes": int(info.num_classes)}),
                    manifest={**want, "samples": ids, "positions": positions})
        doc = read_json(directory / MANIFEST)
    return {"path": str(directory.resolve()), "sha256": doc["sha256"], "samples": list(doc["samples"]),
            "positions": list(doc["positions"])}


def val_batches(path: str, whiten, batch: int = 1024) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The validation split as test-style batches (in the run's ZCA space, like the test split)."""
    s = load_synset(path)
    x = whiten(s.images.float())
    return [(x[i:i + batch], s.labels[i:i + batch]) for i in range(0, x.shape[0], batch)]


def sample_classes(info: Any, k: int, rng: random.Random, exclude: frozenset[str] = frozenset()
                   ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[int]]:
    """``k`` random training images per class outside ``exclude`` (``shard/key`` ids), sorted by
    class: normalised images, labels, their ids and their positions in the split."""
    from ..data import stream
    from ..data.reader import _decode, _normalize, _stats

    seen = [0] * int(info.num_classes)
    chosen: list[list[tuple[str, bytes, int]]] = [[] for _ in seen]
    for pos, (key, png, y, shard) in enumerate(stream(info, "train").raw()):
        if f"{shard}/{key}" in exclude:
            continue
        seen[y] += 1
        item = (f"{shard}/{key}", png, pos)
        if len(chosen[y]) < k:
            chosen[y].append(item)
        elif (j := rng.randrange(seen[y])) < k:
            chosen[y][j] = item
    short = [c for c, n in enumerate(seen) if n < k]
    if short:
        raise DataError(f"class {short[0]} has {seen[short[0]]} training images outside the validation split, "
                        f"fewer than {k}; lower evaluate.val_size")
    items = [it for per in chosen for it in per]
    x = torch.stack([torch.from_numpy(_decode(png, info)) for _, png, _ in items])
    y = torch.arange(len(seen)).repeat_interleave(k)
    return _normalize(x, *_stats(info)), y, [i for i, _, _ in items], [p for _, _, p in items]


def train_without(info: Any, whiten, batch_size: int, seed: int, exclude: set[str]) -> Any:
    """The real training split minus ``exclude``, streamed with a new shuffle per epoch (the
    whole-data baseline beside a validation split)."""
    from ..data import stream
    from ..data.reader import _decode, _normalize, _stats

    stats = _stats(info)
    epoch = iter(range(1 << 30))

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        xs: list[torch.Tensor] = []
        ys: list[int] = []
        for key, png, y, shard in stream(info, "train", shuffle=True, seed=seed * 100_003 + next(epoch)).raw():
            if f"{shard}/{key}" in exclude:
                continue
            xs.append(torch.from_numpy(_decode(png, info)))
            ys.append(y)
            if len(xs) == batch_size:
                yield whiten(_normalize(torch.stack(xs), *stats)), torch.tensor(ys)
                xs, ys = [], []
        if xs:
            yield whiten(_normalize(torch.stack(xs), *stats)), torch.tensor(ys)
    return batches
