"""``raydd export``: a synset as files other tools read, in pixel space (ZCA and mean/std undone).

``imagefolder``: ``OUT/<class>/<index>.png`` (grey or RGB, 8 bit) and ``OUT/labels.csv`` with one row
per image: ``file,index,label,class,soft_0 … soft_{K-1}`` (the teachers' logits, float32 values
written exactly). ``npz``: one ``OUT`` file holding ``images`` (N×C×H×W pixels, uint8 or float32),
``labels``, ``soft_labels`` (when the synset has them), ``classes``, ``mean``, ``std``.

Both are written to a temporary sibling and renamed into place, so ``OUT`` is either absent or complete.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .errors import RayddError
from .io import _UMASK, fsync_dir, write_bytes, write_text
from .synset import Synset, load_synset

FORMATS = ("imagefolder", "npz")
DTYPES = ("uint8", "float32")
LABELS_FILE = "labels.csv"


def export_synset(synset: str | Path | Synset, fmt: str, out: str | Path, *, dtype: str = "uint8") -> Path:
    """Write ``synset`` (a directory or a loaded :class:`Synset`) to ``out`` as ``fmt``; returns ``out``.

    ``dtype`` (npz only): ``uint8`` (clamped to [0, 1], ×255, rounded, as the PNGs) or ``float32``
    (the exact, unclamped pixels: ``Synset.from_pixels`` of them gives the stored images back)."""
    if fmt not in FORMATS:
        raise RayddError(f"export format {fmt!r} is unknown; expected one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise RayddError(f"export dtype {dtype!r} is unknown; expected one of {', '.join(DTYPES)}")
    out = Path(out)
    _refuse_existing(out)
    syn = synset if isinstance(synset, Synset) else load_synset(synset)
    pixels = syn.pixels
    if fmt == "imagefolder":
        if pixels.shape[1] not in (1, 3):
            raise RayddError(f"imagefolder export needs grey or RGB images; the synset has {pixels.shape[1]} channels")
        with _atomic_dir(out) as tmp:
            _write_imagefolder(tmp, syn, quantise(pixels))
    else:
        data: dict[str, Any] = {"images": (quantise(pixels) if dtype == "uint8" else pixels.float()).numpy(),
                                "labels": syn.labels.long().numpy(), "classes": np.array(class_names(syn)),
                                "mean": syn.normalisation()[0].flatten().numpy(),
                                "std": syn.normalisation()[1].flatten().numpy()}
        if syn.soft_labels is not None:
            data["soft_labels"] = syn.soft_labels.float().numpy()
        buf = io.BytesIO()
        np.savez(buf, **data)
        write_bytes(out, buf.getvalue())
    return out


def quantise(pixels: torch.Tensor) -> torch.Tensor:
    """Pixel units → uint8 (clamped to [0, 1], ×255, rounded)."""
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8)


def class_names(syn: Synset) -> list[str]:
    """The dataset's class names from the manifest, else the class indices."""
    names = (syn.meta.get("dataset") or {}).get("classes")
    if not names or len(names) != syn.num_classes:
        names = [str(c) for c in range(syn.num_classes)]
    return [str(n) for n in names]


def _folder_names(names: list[str]) -> list[str]:
    """Class names safe as folder names (no separators, not '.' or '..'), unique."""
    out = []
    for i, n in enumerate(names):
        safe = re.sub(r"[^\w.\- ]", "_", n).strip() or str(i)
        safe = f"_{safe}" if set(safe) <= {"."} else safe
        out.append(safe if safe not in out else f"{safe}_{i}")
    return out


def _write_imagefolder(root: Path, syn: Synset, images: torch.Tensor) -> None:
    from PIL import Image

    names = class_names(syn)
    folders = _folder_names(names)
    soft = syn.soft_labels
    width = len(str(max(0, images.shape[0] - 1)))
    rows = []
    for i in range(images.shape[0]):
        c = int(syn.labels[i])
        rel = f"{folders[c]}/{i:0{width}d}.png"
        (root / folders[c]).mkdir(exist_ok=True)
        arr = images[i].permute(1, 2, 0).numpy()
        img = Image.fromarray(arr[:, :, 0], mode="L") if arr.shape[2] == 1 else Image.fromarray(arr, mode="RGB")
        png = io.BytesIO()
        img.save(png, format="PNG")
        write_bytes(root / rel, png.getvalue())
        rows.append([rel, i, c, names[c]] + ([repr(float(v)) for v in soft[i].tolist()] if soft is not None else []))
    header = ["file", "index", "label", "class"]
    if soft is not None:
        header += [f"soft_{k}" for k in range(soft.shape[1])]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(root / LABELS_FILE, text.getvalue())


def _refuse_existing(out: Path) -> None:
    if out.is_dir() and any(out.iterdir()):
        raise RayddError(f"--out {out} exists and is not empty; choose a new path or remove it")
    if out.exists() and not out.is_dir():
        raise RayddError(f"--out {out} exists; choose a new path or remove it")


@contextlib.contextmanager
def _atomic_dir(out: Path) -> Iterator[Path]:
    """A temporary directory beside ``out``, renamed onto it when the block succeeds (an empty
    ``out`` is replaced), removed when it fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        try:
            os.replace(tmp, out)          # rename(2) replaces an empty directory
        except OSError as e:
            raise RayddError(f"--out {out}: cannot move the export into place ({e.strerror})") from None
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
