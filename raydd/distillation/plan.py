"""Which groups a run distils, where each keeps its files, and the fingerprint of what it computes.

``distill.ipc`` images per class are split into ``distill.groups`` independent groups (paper 003,
Sec. 3.3/4.3: subsets distilled by independent workers and merged lose nothing). Every group
covers every class and starts from its own real images with its own seed.

Layout of RUN (every file written atomically, so a crash leaves the last complete version)::

    distill/group-GGG/state.safetensors  the method's state at the last checkpoint
    distill/group-GGG/progress.json      round, done, rollbacks, starts, completions, pid, host
    distill/group-GGG/final.safetensors  the finished group (images, labels)
    synset/{synset.safetensors, manifest.json, grid.png}
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, flatten
from ..errors import RayddError
from ..io import read_json

GROUP_SEED_STRIDE = 10007      # group g's seed = cfg.seed * GROUP_SEED_STRIDE + g

# Distill keys that change how the work runs, not what it computes: not part of the fingerprint.
_RUN_ONLY = ("checkpoint_every", "max_retries", "resources", "service")
_TEACHER_KEYS = ("arch", "count", "epochs", "lr", "momentum", "weight_decay", "batch_size", "dsa")
_DATA_KEYS = ("source", "image_size", "zca", "dsa_strategy")
# distill.method joined the config when APM was the only method: leaving it out while it is
# "apm" keeps the fingerprints of the synsets made before.
_FIRST_METHOD = "apm"


@dataclass(frozen=True)
class DataShape:
    in_channels: int
    num_classes: int
    image_size: int


@dataclass(frozen=True)
class GroupPlan:
    """What one group distils: ``ipc`` images per class from slot ``offset`` of the real sample."""
    index: int
    ipc: int
    offset: int
    seed: int
    rounds: int
    directory: Path

    @property
    def name(self) -> str:
        return f"group-{self.index:03d}"

    @property
    def state_path(self) -> Path:
        return self.directory / "state.safetensors"

    @property
    def progress_path(self) -> Path:
        return self.directory / "progress.json"

    @property
    def final_path(self) -> Path:
        return self.directory / "final.safetensors"

    def read_progress(self) -> dict[str, Any]:
        """The group's progress record, or that of a group not started yet."""
        if self.progress_path.exists():
            return read_json(self.progress_path)
        return {"group": self.index, "ipc": self.ipc, "seed": self.seed, "rounds": self.rounds,
                "round": 0, "done": False, "rollbacks": 0, "rollback_log": [], "starts": [],
                "completions": 0, "loss": None, "seconds": {}}


def split_ipc(ipc: int, groups: int) -> list[int]:
    """As even as possible; the first groups take the remainder (ipc 5, groups 2 -> [3, 2])."""
    if groups < 1 or ipc < groups:
        raise RayddError(f"cannot split distill.ipc={ipc} into distill.groups={groups}; "
                         f"expected 1 <= groups <= ipc")
    base, extra = divmod(ipc, groups)
    return [base + (g < extra) for g in range(groups)]


def plan_groups(cfg: Config, run_dir: str | Path) -> list[GroupPlan]:
    root = Path(run_dir) / "distill"
    plans, offset = [], 0
    for g, ipc in enumerate(split_ipc(cfg.distill.ipc, cfg.distill.groups)):
        plans.append(GroupPlan(index=g, ipc=ipc, offset=offset, seed=cfg.seed * GROUP_SEED_STRIDE + g,
                               rounds=cfg.distill.rounds, directory=root / f"group-{g:03d}"))
        offset += ipc
    return plans


def service_name(cfg: Config, run_dir: str | Path) -> str:
    """The teacher service's actor name: configured, or derived from the run directory."""
    if cfg.distill.service.name:
        return cfg.distill.service.name
    digest = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
    return f"raydd-teachers-{digest}"


def fingerprint(cfg: Config) -> str:
    """sha256 of the config values a synset depends on; its manifest records it, a match means done."""
    d = cfg.to_dict()
    data, teachers, distill = d["data"], d["teachers"], d["distill"]
    values: dict[str, Any] = {"seed": d["seed"]}
    values.update({f"data.{k}": data[k] for k in _DATA_KEYS})
    values.update({f"teachers.{k}": teachers[k] for k in _TEACHER_KEYS})
    skip = _RUN_ONLY + (("method",) if distill["method"] == _FIRST_METHOD else ())
    metadd = distill.get("metadd", {}).get("enabled")
    skip += () if metadd else ("metadd",)   # off: the fingerprints of synsets made before it stay
    skip += () if distill["method"] == "hmdc" else ("hmdc",)   # another method's section
    values.update(flatten({k: v for k, v in distill.items() if k not in skip}, "distill"))
    values.pop("distill.hmdc.shards", None)   # how the classes are spread, not what is computed
    if metadd:   # the auxiliary pool's nets shape the images too
        values.update({"auxiliaries.archs": cfg.auxiliaries.specs(cfg.data.source),
                       "auxiliaries.epochs": cfg.auxiliaries.epochs})
    text = "\n".join(f"{k}={values[k]!r}" for k in sorted(values))
    return hashlib.sha256(text.encode()).hexdigest()
