"""The real data a sweep trains and tests on besides the synset: random subsets of the same IPC,
the whole training split, the test split, all in the run's ZCA space when ``data.zca`` is on."""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..io import load_tensors, read_json
from ..synset import MANIFEST, Synset, save_synset
from .elf import extract_features

TEST_BATCH = 1024
IN_MEMORY_BYTES = 2 << 30   # a larger real training split is streamed from the shards every epoch
TEST_IN_MEMORY_BYTES = 1 << 30   # a test split up to this is decoded once per process and kept
_kept_test: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def run_zca(cfg: Config, run_dir: Path) -> dict[str, str] | None:
    """The run's shared ZCA (fitted once by whoever needs it first), as a path + checksum for trials."""
    if not cfg.data.zca:
        return None
    from ..data.zca import ZCA_FILE, ZCA_INDEX, ensure_zca
    ensure_zca(cfg, run_dir)
    return {"path": str((Path(run_dir) / ZCA_FILE).resolve()),
            "sha256": read_json(Path(run_dir) / ZCA_INDEX)["sha256"]}


def whitener(zca: dict[str, str] | None):
    if not zca:
        return lambda x: x
    return _zca_transform(zca["path"], zca["sha256"])


@functools.lru_cache(maxsize=1)
def _zca_transform(path: str, sha256: str):
    """Loaded and checked once per process: a trial asks for it for its training, validation and test
    data, and the trials after it in the same worker for theirs."""
    from ..data.zca import ZCA
    return ZCA.from_state(load_tensors(path, sha256=sha256)).transform


def real_test(info: Any, zca: dict[str, str] | None) -> Any:
    """The test split's batches, a fresh iterator per call, in the run's ZCA space.

    A split that fits TEST_IN_MEMORY_BYTES is decoded (and checked) once per process and kept: a
    sweep's trials reuse their worker processes, and decoding Fashion-MNIST's 10,000 test images
    took longer than training a small net on 100 images. The batches are those streaming gives,
    value for value. One split is kept at a time, keyed by its shards' checksums and the ZCA."""
    from ..data import batches, load_split
    whiten = whitener(zca)
    if info.counts["test"]["total"] * math.prod(info.shape) * 4 > TEST_IN_MEMORY_BYTES:
        return lambda: ((whiten(x), y) for x, y in batches(info, "test", TEST_BATCH))
    key = (str(info.root), repr(info.shards["test"]), (zca or {}).get("sha256"))

    def kept() -> Any:
        if key not in _kept_test:
            _kept_test.clear()
            x, y = load_split(info, "test")
            _kept_test[key] = (torch.cat([whiten(x[i:i + TEST_BATCH]) for i in range(0, len(y), TEST_BATCH)]), y)
        x, y = _kept_test[key]
        return ((x[i:i + TEST_BATCH], y[i:i + TEST_BATCH]) for i in range(0, len(y), TEST_BATCH))
    return kept


def real_train(info: Any, whiten, batch_size: int, seed: int, holdout: dict[str, Any] | None = None) -> Any:
    """The real training split (minus a ``holdout`` validation split): in memory when it fits, else
    streamed with a new shuffle per epoch."""
    from ..data import batches, load_split
    if info.counts["train"]["total"] * math.prod(info.shape) * 4 <= IN_MEMORY_BYTES:
        x, y = load_split(info, "train")
        if holdout:
            keep = torch.ones(x.shape[0], dtype=torch.bool)
            keep[torch.tensor(holdout["positions"], dtype=torch.long)] = False
            x, y = x[keep], y[keep]
        return whiten(x), y
    if holdout:
        from .holdout import train_without
        return train_without(info, whiten, batch_size, seed, set(holdout["samples"]))
    epoch = iter(range(1 << 30))
    return lambda: ((whiten(x), y) for x, y in batches(info, "train", batch_size, shuffle=True,
                                                       seed=seed * 100_003 + next(epoch)))


def random_subset(directory: Path, info: Any, fp: str, ipc: int, seed: int, teacher: torch.nn.Module | None,
                   teacher_sha: str | None, feature_model: torch.nn.Module | None, feature_sha: str | None,
                   zca: dict[str, str] | None, progress: bool, holdout: dict[str, Any] | None = None) -> None:
    """A random real subset of ``ipc`` images per class, labelled like the synset, saved as a synset;
    beside a ``holdout`` validation split, drawn from the other training images."""
    from ..data import sample_per_class

    want = {"source": "random", "seed": seed, "ipc": ipc, "data": fp,
            "teacher_sha256": teacher_sha if teacher is not None else None,
            "feature_model_sha256": feature_sha if feature_model is not None else None,
            **({"holdout": holdout["sha256"]} if holdout else {})}
    if (directory / MANIFEST).exists():
        doc = read_json(directory / MANIFEST)
        if all(doc.get(k) == v for k, v in want.items()) and doc.get("holdout") == want.get("holdout"):
            return
    if progress:
        print(f"[evaluate] sampling the random baseline: {ipc} real images per class, seed {seed}", flush=True)
    if holdout:
        import random

        from .holdout import sample_classes
        x, y, ids, _ = sample_classes(info, ipc, random.Random(seed), frozenset(holdout["samples"]))
        want = {**want, "samples": ids}   # provenance: which training images, none held out
    else:
        x, y = sample_per_class(info, "train", ipc, seed)
    x = whitener(zca)(x)
    soft = feats = None
    with torch.no_grad():
        if teacher is not None:
            teacher.eval()
            soft = torch.cat([teacher(x[i:i + 256]) for i in range(0, x.shape[0], 256)])
    if feature_model is not None:
        feats = extract_features(feature_model, x)
    save_synset(directory, Synset(x.float(), y.long(), soft_labels=soft, elf_features=feats,
                                  meta={"num_classes": int(info.num_classes)}), manifest=want)
