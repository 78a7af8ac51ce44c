"""HMDC's building blocks (paper 004; ../shared/references/hmdc-official.md): multi-formation,
k-means, the IDC augmentation (its CutMix is raydd.augment's), and the gradient distances (the
Gradient Balance Module is raydd.methods.gbm, shared with APM + MetaDD).

Randomness is counter-based (:func:`generator`): every draw comes from a generator seeded by the
group seed and a key such as (step, class), so a class's update depends on nothing but its own
inputs and a class-sharded run equals a single-process one.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..augment import OPS
from ..errors import DataError

GEOMETRIC = ("crop", "scale", "rotate")


def generator(seed: int, *key: object) -> torch.Generator:
    """A CPU generator for ``(seed, *key)``, independent of every other key."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


# ---------------------------------------------------------------- multi-formation (IDC, factor f)

def pack(x: Tensor, factor: int) -> Tensor:
    """``f²·n`` images → ``n`` images of f×f tiles: chunk k (of n images) goes to tile k, row-major,
    each bilinearly down-sampled (align_corners=True) to H/f (the IDC initialisation)."""
    if factor == 1:
        return x.clone()
    n = x.shape[0] // factor ** 2
    h, w = x.shape[2] // factor, x.shape[3] // factor
    out = x.new_zeros(n, x.shape[1], x.shape[2], x.shape[3])
    for k in range(factor ** 2):
        i, j = divmod(k, factor)
        out[:, :, i * h:(i + 1) * h, j * w:(j + 1) * w] = F.interpolate(
            x[k * n:(k + 1) * n], size=(h, w), mode="bilinear", align_corners=True)
    return out


def unpack(x: Tensor, factor: int) -> Tensor:
    """``n`` packed images → ``f²·n`` full-size ones, tile-major (tile k of every image, then k+1),
    each tile bilinearly up-sampled (align_corners=True); labels repeat ``f²`` times likewise."""
    if factor == 1:
        return x
    h, w = x.shape[2] // factor, x.shape[3] // factor
    tiles = [x[:, :, i * h:(i + 1) * h, j * w:(j + 1) * w] for i in range(factor) for j in range(factor)]
    return F.interpolate(torch.cat(tiles), size=x.shape[2:], mode="bilinear", align_corners=True)


# ---------------------------------------------------------------- k-means (the official kernel's rules)

def kmeans(x: Tensor, k: int, g: torch.Generator, iters: int = 100) -> Tensor:
    """k×D centroids: k-means++ seeding with the next seed drawn ∝ D (not D², as the official
    kernel), then at most ``iters`` Lloyd steps, stopping once no assignment changes. An empty
    cluster keeps its centroid."""
    x = x.flatten(1).float()
    n = x.shape[0]
    if not 1 <= k <= n:
        raise DataError(f"k-means needs 1 <= k <= n samples, got k={k} for n={n}")
    centers = x[int(torch.randint(n, (), generator=g))][None]
    dist = torch.cdist(x, centers)[:, 0]
    for _ in range(1, k):
        p = dist.cpu().double()
        p = p / p.sum() if p.sum() > 0 else torch.full_like(p, 1.0 / n)
        nxt = x[int(torch.multinomial(p, 1, generator=g))][None]
        centers = torch.cat([centers, nxt])
        dist = torch.minimum(dist, torch.cdist(x, nxt)[:, 0])
    assign = None
    for _ in range(iters):
        new = torch.cdist(x, centers).argmin(1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)[:, None]
        centers = torch.where(counts > 0, sums / counts.clamp_min(1), centers)
    return centers


def nearest(x: Tensor, centers: Tensor) -> Tensor:
    """For each centroid the index of its nearest sample; duplicates possible (the real batch)."""
    return torch.cdist(centers, x.flatten(1).float()).argmin(1)


def nearest_distinct(x: Tensor, centers: Tensor) -> Tensor:
    """For each centroid in turn the nearest sample not already taken (the initialisation)."""
    d = torch.cdist(centers, x.flatten(1).float())
    picks: list[int] = []
    for row in d:
        if picks:
            row = row.clone()
            row[picks] = float("inf")
        picks.append(int(row.argmin()))
    return torch.tensor(picks, dtype=torch.long)


# ---------------------------------------------------------------- augmentation: IDC DSA + CutMix

def augment(x: Tensor, ops: Sequence[str], g: torch.Generator, shared: bool) -> Tensor:
    """IDC's ``diff_augment``: flip, colour, ONE of {crop, scale, rotate}, cutout, each in the
    strategy (raydd's DSA ops and constants). ``shared``: one parameter set for the batch, drawn
    independently of its size — two calls with equally seeded generators augment a real and a
    synthetic batch alike (siamese); else one set per image."""
    n = 1 if shared else x.shape[0]
    size = (x.shape[2], x.shape[3])

    def op(name: str, x: Tensor) -> Tensor:
        p = OPS[name].sample(n, size, g)
        return OPS[name].apply(x, p.expand(x.shape[0], *p.shape[1:]) if shared else p)

    for name in ("flip", "color"):
        if name in ops:
            x = op(name, x)
    geo = [o for o in GEOMETRIC if o in ops]
    if geo:
        x = op(geo[int(torch.randint(len(geo), (), generator=g))], x)
    if "cutout" in ops:
        x = op("cutout", x)
    return x


def soft_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy against soft targets, mean over the batch."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


# ---------------------------------------------------------------- gradient distances

def sse(a: Sequence[Tensor | None], b: Sequence[Tensor | None]) -> Tensor:
    """Σ over every parameter tensor of Σ (a − b)², skipping parameters without a gradient (the code)."""
    return sum(((x - y) ** 2).sum() for x, y in zip(a, b) if x is not None and y is not None)


def layerwise(a: Sequence[Tensor | None], b: Sequence[Tensor | None]) -> Tensor:
    """DC's distance: per parameter tensor Σ_rows (1 − cos) over its output rows; 1-D tensors
    (biases, norms) count 0."""
    total = 0.0
    for x, y in zip(a, b):
        if x is None or y is None or x.dim() == 1:
            continue
        x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
        cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1) + 1e-6)
        total = total + (1 - cos).sum()
    return total


DISTANCES = {"sse": sse, "layerwise": layerwise}
