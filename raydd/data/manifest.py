"""Where a prepared dataset lives and what its dataset.json says.

A dataset location is a directory, a ``file://`` / ``http(s)://`` prefix, or a ``pipe:``
command containing ``{name}`` (e.g. ``pipe:aws s3 cp s3://bucket/cifar10/{name} -``); shard
URLs are ``prefix/NAME`` or the template with ``{name}`` filled in. A ``pipe:`` command is run by
a shell: shard names must match a strict pattern and are shell-quoted into the command, so a
manifest cannot inject commands. ``shards_for`` gives each worker its explicit share of a split.
"""
from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from webdataset.gopen import gopen

from ..errors import DataError, RayddError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """What dataset.json says, plus where the shards live (``root``)."""
    root: str
    source: str
    classes: list[str]
    num_classes: int
    shape: tuple[int, int, int]
    image_size: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    counts: dict[str, dict[str, Any]]
    shards: dict[str, list[dict[str, Any]]]

    def url(self, name: str) -> str:
        """Where shard (or dataset.json) ``name`` is read from."""
        return _join(self.root, name)

    def shard_names(self, split: str) -> list[str]:
        check_split(self, split)
        return [s["name"] for s in self.shards[split]]


SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _join(root: str, name: str) -> str:
    if not SHARD_NAME.fullmatch(name):
        raise DataError(f"shard name {name!r} is invalid; expected letters, digits, '.', '_' or '-' "
                        "(e.g. train-000000.tar)")
    if "{name}" in root:
        # A pipe: location is run by a shell: the name goes in quoted, whatever the pattern allows.
        return root.replace("{name}", shlex.quote(name) if root.startswith("pipe:") else name)
    if root.startswith("pipe:"):
        raise DataError(f"dataset location {root!r} is a pipe: command without {{name}}; expected e.g. "
                        "'pipe:aws s3 cp s3://bucket/data/{name} -'")
    return root.rstrip("/") + "/" + name if _is_url(root) else os.path.join(root, name)


def _is_url(location: str) -> bool:
    return location.startswith("pipe:") or len(urlparse(location).scheme) > 1  # "C:" is a drive


def load_info(location: str | os.PathLike | DatasetInfo) -> DatasetInfo:
    """Read dataset.json from a directory, URL prefix or ``pipe:`` template."""
    if isinstance(location, DatasetInfo):
        return location
    root = str(location)
    if root.startswith("file:"):
        root = url2pathname(urlparse(root).path)
    if _is_url(root):
        url = _join(root, "dataset.json")
        try:
            with gopen(url, "rb") as f:
                data = f.read()
            manifest = json.loads(data)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read dataset manifest {url} ({short_error(e)})") from None
    else:
        path = Path(root)
        if path.name == "dataset.json":
            path = path.parent
        if not (path / "dataset.json").is_file():
            raise DataError(f"{path} has no dataset.json; run `raydd data prepare SOURCE --out {path}` first")
        root, url = str(path.resolve()), str(path / "dataset.json")
        try:
            manifest = json.loads((path / "dataset.json").read_text())
        except ValueError as e:
            raise DataError(f"{url} is not valid JSON ({short_error(e)})") from None
    return _info(root, manifest, url)


def _info(root: str, m: Any, url: str) -> DatasetInfo:
    need = ("source", "classes", "num_classes", "shape", "mean", "std", "counts", "shards")
    missing = [k for k in need if not isinstance(m, dict) or k not in m]
    if missing:
        raise DataError(f"{url} is not a raydd dataset manifest (missing {', '.join(missing)})")
    if not isinstance(m["shards"], dict) or not all(isinstance(v, list) for v in m["shards"].values()):
        raise DataError(f"{url}: 'shards' must map each split to a list of shard records")
    for split, entries in m["shards"].items():
        for e in entries:
            if not isinstance(e, dict) or not SHARD_NAME.fullmatch(str(e.get("name", ""))):
                shown = e.get("name") if isinstance(e, dict) else e
                raise DataError(f"{url}: shard name {shown!r} in split {split!r} is invalid; expected "
                                "letters, digits, '.', '_' or '-' (e.g. train-000000.tar)")
    shape, n, classes = m["shape"], m["num_classes"], m["classes"]
    if not (isinstance(shape, list) and len(shape) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape)):
        raise DataError(f"{url}: shape {shape!r} is invalid; expected [channels, height, width], positive integers")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or not isinstance(classes, list) or len(classes) != n:
        raise DataError(f"{url}: num_classes {n!r} is invalid; expected an integer >= 1, the length of its classes "
                        f"list ({len(classes) if isinstance(classes, list) else classes!r})")
    c, h, w = shape
    return DatasetInfo(root=root, source=m["source"], classes=list(m["classes"]),
                       num_classes=int(m["num_classes"]), shape=(c, h, w), image_size=h, in_channels=c,
                       mean=tuple(m["mean"]), std=tuple(m["std"]), counts=m["counts"], shards=m["shards"])


def shards_for(info: DatasetInfo, split: str, rank: int, world: int) -> list[str]:
    """Round-robin share of the split's shards for worker ``rank`` of ``world`` (may be empty)."""
    if not 0 <= rank < world:
        raise RayddError(f"worker rank {rank} is invalid; expected 0 <= rank < world={world}")
    return load_info(info).shard_names(split)[rank::world]


def check_split(info: DatasetInfo, split: str) -> None:
    if split not in info.shards:
        raise DataError(f"split {split!r} is not in the dataset at {info.root}; expected one of: "
                        f"{', '.join(info.shards)}")


def short_error(e: BaseException) -> str:
    """One short line; webdataset's pipe errors (curl, pipe:) become their exit status."""
    text = str(e.args[0]) if getattr(e, "args", None) else str(e)
    if m := re.search(r"\): exit (-?\d+) \(read\)", text):
        return f"the reading command exited with status {m.group(1)}"
    text = re.sub(r" @ <[^>]*>", "", text)  # tarfile position note added by webdataset
    return " ".join((text or type(e).__name__).split())[:200]
