"""Student model pool (paper 002): the main architecture with probability ``p_main``, else a
close variant of it with a uniformly drawn activation, normalisation and pooling layer.

Variants stay within the main family on purpose: the paper found that very different pool
members make distillation diverge.
"""
from __future__ import annotations

import random

import torch

from ..config import PoolConfig


def sample_student_spec(main_spec: str, pool_cfg: PoolConfig, rng: random.Random | torch.Generator) -> str:
    """Draw the architecture of the next fresh student."""
    if _uniform(rng) < pool_cfg.p_main:
        return main_spec
    from .. import models  # imported late: the pool is optional and models import timm

    return models.variant(main_spec,
                          activation=_choice(pool_cfg.activations, rng),
                          norm=_choice(pool_cfg.norms, rng),
                          pool=_choice(pool_cfg.pools, rng))


def _uniform(rng: random.Random | torch.Generator) -> float:
    if isinstance(rng, torch.Generator):
        return float(torch.rand((), generator=rng))
    return rng.random()


def _choice(options: list[str], rng: random.Random | torch.Generator) -> str | None:
    """A uniform pick; an empty list keeps the main architecture's layer (None)."""
    if not options:
        return None
    if isinstance(rng, torch.Generator):
        return options[int(torch.randint(len(options), (), generator=rng))]
    return rng.choice(options)
