"""``RUN/eval/trials.jsonl``: one JSON line per finished evaluation trial, appended and fsynced by
the driver as each trial ends, so a driver killed at any moment loses no finished trial."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..io import fsync_dir


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The trials ``path`` records, skipping a line torn by a crash mid-append."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def append_journal(path: Path, record: dict[str, Any]) -> None:
    """Append one trial and make it durable before the driver moves on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a+b") as f:
        torn = False
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"  # a crash mid-append: start on a line of our own
        f.write((b"\n" if torn else b"") + json.dumps(record, default=str).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    if new:
        fsync_dir(path.parent)
