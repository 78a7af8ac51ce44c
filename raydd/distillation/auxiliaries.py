"""The auxiliary services of a MetaDD run (``distill.metadd.enabled``): the pool in RUN/auxiliaries
vetted before any worker starts, dealt round robin over ``auxiliaries.shards`` service actors
(fractional GPUs allowed), and the client each worker gets as ``Services.auxiliaries``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import RayddError


def enabled(cfg: Config) -> bool:
    return bool(cfg.distill.metadd.enabled)


def load_pool(cfg: Config, run_dir: Path, info: Any) -> tuple[list, list[dict]]:
    """(nets, records) of the run's auxiliaries, or ([], []) when MetaDD is off."""
    if not enabled(cfg):
        return [], []
    from ..auxiliaries import load_auxiliaries
    return load_auxiliaries(cfg, run_dir, info)


def local_client(nets: list, device: Any):
    if not nets:
        return None
    from ..methods.metadd import LocalAuxiliaries
    return LocalAuxiliaries(nets, device)


def shard_name(cfg: Config, run_dir: Path, s: int) -> str:
    base = cfg.auxiliaries.service.name
    if not base:
        base = "raydd-aux-" + hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
    return f"{base}-{s}"


def start_shards(cfg: Config, run_dir: Path, records: list[dict], info: Any, device: str) -> list:
    """One actor per shard, each loading its nets from their checksummed files in ``__init__``
    (so a restart recovers it); waits until each hosts what it should."""
    import ray

    from ..aux_services import start_aux_service

    if not records:
        return []
    svc = cfg.auxiliaries.service
    shards = min(cfg.auxiliaries.shards, len(records))
    handles = []
    for s in range(shards):
        mine = [dict(spec=r["spec"], in_channels=info.in_channels, num_classes=info.num_classes,
                     image_size=info.image_size, path=r["file"], sha256=r["sha256"]) for r in records[s::shards]]
        handles.append(start_aux_service(mine, name=shard_name(cfg, run_dir, s), resources=svc.resources,
                                         max_batch=svc.max_batch, max_restarts=svc.max_restarts, device=device))
    for s, h in enumerate(handles):
        try:
            hosted = ray.get(h.num_models.remote())
        except ray.exceptions.RayActorError as e:
            text = str(e).strip().splitlines()
            why = text[-1] if text else type(e).__name__
            raise RayddError(f"auxiliary service {s} failed to start: {why}") from None
        if hosted != len(records[s::shards]):
            raise RayddError(f"auxiliary service {shard_name(cfg, run_dir, s)!r} hosts {hosted} networks, "
                             f"expected {len(records[s::shards])}; it serves another run, so set "
                             "auxiliaries.service.name to a new name")
    return handles


def ray_client(handles: list | None):
    """The pool as one service; the round-robin deal is undone so net k is the k-th of the pool."""
    if not handles:
        return None
    from ..aux_services import RayAuxiliaries, ShardedAuxiliaries
    shards = [RayAuxiliaries(h) for h in handles]
    return shards[0] if len(shards) == 1 else _RoundRobin(ShardedAuxiliaries(shards), len(shards))


class _RoundRobin:
    """Pool index k → net k // S of shard k % S (how :func:`start_shards` dealt them)."""

    def __init__(self, sharded: Any, shards: int):
        self.sharded, self.shards = sharded, shards
        sizes = [shard.num_models for shard in sharded.shards]
        starts = [sum(sizes[:s]) for s in range(shards)]
        self.order = [starts[k % shards] + k // shards for k in range(sum(sizes))]

    @property
    def num_models(self) -> int:
        return len(self.order)

    def cams(self, x, y, t, models, cam_size):
        return self.sharded.cams(x, y, t, [self.order[m] for m in models], cam_size)

    def input_grad(self, x, y, t, cotangents, models, cam_size):
        return self.sharded.input_grad(x, y, t, cotangents, [self.order[m] for m in models], cam_size)
