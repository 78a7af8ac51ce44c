"""The one streaming reader of prepared shards, for every stage and every location.

Shards (located as :mod:`raydd.data.manifest` describes) are opened with ``webdataset.gopen``
(curl for http, a shell for ``pipe:``) and parsed with WebDataset's tar iterator, one explicit
shard list per call: WebDataset's node splitter does nothing inside Ray actors, so callers pass
``shards_for(info, split, rank, world)``.

Only the ``png`` and ``cls`` members are read (PNG via PIL restricted to the PNG decoder, the
label as ASCII digits); nothing is ever unpickled. Every shard is hashed while it streams and
checked at its end against dataset.json (byte count and sample count always, sha256 when
``verify``). A corrupt shard fails the read with its name (``on_corrupt="fail"``) or, with
``"skip"``, is dropped whole and recorded in :attr:`Stream.skipped`: to drop a shard whole, skip
mode holds one shard's raw bytes in memory until it has checked out; fail mode streams, so
samples before the error were already delivered to a consumer that is about to fail anyway.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import logging
import random
from typing import Any, Iterator, Literal

import numpy as np
import torch
from PIL import Image
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator

from ..errors import DataError, RayddError
from .manifest import DatasetInfo, check_split, load_info, short_error

log = logging.getLogger(__name__)
SHUFFLE_BUFFER = 1000


# ---------------------------------------------------------------------------- shards

class _Corrupt(Exception):
    """A shard or sample failed a check; the reason is one line."""


class _Hashing(io.RawIOBase):
    """Pass-through reader that hashes and counts the bytes as they stream by."""

    def __init__(self, stream: Any):
        self.stream, self.sha, self.bytes = stream, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _shard_samples(info: DatasetInfo, entry: dict, verify: bool) -> Iterator[tuple[str, bytes, int]]:
    """(key, png bytes, label) of one shard; raises _Corrupt when any check fails."""
    url = info.url(entry["name"])
    try:
        stream = gopen(url, "rb")
    except (OSError, ValueError) as e:
        raise _Corrupt(f"cannot open ({short_error(e)})") from None
    hashed = _Hashing(stream)
    try:
        files = tar_file_iterator(hashed, select_files=lambda n: n.endswith((".png", ".cls")))
        samples = group_by_keys(({**f, "__url__": url} for f in files))
        n = 0
        while True:
            try:
                s = next(samples)
            except StopIteration:
                break
            except Exception as e:  # tarfile, zlib, pipes and curl raise many types
                raise _Corrupt(f"unreadable after {n} samples ({short_error(e)})") from None
            if "png" not in s or "cls" not in s:
                raise _Corrupt(f"sample {s['__key__']} lacks its png or cls member")
            try:
                y = int(s["cls"].decode("ascii"))
            except ValueError:
                raise _Corrupt(f"sample {s['__key__']} has label {s['cls'][:20]!r}, expected an integer") from None
            if not 0 <= y < info.num_classes:
                raise _Corrupt(f"sample {s['__key__']} has label {y}, expected 0..{info.num_classes - 1}")
            n += 1
            yield s["__key__"], s["png"], y
        try:
            hashed.drain()
            stream.close()  # a pipe: reports its command's exit status here
        except Exception as e:
            raise _Corrupt(f"stream failed at its end ({short_error(e)})") from None
        if verify and hashed.sha.hexdigest() != entry.get("sha256"):
            raise _Corrupt(f"sha256 {hashed.sha.hexdigest()[:12]}… does not match dataset.json "
                           f"({str(entry.get('sha256'))[:12]}…)")
        if "bytes" in entry and hashed.bytes != entry["bytes"]:
            raise _Corrupt(f"{hashed.bytes} bytes, dataset.json says {entry['bytes']}")
        if n != entry["count"]:
            raise _Corrupt(f"{n} samples, dataset.json says {entry['count']}")
    finally:
        try:
            stream.close()
        except Exception:  # closing early kills a pipe: command; its status means nothing then
            pass


def _decode(png: bytes, info: DatasetInfo) -> np.ndarray:
    c, h, w = info.shape
    try:
        with Image.open(io.BytesIO(png), formats=["PNG"]) as im:
            if im.mode != ("L" if c == 1 else "RGB") or im.size != (w, h):
                raise _Corrupt(f"image is {im.mode} {im.size[0]}×{im.size[1]}, expected {c}×{h}×{w}")
            a = np.array(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise _Corrupt(f"PNG does not decode ({short_error(e)})") from None
    return a[None] if c == 1 else np.ascontiguousarray(a.transpose(2, 0, 1))


# ---------------------------------------------------------------------------- streams

class Stream:
    """Iterator over (image, label) of some shards of a split.

    Images are C×H×W float32 normalised with the dataset's mean/std, or uint8 when
    ``normalize=False``. In skip mode, ``skipped`` lists what was dropped:
    ``{"shard", "reason", "samples"}`` per dropped shard or undecodable sample.
    """

    def __init__(self, info: DatasetInfo, split: str, shards: list[str] | None = None, *, verify: bool = True,
                 on_corrupt: Literal["fail", "skip"] = "fail", shuffle: bool = False, seed: int = 0,
                 normalize: bool = True):
        if on_corrupt not in ("fail", "skip"):
            raise RayddError(f"on_corrupt={on_corrupt!r} is invalid; expected 'fail' or 'skip'")
        check_split(info, split)
        by_name = {s["name"]: s for s in info.shards[split]}
        names = list(by_name) if shards is None else list(shards)
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise DataError(f"shard {unknown[0]!r} is not in the {split} split of {info.root}")
        self.info, self.entries = info, [by_name[n] for n in names]
        self.verify, self.skip, self.shuffle, self.seed = verify, on_corrupt == "skip", shuffle, seed
        self.normalize = normalize
        self.skipped: list[dict[str, Any]] = []
        self._it: Iterator | None = None

    @property
    def dropped_samples(self) -> int:
        return sum(s["samples"] for s in self.skipped)

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> tuple[torch.Tensor, int]:
        if self._it is None:
            self._it = self._samples()
        return next(self._it)

    def raw(self) -> Iterator[tuple[str, bytes, int, str]]:
        """(key, png bytes, label, shard name) with the corrupt-shard policy applied, undecoded."""
        entries = list(self.entries)
        rng = random.Random(self.seed)
        if self.shuffle:
            rng.shuffle(entries)
        it = self._raw(entries)
        return _buffer_shuffle(it, rng) if self.shuffle else it

    def _raw(self, entries: list[dict]) -> Iterator[tuple[str, bytes, int, str]]:
        for entry in entries:
            name = entry["name"]
            samples = _shard_samples(self.info, entry, self.verify)
            try:
                if self.skip:
                    samples = list(samples)  # a shard is dropped whole, so it must check out first
                for key, png, y in samples:
                    yield key, png, y, name
            except _Corrupt as e:
                if not self.skip:
                    raise DataError(f"corrupt shard {self.info.url(name)}: {e}") from None
                self._record(name, str(e), entry["count"])

    def _record(self, shard: str, reason: str, samples: int) -> None:
        self.skipped.append({"shard": shard, "reason": reason, "samples": samples})
        log.warning("skipped %d sample(s) of corrupt shard %s: %s", samples, shard, reason)

    def _samples(self) -> Iterator[tuple[torch.Tensor, int]]:
        mean, std = _stats(self.info)
        for key, png, y, shard in self.raw():
            try:
                x = torch.from_numpy(_decode(png, self.info))
            except _Corrupt as e:
                if not self.skip:
                    raise DataError(f"corrupt shard {self.info.url(shard)}: sample {key}: {e}") from None
                self._record(shard, f"sample {key}: {e}", 1)
                continue
            yield (_normalize(x, mean, std) if self.normalize else x), y


def _buffer_shuffle(it: Iterator, rng: random.Random, size: int = SHUFFLE_BUFFER) -> Iterator:
    buf: list = []
    for item in it:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


def _stats(info: DatasetInfo) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (-1, 1, 1)
    return (torch.tensor(info.mean, dtype=torch.float32).view(shape),
            torch.tensor(info.std, dtype=torch.float32).view(shape))


def _normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255 - mean) / std


def stream(info: DatasetInfo | str, split: str, shards: list[str] | None = None, *, verify: bool = True,
           on_corrupt: Literal["fail", "skip"] = "fail", shuffle: bool = False, seed: int = 0,
           normalize: bool = True) -> Stream:
    """Stream (C×H×W image, int label) pairs; see :class:`Stream`. ``shuffle`` permutes the shard
    order and mixes samples through a 1000-sample buffer, reproducibly for a given ``seed``."""
    return Stream(load_info(info), split, shards, verify=verify, on_corrupt=on_corrupt,
                  shuffle=shuffle, seed=seed, normalize=normalize)


def load_split(info: DatasetInfo | str, split: str, *, normalize: bool = True, limit: int | None = None,
               verify: bool = True, on_corrupt: Literal["fail", "skip"] = "fail",
               shards: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split (or its first ``limit`` samples) in memory: x N×C×H×W, y N int64.
    With ``limit`` only the shards read are checked, and the last of them only if read to its end."""
    info = load_info(info)
    s = stream(info, split, shards, verify=verify, on_corrupt=on_corrupt, normalize=False)
    n = sum(e["count"] for e in s.entries)
    n = n if limit is None else min(n, limit)
    x = torch.empty((n, *info.shape), dtype=torch.uint8)
    y = torch.empty(n, dtype=torch.int64)
    got = 0
    # Without a limit the stream is read to its end: a shard's checks run only after its last
    # sample, so stopping at the expected count would skip them for the last shard.
    for got, (xi, yi) in enumerate(s if limit is None else itertools.islice(s, n), 1):
        if got > n:
            raise DataError(f"the {split} split of {info.root} holds more samples than dataset.json's {n}")
        x[got - 1], y[got - 1] = xi, yi
    x, y = x[:got], y[:got]  # skip mode may deliver fewer than dataset.json counts
    return (_normalize(x, *_stats(info)) if normalize else x), y


