"""The group loop: one group of any registered method run (or resumed) to its last round.

Plain PyTorch, the same under Ray and in-process. The method is built by name from the
registry (``distill.method``); this loop only knows its interface (``raydd.methods.base``):
checkpoints every ``distill.checkpoint_every`` rounds, rollback when images go non-finite,
progress records and reports.
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
from ..methods import Method, NonFiniteImages, Services, Setup, method_class
from .plan import DataShape, GroupPlan

MAX_ROLLBACKS = 3              # non-finite images this often after the same checkpoint = give up
REPORT_EVERY_S = 0.5           # workers report at most this often (events and checkpoints always)
ROLLBACK_SEED_STRIDE = 7919    # the k-th rollback of a group reseeds it with seed + k * this


def build_method(cfg: Config, init: tuple[torch.Tensor, torch.Tensor], seed: int, shape: DataShape,
                 device: str | torch.device = "cpu") -> Method:
    setup = Setup(arch=cfg.distill.arch or cfg.teachers.arch, in_channels=shape.in_channels,
                  num_classes=shape.num_classes, image_size=shape.image_size,
                  dsa_strategy=cfg.data.dsa_strategy if cfg.distill.dsa else None)
    return method_class(cfg.distill.method).create(cfg.distill, init[0].to(device), init[1].to(device),
                                                   seed=seed, setup=setup)


def save_final(plan: GroupPlan, images: torch.Tensor, labels: torch.Tensor) -> None:
    save_tensors(plan.final_path, {"images": images, "labels": labels},
                 metadata={"group": str(plan.index), "seed": str(plan.seed), "rounds": str(plan.rounds)})


def _save_state(plan: GroupPlan, group: Method) -> None:
    save_tensors(plan.state_path, group.state_dict(),
                 metadata={"group": str(plan.index), "round": str(group.round)})


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
    host = socket.gethostname()
    progress.update(round=group.round, pid=os.getpid(), host=host, node=node)
    progress["starts"].append(group.round)
    write_json(plan.progress_path, progress)

    seconds = {k: float(v) for k, v in progress.get("seconds", {}).items()}
    base = {"group": plan.index, "rounds": plan.rounds, "pid": os.getpid(), "host": host, "node": node}
    report({**base, "kind": "start", "round": group.round, "start": len(progress["starts"])})
    t0 = last_report = time.monotonic()
    failures = 0               # non-finite events since the last checkpoint
    loss = None
    while group.round < plan.rounds:
        try:
            stats = group.step(services)
        except NonFiniteImages:
            failed_at = group.round + 1
            failures += 1
            group.load_state_dict(load_tensors(plan.state_path))
            if failures >= MAX_ROLLBACKS:
                raise RayddError(f"group {plan.index}: images went non-finite {failures} times after its "
                                 f"checkpoint at round {group.round}; lower distill.lr_img "
                                 f"(now {cfg.distill.lr_img})")
            progress["rollbacks"] += 1
            group.reseed(plan.seed + ROLLBACK_SEED_STRIDE * progress["rollbacks"])
            progress["rollback_log"].append({"failed": failed_at, "to": group.round})
            write_json(plan.progress_path, progress)
            report({**base, "kind": "rollback", "round": group.round, "failed": failed_at,
                    "rollbacks": progress["rollbacks"]})
            continue
        loss = float(stats["loss"])
        for k, v in stats.get("seconds", {}).items():
            seconds[k] = seconds.get(k, 0.0) + float(v)
        now = time.monotonic()
        rate = (group.round - start_round) / max(now - t0, 1e-9)
        checkpoint = group.round % cfg.distill.checkpoint_every == 0 and group.round < plan.rounds
        if checkpoint:
            _save_state(plan, group)
            failures = 0
            progress.update(round=group.round, loss=loss, rate=rate, seconds=seconds)
            write_json(plan.progress_path, progress)
        if checkpoint or now - last_report >= REPORT_EVERY_S:
            report({**base, "kind": "checkpoint" if checkpoint else "round", "round": group.round,
                    "loss": loss, "rate": rate})
            last_report = now

    images, labels = group.images.detach().cpu(), group.labels.detach().cpu()
    save_final(plan, images, labels)
    progress.update(round=group.round, done=True, loss=loss, seconds=seconds,
                    completions=progress["completions"] + 1)
    write_json(plan.progress_path, progress)
    report({**base, "kind": "done", "round": group.round, "loss": loss})
    return {**progress, "images": images, "labels": labels}
