"""HMDC across class shards on Ray (``distill.hmdc.shards`` > 1).

HMDC's models train on real data only, so their trajectory does not depend on the images, and
every image update is per class (``raydd.methods.hmdc``). One :class:`PairActor` advances the
pair (``PairTrajectory``) and publishes each version t into the object store, keeping a bounded
window of them; ``shards`` image workers (:func:`run_shard`, one Ray task each) own a partition
of the classes, fetch version t, run image step t on their classes and go on. The actor stays at
most ``WINDOW`` versions ahead of the slowest shard, so the object store holds at most that many.
:class:`~raydd.methods.hmdc.ClassShard` merging gives the single-process group's images bit for
bit (same seed; tests/test_hmdc_ray.py).

Checkpoints, in the group's directory: ``shard-KK.safetensors`` (a shard's images, momentum, GBM
and real selection at its round) and ``pair-RRRRRR.safetensors`` (the actor's state at round R,
every ``distill.checkpoint_every``). A resume restarts the actor from the slowest shard's round
and every shard from its own. Differences to the single-process worker: no rollback on
non-finite images (the run stops with the error) and no per-round curves or snapshots.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..augment import validate_strategy
from ..config import Config
from ..errors import ConfigError, RayddError
from ..io import load_tensors, save_tensors, write_json
from ..methods.hmdc import TARGETS, ClassShard, ImageUpdate, decode, init_packed, pixel_bounds
from ..methods.hmdc_pair import PairTrajectory, fresh_pair, load_published
from ..methods.gbm import GBM_EPS
from .plan import DataShape, GroupPlan
from .worker import _real_images, save_final

WINDOW = 4                 # published versions kept at most (the actor's lead over the slowest shard)
SHARD_FIELDS = ("images", "momentum", "gbm", "real_idx")


def sharded(cfg: Config) -> bool:
    return cfg.distill.method == "hmdc" and cfg.distill.hmdc.shards > 1


def partition(classes: int, shards: int) -> list[list[int]]:
    """Contiguous blocks of classes, as even as possible (10 into 3: 4, 3, 3)."""
    if not 1 <= shards <= classes:
        raise ConfigError(f"distill.hmdc.shards: {shards} does not split {classes} classes; expected 1..{classes}")
    base, extra = divmod(classes, shards)
    out, start = [], 0
    for k in range(shards):
        n = base + (k < extra)
        out.append(list(range(start, start + n)))
        start += n
    return out


def _ops(cfg: Config) -> list[str]:
    """The augmentation HMDCGroup.create uses (worker.build_method's Setup.dsa_strategy)."""
    s = cfg.data.dsa_strategy if cfg.distill.dsa else None
    return validate_strategy(s, "data.dsa_strategy") if s else []


def _real(cfg: Config, device) -> tuple[Any, torch.Tensor, torch.Tensor]:
    real = _real_images(cfg)
    return real, real.x.float().to(device), real.y.long().to(device)


def shard_path(plan: GroupPlan, k: int) -> Path:
    return plan.directory / f"shard-{k:02d}.safetensors"


def pair_path(plan: GroupPlan, t: int) -> Path:
    return plan.directory / f"pair-{t:06d}.safetensors"


def shard_round(plan: GroupPlan, k: int) -> int:
    p = shard_path(plan, k)
    return int(load_tensors(p)["round"]) if p.exists() else 0


class PairActor:
    """The pair's trajectory in a thread of its own, publishing version t with ``ray.put``; shard k
    asks for version t with :meth:`version` (which also says that it is done with t-1) and blocks
    until the version is there. Run threaded (``max_concurrency`` > shards)."""

    def __init__(self, cfg: Config, plan: GroupPlan, shape: DataShape, starts: dict[int, int], device: str,
                 window: int = WINDOW):
        from ..train import set_threads
        set_threads(cfg.distill.resources.cpus)
        _, x, y = _real(cfg, device)
        self.plan, self.rounds, self.every, self.window = plan, plan.rounds, cfg.distill.checkpoint_every, window
        shp = (shape.in_channels, shape.num_classes, shape.image_size)
        self.traj = PairTrajectory(cfg.distill.hmdc, shp, x, y, _ops(cfg), plan.seed, device)
        start = min(starts.values())
        if start > 0:
            self.traj.load_state_dict(load_tensors(pair_path(plan, start)))
        self.consumed = dict(starts)           # shard -> the version it waits for / works on
        self.refs: dict[int, Any] = {}
        self.error: BaseException | None = None
        self.cv = threading.Condition()
        threading.Thread(target=self._produce, daemon=True).start()

    def _produce(self) -> None:
        import ray
        try:
            while True:
                t = self.traj.step
                if t % self.every == 0 and 0 < t < self.rounds:   # before publishing: see run_shard
                    save_tensors(pair_path(self.plan, t), self.traj.state_dict(), metadata={"round": str(t)})
                ref = ray.put(self.traj.publish())
                with self.cv:
                    self.refs[t] = ref
                    self.cv.notify_all()
                    if t + 1 >= self.rounds:
                        return
                    while t + 1 - min(self.consumed.values()) >= self.window:
                        self.cv.wait()
                self.traj.advance()
        except BaseException as e:   # surfaced to the shards by version()
            with self.cv:
                self.error = e
                self.cv.notify_all()

    def version(self, shard: int, t: int) -> list:
        """[the object ref of version t] (wrapped, so Ray hands over the reference, not the value)."""
        with self.cv:
            self.consumed[shard] = t
            low = min(self.consumed.values())
            for old in [s for s in self.refs if s < low]:
                del self.refs[old]             # no shard needs it any more: the store may free it
            self.cv.notify_all()
            while t not in self.refs and self.error is None:
                self.cv.wait()
            if t not in self.refs:
                raise RayddError(f"HMDC pair actor failed before version {t}: {self.error!r}")
            return [self.refs[t]]

    def done(self, shard: int) -> None:
        with self.cv:
            self.consumed[shard] = self.rounds
            self.cv.notify_all()

    def step(self) -> int:
        return self.traj.step


def run_shard(cfg: Config, plan: GroupPlan, k: int, classes: list[int], shape: DataShape, actor: Any,
              device: str, report: Callable[[dict], None] = lambda m: None) -> dict[str, torch.Tensor]:
    """Image steps of ``classes`` from the shard's checkpoint (or its k-means init) to the last
    round, against the actor's versions; returns the shard's final state (CPU)."""
    import ray

    from ..train import set_threads
    set_threads(cfg.distill.resources.cpus)
    h = cfg.distill.hmdc
    real, x, y = _real(cfg, device)
    by_class = {c: x[y == c] for c in classes}
    lo, hi = pixel_bounds(real, device)
    shp = (shape.in_channels, shape.num_classes, shape.image_size)
    path = shard_path(plan, k)
    if path.exists():
        d = load_tensors(path)
        shard = ClassShard(list(classes), *(d[f].to(device) for f in SHARD_FIELDS))
        start = int(d["round"])
    else:
        images = init_packed(h, by_class, plan.ipc, shp, plan.seed, device)
        n = len(classes)
        shard = ClassShard(list(classes), images, torch.zeros_like(images),
                           torch.full((n, TARGETS), GBM_EPS, device=device),
                           torch.full((n, h.batch_real), -1, dtype=torch.long, device=device))
        start = 0
    upd = ImageUpdate(h, seed=plan.seed, ops=_ops(cfg), lr=cfg.distill.lr_img, momentum=cfg.distill.momentum_img,
                      lo=lo, hi=hi, num_classes=shape.num_classes)
    pair = fresh_pair(h, shp, 0, device)
    done_at = []               # wall clock at the end of each step (tools/bench_hmdc.py's rate)
    for t in range(start, plan.rounds):
        ref = ray.get(actor.version.remote(k, t))[0]
        if load_published(pair, ray.get(ref)) != t:
            raise RayddError(f"HMDC shard {k}: got a pair version other than {t}")
        # Checkpoint round t once version t is out: the actor saved its state t before publishing
        # it, so a resume from this round always finds pair-t.
        if t > start and t % cfg.distill.checkpoint_every == 0:
            save_tensors(path, {**_state(shard), "round": torch.tensor([t])},
                         metadata={"group": str(plan.index), "shard": str(k), "round": str(t)})
        stats = upd(shard, pair, t, by_class)
        report({"group": plan.index, "shard": k, "round": t + 1, "loss": stats["loss"]})
        done_at.append(time.time())
    actor.done.remote(k)
    return {**_state(shard), "done_at": torch.tensor(done_at, dtype=torch.float64)}


def _state(shard: ClassShard) -> dict[str, torch.Tensor]:
    return {f: getattr(shard, f).detach().cpu().clone() for f in SHARD_FIELDS}


def distill_sharded(cfg: Config, plan: GroupPlan, shape: DataShape, *, device: str = "cpu",
                    report: Callable[[dict], None] = lambda m: None) -> dict[str, Any]:
    """One HMDC group on Ray: the pair actor and ``distill.hmdc.shards`` shard tasks, resumed from
    their checkpoints, merged, decoded and saved as the group's final file (``save_final``).
    Returns the group's progress record with ``images``/``labels`` like ``distill_group``."""
    import ray

    progress = plan.read_progress()
    if plan.final_path.exists():
        final = load_tensors(plan.final_path)
        return {**progress, "images": final["images"], "labels": final["labels"]}
    parts = partition(shape.num_classes, cfg.distill.hmdc.shards)
    res = cfg.distill.resources
    # Every shard must run at once (the actor waits for the slowest): refuse a cluster too small for
    # that; CPUs other work holds for a while only delay the start.
    total = ray.cluster_resources().get("CPU", 0.0)
    if total + 1e-9 < len(parts) * res.cpus:
        raise ConfigError(f"distill.hmdc.shards: {len(parts)} shards of distill.resources.cpus={res.cpus} need "
                          f"{len(parts) * res.cpus:g} CPUs at once; the Ray cluster has {total:g}")
    starts = {k: shard_round(plan, k) for k in range(len(parts))}
    start = min(starts.values())
    if start > 0 and not pair_path(plan, start).exists():
        raise RayddError(f"HMDC group {plan.index}: the shards resume from round {start} but "
                         f"{pair_path(plan, start)} is missing; delete {plan.directory} to start afresh")
    plan.directory.mkdir(parents=True, exist_ok=True)
    for p in plan.directory.glob("pair-*.safetensors"):   # versions before the slowest shard: done with
        if int(p.stem.split("-")[1]) < start:
            p.unlink()
    host = socket.gethostname()
    base = {"group": plan.index, "rounds": plan.rounds, "pid": os.getpid(), "host": host, "node": None}
    progress.update(round=start, pid=os.getpid(), host=host, shards=len(parts))
    progress["starts"].append(start)
    write_json(plan.progress_path, progress)
    report({**base, "kind": "start", "round": start, "start": len(progress["starts"])})
    t0 = time.monotonic()
    actor = ray.remote(PairActor).options(num_cpus=0, max_concurrency=len(parts) + 2).remote(
        cfg, plan, shape, starts, device)
    task = ray.remote(run_shard).options(num_cpus=res.cpus, num_gpus=res.gpus, max_retries=0)
    refs: list = []
    try:
        refs = [task.remote(cfg, plan, k, c, shape, actor, device) for k, c in enumerate(parts)]
        states = ray.get(refs)
        refs = []
    finally:
        for ref in refs:           # interrupted: stop the shards; their checkpoints stay for a resume
            ray.cancel(ref, force=True)
        ray.kill(actor)
    merged = ClassShard.merge([ClassShard(c, *(s[f] for f in SHARD_FIELDS)) for c, s in zip(parts, states)])
    images, labels = decode(merged.images, plan.ipc, cfg.distill.hmdc.factor, shape.num_classes)
    save_final(plan, images, labels)
    seconds = {"total": float(progress.get("seconds", {}).get("total", 0.0)) + time.monotonic() - t0}
    progress.update(round=plan.rounds, done=True, seconds=seconds, completions=progress["completions"] + 1)
    write_json(plan.progress_path, progress)
    report({**base, "kind": "done", "round": plan.rounds, "loss": None})
    return {**progress, "images": images, "labels": labels, "shard": merged,
            "done_at": [s["done_at"].tolist() for s in states]}


def distill_groups(cfg: Config, plans: list[GroupPlan], shape: DataShape, device: str,
                   report: Callable[[dict], None]) -> None:
    """The runner's entry (``_run_on_ray``): the groups one after another, each over all shards."""
    for p in plans:
        distill_sharded(cfg, p, shape, device=device, report=report)
