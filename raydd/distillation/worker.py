"""The group loop: one group of any registered method run (or resumed) to its last round.

Plain PyTorch, the same under Ray and in-process. The method is built by name from the
registry (``distill.method``); this loop only knows its interface (``raydd.methods.base``):
checkpoints every ``distill.checkpoint_every`` rounds, rollback when images go non-finite,
progress records and reports, and the group's curves (every number ``step`` returns, per round,
in RUN/curves/distill/group-GGG) and grid snapshots (RUN/distill/group-GGG/snapshots).
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable

import torch

from ..config import Config
from ..errors import RayddError
from ..io import load_tensors, save_tensors, write_json
from ..methods import Method, NonFiniteImages, RealImages, Services, Setup, method_class
from ..tracking import Curves, curves_dir, snapshot_due, snapshot_every
from ..train import peak_memory
from .plan import DataShape, GroupPlan

MAX_ROLLBACKS = 3              # non-finite images this often after the same checkpoint = give up
REPORT_EVERY_S = 0.5           # workers report at most this often (events and checkpoints always)
ROLLBACK_SEED_STRIDE = 7919    # the k-th rollback of a group reseeds it with seed + k * this


def build_method(cfg: Config, init: tuple[torch.Tensor, torch.Tensor], seed: int, shape: DataShape,
                 device: str | torch.device = "cpu") -> Method:
    setup = Setup(arch=cfg.distill.arch or cfg.teachers.arch, in_channels=shape.in_channels,
                  num_classes=shape.num_classes, image_size=shape.image_size,
                  dsa_strategy=cfg.data.dsa_strategy if cfg.distill.dsa else None,
                  real=None if cfg.data.zca else (lambda: _real_images(cfg)))
    return method_class(cfg.distill.method).create(cfg.distill, init[0].to(device), init[1].to(device),
                                                   seed=seed, setup=setup)


def _real_images(cfg: Config) -> RealImages:
    """The real training split in memory (``Setup.real``), read only by methods that ask for it."""
    from ..data import load_info, load_split
    info = load_info(cfg.data.dir)
    x, y = load_split(info, "train", verify=cfg.data.verify, on_corrupt=cfg.data.on_corrupt)
    return RealImages(x, y, tuple(info.mean), tuple(info.std))


def save_final(plan: GroupPlan, images: torch.Tensor, labels: torch.Tensor) -> None:
    save_tensors(plan.final_path, {"images": images, "labels": labels},
                 metadata={"group": str(plan.index), "seed": str(plan.seed), "rounds": str(plan.rounds)})


def _save_state(plan: GroupPlan, group: Method) -> None:
    save_tensors(plan.state_path, group.state_dict(),
                 metadata={"group": str(plan.index), "round": str(group.round)})


class _Tracking:
    """A group's curves and snapshots; resumed from its checkpoint round like the group itself."""

    def __init__(self, cfg: Config, plan: GroupPlan, start: int):
        self.cfg, self.plan = cfg, plan
        run_dir = plan.directory.parent.parent   # plan_groups: RUN/distill/group-GGG
        self.run_dir = run_dir
        self.every = snapshot_every(cfg.tracking, plan.rounds)
        self.curves = Curves(curves_dir(run_dir, "distill", plan.name), tracking=cfg.tracking, start=start,
                             group="distill", params={"method": cfg.distill.method, "seed": plan.seed,
                                                      "ipc": plan.ipc, "rounds": plan.rounds})
        self.info = self.zca = None

    def round(self, group: Method, stats: dict[str, Any]) -> None:
        self.curves.log(group.round, {k: v for k, v in stats.items() if k != "round"})
        self.snapshot(group)

    def snapshot(self, group: Method) -> None:
        if not snapshot_due(group.round, self.plan.rounds, self.every):
            return
        from ..data import load_info
        from .aggregate import SNAPSHOT_MAX_CLASSES, grid_title, write_grid
        if self.info is None:
            self.info = load_info(self.cfg.data.dir)
            zca_file = self.run_dir / "zca.safetensors"
            if self.cfg.data.zca and zca_file.exists():   # written by the driver before any worker
                from ..data.zca import ZCA
                self.zca = ZCA.from_state(load_tensors(zca_file))
        title = (f"{grid_title(self.cfg, self.info.source)}\ngroup {self.plan.index} · "
                 f"round {group.round}/{self.plan.rounds}")
        write_grid(self.plan.directory / "snapshots" / f"round-{group.round:06d}.png",
                   group.images.detach().cpu(), group.labels.detach().cpu(), self.info, self.zca,
                   title=title, max_classes=SNAPSHOT_MAX_CLASSES)