def batches(info: DatasetInfo | str, split: str, batch_size: int, *, normalize: bool = True,
            shuffle: bool = False, seed: int = 0, verify: bool = True,
            on_corrupt: Literal["fail", "skip"] = "fail",
            shards: list[str] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Stream the split as (x B×C×H×W, y B) batches; the last one may be smaller."""
    if batch_size < 1:
        raise RayddError(f"batch_size {batch_size!r} is invalid; expected an integer >= 1")
    info = load_info(info)
    stats = _stats(info)
    xs, ys = [], []
    for x, y in stream(info, split, shards, verify=verify, on_corrupt=on_corrupt, shuffle=shuffle,
                       seed=seed, normalize=False):
        xs.append(x)
        ys.append(y)
        if len(xs) == batch_size:
            yield _batch(xs, ys, stats, normalize)
            xs, ys = [], []
    if xs:
        yield _batch(xs, ys, stats, normalize)


def _batch(xs: list, ys: list, stats: tuple, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack(xs)
    return (_normalize(x, *stats) if normalize else x), torch.tensor(ys, dtype=torch.int64)


def sample_per_class(info: DatasetInfo | str, split: str, k: int, seed: int, *, normalize: bool = True,
                     verify: bool = True, on_corrupt: Literal["fail", "skip"] = "fail",
                     shards: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """k random images of every class, sorted by class (x C·k×C×H×W, y C·k).

    One pass of per-class reservoir sampling over undecoded samples, so memory holds only
    k compressed images per class whatever the dataset's size.
    """
    info = load_info(info)
    if k < 1:
        raise RayddError(f"k={k!r} images per class is invalid; expected an integer >= 1")
    rng = random.Random(seed)
    seen = [0] * info.num_classes
    chosen: list[list[tuple[str, bytes, str]]] = [[] for _ in range(info.num_classes)]
    s = stream(info, split, shards, verify=verify, on_corrupt=on_corrupt)
    for key, png, y, shard in s.raw():
        seen[y] += 1
        if len(chosen[y]) < k:
            chosen[y].append((key, png, shard))
        elif (j := rng.randrange(seen[y])) < k:
            chosen[y][j] = (key, png, shard)
    short = [c for c in range(info.num_classes) if seen[c] < k]
    if short:
        c = short[0]
        raise DataError(f"class {c} ({info.classes[c]}) has {seen[c]} images in the {split} split, "
                        f"fewer than k={k}")
    xs = []
    for items in chosen:
        for key, png, shard in items:
            try:
                xs.append(torch.from_numpy(_decode(png, info)))
            except _Corrupt as e:
                raise DataError(f"corrupt shard {info.url(shard)}: sample {key}: {e}") from None
    x = torch.stack(xs)
    y = torch.arange(info.num_classes).repeat_interleave(k)
    return (_normalize(x, *_stats(info)) if normalize else x), y


def denormalize(x: torch.Tensor, info: DatasetInfo | str) -> torch.Tensor:
    """Normalised images (…×C×H×W) back to [0, 1] pixel units, clamped for display/saving."""
    mean, std = (t.to(x.device) for t in _stats(load_info(info)))
    return (x * std + mean).clamp(0, 1)
