"""Differentiable siamese augmentation (DSA), in plain PyTorch.

DSA follows ParamDiffAug of the DSA/APM code in its 'single' mode: every call picks ONE op of the
strategy at random. Like the reference's ``DiffAugment`` called without a seed, which is how APM's
student training, teacher training and evaluation call it, each image of the batch then draws its
OWN parameters (scale, angle, shift, hole, flip, colour factors). ``shared=True`` is the seeded
("siamese") mode of gradient matching: one set of parameters for the whole batch, drawn
independently of the batch size, so a real and a synthetic batch augmented by two shared calls
with equally seeded generators (or by ``apply`` with one ``draw``) see the same transform.
Gradients flow back to the pixels. Images are in normalised space; pixels moved in from outside
the frame are 0, i.e. the dataset mean, exactly as in the reference code.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError, RayddError

# ParamDiffAug constants of the reference code.
BRIGHTNESS = 1.0
SATURATION = 2.0
CONTRAST = 0.5
CROP_PAD = 0.125
CUTOUT = 0.5
FLIP_PROB = 0.5
SCALE = 1.2
ROTATE_DEG = 15.0

Size = tuple[int, int]  # (height, width)


def _rand(n: int, g: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=g, device=g.device if g is not None else "cpu")


def _randint(low: int, high: int, n: int, g: torch.Generator | None) -> torch.Tensor:
    """``n`` integers in [low, high)."""
    return torch.randint(low, high, (n,), generator=g, device=g.device if g is not None else "cpu")


def crop_shift(side: int) -> int:
    """Largest crop translation along a side of ``side`` pixels (the reference's int(side·0.125 + 0.5))."""
    return int(side * CROP_PAD + 0.5)


def cutout_size(side: int) -> int:
    return int(side * CUTOUT + 0.5)


# Samplers: (n, (h, w), generator) -> per-image parameters, the first dimension n.

def sample_color(n: int, size: Size, g: torch.Generator | None) -> torch.Tensor:
    """n×3: brightness shift (U-0.5)·1, saturation factor U·2, contrast factor U+0.5."""
    b = (_rand(n, g) - 0.5) * BRIGHTNESS
    s = _rand(n, g) * SATURATION
    c = _rand(n, g) + CONTRAST
    return torch.stack([b, s, c], dim=1)


def sample_crop(n: int, size: Size, g: torch.Generator | None) -> torch.Tensor:
    """n×2 integer (row, column) translations, each in [-crop_shift(side), +crop_shift(side)]."""
    sh, sw = crop_shift(size[0]), crop_shift(size[1])
    return torch.stack([_randint(-sh, sh + 1, n, g), _randint(-sw, sw + 1, n, g)], dim=1)


def sample_cutout(n: int, size: Size, g: torch.Generator | None) -> torch.Tensor:
    """n×2 hole centres (row, column), each in [0, side + 1 - cutout_size % 2) as in the reference
    (one extra position for even sizes); the hole starts cutout_size // 2 before the centre."""
    ch, cw = cutout_size(size[0]), cutout_size(size[1])
    return torch.stack([_randint(0, size[0] + 1 - ch % 2, n, g),
                        _randint(0, size[1] + 1 - cw % 2, n, g)], dim=1)


def sample_flip(n: int, size: Size, g: torch.Generator | None) -> torch.Tensor:
    """n booleans: flip left-right with probability 0.5."""
    return _rand(n, g) < FLIP_PROB


def sample_scale(n: int, size: Size, g: torch.Generator | None) -> torch.Tensor:
    """n×2 (sx, sy), each U(1/1.2, 1.2) independently: the sampling grid's stretch per axis."""
    sx = _rand(n, g) * (SCALE - 1.0 / SCALE) + 1.0 / SCALE
    sy = _rand(n, g) * (SCALE - 1.0 / SCALE) + 1.0 / SCALE
    return torch.stack([sx, sy], dim=1)


def sample_rotate(n: int, size: Size, g: torch.Generator | None) -> torch.Tensor:
    """n angles in radians, U(-15°, 15°)."""
    return (_rand(n, g) - 0.5) * 2.0 * ROTATE_DEG / 180.0 * math.pi


# Appliers: (x, parameters with first dimension x.shape[0]) -> augmented x, differentiable in x.

def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Warp image i with the 2×3 matrix theta[i] (normalised coordinates, align_corners=True and
    zero fill, as the APM code)."""
    theta = theta.to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _col(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-image scalars as an n×1×1×1 tensor on x's device and dtype."""
    return p.to(x.device, x.dtype).view(-1, 1, 1, 1)


def apply_color(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    x = x + _col(p[:, 0], x)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * _col(p[:, 1], x) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _col(p[:, 2], x) + mean


def apply_crop(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """out[i, :, r, c] = x[i, :, r + dy_i, c + dx_i], 0 outside the frame: the reference's
    pad-and-crop, done as an exact gather."""
    n, ch, h, w = x.shape
    p = p.to(x.device)
    rows = torch.arange(h, device=x.device) + p[:, :1]  # n×h
    cols = torch.arange(w, device=x.device) + p[:, 1:]  # n×w
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    index = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]
    out = x.reshape(n, ch, h * w).gather(2, index.view(n, 1, h * w).expand(n, ch, h * w))
    return out.view(n, ch, h, w) * inside[:, None].to(x.dtype)


def apply_cutout(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[2], x.shape[3]
    ch, cw = cutout_size(h), cutout_size(w)
    p = p.to(x.device)
    top, left = p[:, :1] - ch // 2, p[:, 1:] - cw // 2  # clipped at the border, as the reference
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    hole = ((rows >= top) & (rows < top + ch))[:, :, None] & ((cols >= left) & (cols < left + cw))[:, None, :]
    return x * (~hole)[:, None].to(x.dtype)


def apply_flip(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return torch.where(p.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)


def apply_scale(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros_like(p[:, 0])
    theta = torch.stack([torch.stack([p[:, 0], zero, zero], 1), torch.stack([zero, p[:, 1], zero], 1)], 1)
    return _affine(x, theta)


def apply_rotate(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    c, s, zero = torch.cos(p), torch.sin(p), torch.zeros_like(p)
    theta = torch.stack([torch.stack([c, -s, zero], 1), torch.stack([s, c, zero], 1)], 1)
    return _affine(x, theta)


class Op(NamedTuple):
    sample: Callable[[int, Size, "torch.Generator | None"], torch.Tensor]
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


OPS: dict[str, Op] = {
    "color": Op(sample_color, apply_color), "crop": Op(sample_crop, apply_crop),
    "cutout": Op(sample_cutout, apply_cutout), "flip": Op(sample_flip, apply_flip),
    "scale": Op(sample_scale, apply_scale), "rotate": Op(sample_rotate, apply_rotate),
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
    """``dsa(x, generator)``: one random op of the strategy, its parameters drawn per image.

    ``shared`` (here or per call) draws one set for the whole batch instead, for siamese pairs.
    Randomness comes only from ``generator`` (the global RNG when None), so equal generators give
    equal results."""

    def __init__(self, strategy: str = "color_crop_cutout_flip_scale_rotate", shared: bool = False):
        self.strategy = strategy
        self.ops = validate_strategy(strategy, "dsa strategy")
        self.shared = shared

    def draw(self, x: torch.Tensor, generator: torch.Generator | None = None,
             shared: bool | None = None) -> tuple[str, torch.Tensor]:
        """The op and its parameters for batch ``x`` (first dimension 1 when shared)."""
        shared = self.shared if shared is None else shared
        op = self.ops[int(_randint(0, len(self.ops), 1, generator))]
        n = 1 if shared else x.shape[0]
        return op, OPS[op].sample(n, (x.shape[2], x.shape[3]), generator)

    @staticmethod
    def apply(x: torch.Tensor, op: str, params: torch.Tensor) -> torch.Tensor:
        """Augment ``x`` with ``draw``'s result; one row of parameters serves the whole batch."""
        if params.shape[0] == 1 and x.shape[0] != 1:
            params = params.expand(x.shape[0], *params.shape[1:])
        elif params.shape[0] != x.shape[0]:
            raise RayddError(f"DSA {op}: {params.shape[0]} parameter rows for a batch of {x.shape[0]} "
                             "images; expected one row per image or a single shared row")
        return OPS[op].apply(x, params).contiguous()

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None,
                 shared: bool | None = None) -> torch.Tensor:
        return self.apply(x, *self.draw(x, generator, shared))

    def __repr__(self) -> str:
        return f"DSA({self.strategy!r}{', shared=True' if self.shared else ''})"


# ---------------------------------------------------------------- CutMix (IDC; HMDC's training and evaluation)

def cutmix(x: Tensor, targets: Tensor, g: torch.Generator, beta: float = 1.0) -> tuple[Tensor, Tensor]:
    """IDC's CutMix: λ ~ Beta(β, β), a box of side √(1-λ) around a uniform centre (clipped), pasted
    from a permutation of the batch; targets mixed by the pasted area. λ and the box are drawn
    before the permutation, so equally seeded calls on batches of any size share them."""
    h, w = x.shape[2], x.shape[3]
    lam = _beta(beta, g)
    rat = (1.0 - lam) ** 0.5
    ch, cw = int(h * rat), int(w * rat)
    cy, cx = int(torch.randint(h, (), generator=g)), int(torch.randint(w, (), generator=g))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    perm = torch.randperm(x.shape[0], generator=g).to(x.device)
    mask = torch.zeros(1, 1, h, w, device=x.device, dtype=x.dtype)
    mask[..., y0:y1, x0:x1] = 1
    out = x * (1 - mask) + x[perm] * mask
    kept = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    return out, kept * targets + (1.0 - kept) * targets[perm]


def _beta(beta: float, g: torch.Generator) -> float:
    """A Beta(β, β) draw from ``g`` (torch's Beta sampler takes no generator): uniform for β = 1,
    else Jöhnk's method."""
    while True:
        u = torch.rand(2, generator=g, dtype=torch.float64)
        if beta == 1.0:
            return float(u[0])
        p, q = float(u[0]) ** (1 / beta), float(u[1]) ** (1 / beta)
        if 0 < p + q <= 1:
            return p / (p + q)