def distill_group(cfg: Config, plan: GroupPlan, init: tuple[torch.Tensor, torch.Tensor], services: Services,
                  shape: DataShape, *, report: Callable[[dict[str, Any]], None] = lambda m: None,
                  device: str | torch.device = "cpu", node: str | None = None) -> dict[str, Any]:
    """Run (or resume) one group to its last round.

    Non-finite images roll the group back to its last checkpoint with a fresh random stream (a
    replay of the same stream would fail the same way) and are reported; ``MAX_ROLLBACKS``
    failures after one checkpoint stop the group. Returns the group's progress record with its
    final ``images`` and ``labels``.
    """
    progress = plan.read_progress()
    if plan.final_path.exists():   # an earlier attempt finished but died before returning
        final = load_tensors(plan.final_path)
        return {**progress, "images": final["images"], "labels": final["labels"]}

    group = build_method(cfg, init, plan.seed, shape, device)
    if plan.state_path.exists():
        group.load_state_dict(load_tensors(plan.state_path))
    else:
        _save_state(plan, group)   # a rollback always has a checkpoint to return to
    start_round = group.round
    tracking = _Tracking(cfg, plan, start_round)
    if start_round == 0:
        tracking.snapshot(group)
    host = socket.gethostname()
    progress.update(round=group.round, pid=os.getpid(), host=host, node=node)
    progress["starts"].append(group.round)
    write_json(plan.progress_path, progress)

    seconds = {k: float(v) for k, v in progress.get("seconds", {}).items()}
    base = {"group": plan.index, "rounds": plan.rounds, "pid": os.getpid(), "host": host, "node": node}
    report({**base, "kind": "start", "round": group.round, "start": len(progress["starts"])})
    last_report = time.monotonic()
    clock: tuple[float, int] | None = None   # (time, round) of the first finished round: the rate's origin
    failures = 0               # non-finite events since the last checkpoint
    loss = None
    try:
        while group.round < plan.rounds:
            try:
                stats = group.step(services)
            except NonFiniteImages:
                failed_at = group.round + 1
                failures += 1
                group.load_state_dict(load_tensors(plan.state_path))
                tracking.curves.rewind(group.round)
                if failures >= MAX_ROLLBACKS:
                    raise RayddError(f"group {plan.index}: images went non-finite {failures} times after its "
                                     f"checkpoint at round {group.round}; lower distill.lr_img "
                                     f"(now {cfg.distill.lr_img})")
                progress["rollbacks"] += 1
                group.reseed(plan.seed + ROLLBACK_SEED_STRIDE * progress["rollbacks"])
                clock = None   # the rounds since the checkpoint run again
                progress["rollback_log"].append({"failed": failed_at, "to": group.round})
                write_json(plan.progress_path, progress)
                report({**base, "kind": "rollback", "round": group.round, "failed": failed_at,
                        "rollbacks": progress["rollbacks"]})
                continue
            loss = float(stats["loss"])
            tracking.round(group, stats)
            for k, v in stats.get("seconds", {}).items():
                seconds[k] = seconds.get(k, 0.0) + float(v)
            now = time.monotonic()
            # from the first finished round on: the first one also pays for warm-up (threads, the real
            # split, the first service calls) and would make the rate of a short run look far too slow
            clock = clock or (now, group.round)
            rate = (group.round - clock[1]) / (now - clock[0]) if now > clock[0] else 0.0
            checkpoint = group.round % cfg.distill.checkpoint_every == 0 and group.round < plan.rounds
            if checkpoint:
                _save_state(plan, group)
                tracking.curves.flush()
                failures = 0
                progress.update(round=group.round, loss=loss, rate=rate, seconds=seconds, memory=peak_memory(device))
                write_json(plan.progress_path, progress)
            if checkpoint or now - last_report >= REPORT_EVERY_S:
                report({**base, "kind": "checkpoint" if checkpoint else "round", "round": group.round,
                        "loss": loss, "rate": rate})
                last_report = now
    finally:
        tracking.curves.close()

    images, labels = (t.detach().cpu() for t in group.synset())   # HMDC: decoded, f² per stored image
    save_final(plan, images, labels)
    progress.update(round=group.round, done=True, loss=loss, seconds=seconds, memory=peak_memory(device),
                    completions=progress["completions"] + 1)
    write_json(plan.progress_path, progress)
    report({**base, "kind": "done", "round": group.round, "loss": loss})
    return {**progress, "images": images, "labels": labels}
