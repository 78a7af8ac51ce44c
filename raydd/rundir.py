"""A run directory's identity: the resolved config it was made with, saved as ``RUN/config.yaml``.

Every stage claims the directory before it writes there, so results of two configs never mix:
a section is compared only once outputs made with it exist, and only on keys that change what is
computed (resources, retries and the like may change between resumptions).
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

import yaml

from .config import Config, flatten, refuse_mismatch
from .errors import RayddError
from .io import write_text
from .raycluster import adopt_run_dir, forget_run_dir

LOCK_FILE = ".raydd.lock"
_held: dict[str, int] = {}   # run directory -> fd of its lock, kept open for the process's life

# Sections each stage depends on, and the outputs that show a section has been used.
STAGE_SECTIONS = {
    "teachers": ("data", "teachers"),
    "distill": ("data", "teachers", "distill", "auxiliaries"),
    "auxiliaries": ("data", "teachers", "auxiliaries"),   # MetaDD's pool: the teachers' recipe
    "evaluate": ("data",),
}
SECTION_OUTPUTS = {"data": ("teachers", "distill", "synset"), "teachers": ("teachers",),
                   "distill": ("distill", "synset"), "auxiliaries": ("auxiliaries",)}


def _ignored(key: str) -> bool:
    """Keys that change how work runs, not what it computes."""
    leaf = key.rsplit(".", 1)[-1]
    return ".resources." in f".{key}." or leaf in {"max_retries", "max_restarts", "verify", "on_corrupt",
                                                     "checkpoint_every", "max_batch", "name"}


def claim(cfg: Config, run_dir: Path, stage: str) -> None:
    """Refuse to mix another config's results into ``run_dir``; then save the resolved config.

    A section is compared only once outputs made with it exist; sections this stage does not
    depend on keep their recorded values, so the saved config always describes the outputs.
    """
    lock(run_dir)
    saved_path = run_dir / "config.yaml"
    new = cfg.to_dict()
    if saved_path.exists():
        saved = yaml.safe_load(saved_path.read_text()) or {}
        old = _with_defaults(saved, Config().to_dict())
        used = {s for s, outs in SECTION_OUTPUTS.items() if any((run_dir / o).exists() for o in outs)}
        checked = sorted(used & set(STAGE_SECTIONS[stage]))
        a, b = ({k: v for s in checked for k, v in flatten(d.get(s, {}), s).items() if not _ignored(k)}
                for d in (old, new))
        refuse_mismatch(a, b, f"{run_dir} holds a run of another config")
        for section in used - set(STAGE_SECTIONS[stage]):
            if section in saved:
                new[section] = saved[section]
    write_text(saved_path, yaml.safe_dump(new, sort_keys=False))


def _with_defaults(saved: dict, defaults: dict) -> dict:
    """A setting added to the config after the run was saved reads as its default (a missing
    section stays missing)."""
    out = dict(saved)
    for k, v in defaults.items():
        if k not in out and not isinstance(v, dict):
            out[k] = v
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _with_defaults(out[k], v)
    return out


def lock(run_dir: Path) -> None:
    """One process per run directory: an exclusive ``flock`` on ``RUN/.raydd.lock``, held until this
    process exits (the OS releases it on a crash too). Linux's NFS client maps flock to NFS locks,
    so stages launched on different nodes of a cluster over a shared run directory are kept apart
    the same way. The file names its holder for the message of whoever is refused."""
    run_dir.mkdir(parents=True, exist_ok=True)
    key = str(run_dir.resolve())
    if key in _held:
        return
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RayddError(f"{run_dir} is in use by {holder}; wait for it to finish or use another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"raydd pid {os.getpid()} on {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    _held[key] = fd
    adopt_run_dir(run_dir)   # stop the Ray processes a killed driver of this run left; record ours


def release(run_dir: Path) -> None:
    """Let go of ``run_dir``'s lock (before its directory is removed: a lock file deleted while held
    would let the next process lock a new file while this one still believes it holds the directory)."""
    fd = _held.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    forget_run_dir(Path(run_dir))
