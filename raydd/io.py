"""Durable outputs: atomic writes, checksums, safetensors with verified loading.

Every file raydd writes goes through a temporary file in the same directory followed by
``os.replace``, so a crash leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from .errors import RayddError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # after the write: some writers (safetensors) recreate the file with mode 0600, and
        # mkstemp's 0600 would hide outputs from other users and servers
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself survives a crash only once the directory is synced
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make entries created or renamed in directory ``path`` durable (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RayddError(f"missing file {path}") from None
    except json.JSONDecodeError as e:
        raise RayddError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> str:
    """Atomically write ``tensors`` as safetensors; returns the file's sha256."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return sha256_file(path)


def load_tensors(path: str | os.PathLike, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load safetensors, verifying the checksum first when one is given."""
    path = Path(path)
    if not path.exists():
        raise RayddError(f"missing file {path}")
    if sha256 is not None:
        if not isinstance(sha256, str):   # a hand-edited record: refuse it, not a TypeError below
            raise RayddError(f"the sha256 recorded for {path} is {sha256!r}; expected 64 hex digits")
        actual = sha256_file(path)
        if actual != sha256:
            raise RayddError(f"{path} fails its checksum: sha256 {actual[:12]}…, expected {sha256[:12]}…")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for a damaged header
        raise RayddError(f"{path} is not a readable safetensors file ({e})") from None
