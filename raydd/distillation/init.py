"""Each group's starting images: real ones, or noise (Algorithm 1, line 1 of APM).

``ipc`` real images per class are sampled once with ``cfg.seed`` and sliced per group, so no
real image seeds two groups (a duplicate start makes groups redundant).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..config import Config
from ..errors import ConfigError, DataError
from .plan import GroupPlan


def init_images(real_x: Tensor, real_y: Tensor, ipc: int, mode: str = "real",
                generator: torch.Generator | None = None,
                num_classes: int | None = None) -> tuple[Tensor, Tensor]:
    """``ipc`` images per class sorted by class: random real ones of that class, or N(0, 1) noise
    (the normalised space has unit variance per channel)."""
    classes = num_classes if num_classes is not None else int(real_y.max()) + 1
    labels = torch.arange(classes).repeat_interleave(ipc)
    if mode == "noise":
        return torch.randn((len(labels), *real_x.shape[1:]), generator=generator), labels
    if mode != "real":
        raise ConfigError(f"distill.init: {mode!r} is invalid; expected 'real' or 'noise'")
    picks = []
    for c in range(classes):
        pool = (real_y == c).nonzero().flatten()
        if len(pool) < ipc:
            raise DataError(f"class {c} has {len(pool)} real images; initialisation needs ipc={ipc}")
        picks.append(pool[torch.randperm(len(pool), generator=generator)[:ipc]])
    return real_x[torch.cat(picks)].detach().clone().float(), labels


def initial_images(cfg: Config, info: Any, plans: list[GroupPlan], zca: Any = None
                   ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Each group's real starting images: disjoint slices of one per-class sample (see module doc)."""
    from ..data import sample_per_class

    x, y = sample_per_class(info, "train", cfg.distill.ipc, cfg.seed, verify=cfg.data.verify,
                            on_corrupt=cfg.data.on_corrupt)
    if zca is not None:
        x = zca.transform(x)
    per_class = [torch.nonzero(y == c).flatten() for c in range(info.num_classes)]
    out = {}
    for plan in plans:
        idx = torch.cat([i[plan.offset:plan.offset + plan.ipc] for i in per_class])
        g = torch.Generator().manual_seed(plan.seed)
        out[plan.index] = init_images(x[idx], y[idx], plan.ipc, cfg.distill.init, g,
                                      num_classes=info.num_classes)
    return out
