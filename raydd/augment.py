"""Differentiable siamese augmentation (DSA), in plain PyTorch.

DSA follows ParamDiffAug of the DSA/MTT code in its 'single' mode: every call picks ONE op of
the strategy at random and draws ONE set of parameters for the whole batch, so that real and
synthetic batches augmented with equally seeded generators see the same transform ("siamese"),
and gradients flow back to the (synthetic) pixels. Images are in normalised space; pixels moved
in from outside the frame are 0, i.e. the dataset mean, exactly as in the reference code.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import ConfigError

# ParamDiffAug constants of the reference code.
BRIGHTNESS = 1.0
SATURATION = 2.0
CONTRAST = 0.5
CROP_PAD = 0.125
CUTOUT = 0.5
FLIP_PROB = 0.5
SCALE = 1.2
ROTATE_DEG = 15.0

Op = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Integer in [low, high)."""
    return int(torch.randint(low, high, (), generator=generator))


def _affine(x: torch.Tensor, theta: list[list[float]]) -> torch.Tensor:
    """Warp every image with the same 2×3 affine matrix (normalised coordinates, zero fill)."""
    t = torch.tensor(theta, dtype=x.dtype, device=x.device).unsqueeze(0).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(t, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _color(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    x = x + (_uniform(g) - 0.5) * BRIGHTNESS
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_uniform(g) * SATURATION) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(g) + CONTRAST) + mean


def _crop(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    """Pad-and-crop as an integer translation by up to 12.5 % of the side."""
    h, w = x.shape[2], x.shape[3]
    sh, sw = int(h * CROP_PAD + 0.5), int(w * CROP_PAD + 0.5)
    dy, dx = _randint(-sh, sh + 1, g), _randint(-sw, sw + 1, g)
    # With align_corners=True one pixel is 2/(side-1) in normalised units, so the shift is exact.
    return _affine(x, [[1.0, 0.0, 2.0 * dx / max(w - 1, 1)], [0.0, 1.0, 2.0 * dy / max(h - 1, 1)]])


def _cutout(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    h, w = x.shape[2], x.shape[3]
    ch, cw = int(h * CUTOUT + 0.5), int(w * CUTOUT + 0.5)
    # Centre range as in the reference (one extra position for even sizes), clipped at the border.
    cy = _randint(0, h + (1 - ch % 2), g) - ch // 2
    cx = _randint(0, w + (1 - cw % 2), g) - cw // 2
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    hole = ((rows >= cy) & (rows < cy + ch))[:, None] & ((cols >= cx) & (cols < cx + cw))[None, :]
    return x * (~hole).to(x.dtype)


def _flip(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    return x.flip(3) if _uniform(g) < FLIP_PROB else x


def _scale(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    sx = _uniform(g) * (SCALE - 1.0 / SCALE) + 1.0 / SCALE
    sy = _uniform(g) * (SCALE - 1.0 / SCALE) + 1.0 / SCALE
    return _affine(x, [[sx, 0.0, 0.0], [0.0, sy, 0.0]])


def _rotate(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    a = (_uniform(g) - 0.5) * 2.0 * ROTATE_DEG / 180.0 * math.pi
    c, s = math.cos(a), math.sin(a)
    return _affine(x, [[c, -s, 0.0], [s, c, 0.0]])


OPS: dict[str, Op] = {
    "color": _color, "crop": _crop, "cutout": _cutout,
    "flip": _flip, "scale": _scale, "rotate": _rotate,
}


def validate_strategy(strategy: str, key: str) -> list[str]:
    """Split ``'color_crop_…'`` into ops, raising ConfigError naming ``key`` on an unknown op."""
    ops = strategy.split("_") if isinstance(strategy, str) else []
    bad = [op for op in ops if op not in OPS]
    if not ops or bad:
        shown = bad[0] if bad else strategy
        raise ConfigError(f"{key}: unknown augmentation {shown!r} in {strategy!r}; expected ops from "
                          f"{', '.join(OPS)} joined by '_' (e.g. color_crop_cutout_flip_scale_rotate)")
    return ops


class DSA:
    """``dsa(x, generator)``: one random op of the strategy, same parameters for the whole batch."""

    def __init__(self, strategy: str = "color_crop_cutout_flip_scale_rotate"):
        self.strategy = strategy
        self.ops = validate_strategy(strategy, "dsa strategy")

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        op = self.ops[_randint(0, len(self.ops), generator)]
        return OPS[op](x, generator).contiguous()

    def __repr__(self) -> str:
        return f"DSA({self.strategy!r})"
