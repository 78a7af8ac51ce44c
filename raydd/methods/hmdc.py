"""HMDC: heterogeneous model dataset condensation (paper 004), as the official code runs it
(../shared/references/hmdc-official.md), in plain PyTorch.

Against the fact sheet:
  §1 init        ``init_packed``: k-means (k = f²·ipc) on an untrained model1's embeddings, the
                 nearest unused image per centroid, packed f×f (multi-formation, f = 2).
  §1 step o      ``ImageUpdate``: per class, a k-means-selected real batch (refreshed every 10
                 steps, model1 / model2 alternately), the shuffled unpacked synthetic images, one
                 siamese augmentation (IDC DSA + CutMix) for both, L¹, L² (§2) and L³ (§4b),
                 GBM (§3), SGD with momentum, clamping to the pixel range.
  §1 training    ``PairTrajectory`` (hmdc_pair.py): both models on real data, then the SSD.
Deliberate deviations: the ConvNet's conv layers are trained after every reset (the code's
optimiser keeps the pre-reset parameters, §7.1); the ViT is random-init (``_scratch``) with its
patch fitted to the image instead of 224 px inputs; all randomness is counter-based per
(step, class), so the classes' updates are independent.

The seam for a class-sharded run. The trajectory depends on real data only:
``PairTrajectory.publish()`` is version t (``advance()`` makes t+1), ``load_published`` puts it into
a worker's own pair (``fresh_pair``). A worker owns ``ClassShard``s (``init_packed`` for its
classes, ``ClassShard.select``) and runs image step t as ``ImageUpdate(...)(shard, pair_t, t,
real_by_class)``; ``ClassShard.merge`` of a partition of the classes equals the single-process
shard bit for bit (tests/test_hmdc.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..augment import cutmix, validate_strategy
from ..config import DistillConfig
from ..config.hmdc import HMDCConfig
from ..errors import ConfigError, DataError, RayddError
from .base import Method, NonFiniteImages, RealImages, Services, Setup, register_method
from .hmdc_pair import PairModels, PairTrajectory, fresh_pair
from .gbm import GBM_EPS, channel_normalise, gbm_weights
from .hmdc_parts import DISTANCES, augment, generator, kmeans, nearest, nearest_distinct, pack, soft_ce, unpack

TARGETS = 3          # L¹, L², L³ (GBM accumulator columns)


@dataclass
class ClassShard:
    """The synthetic side of some classes, class-major in ``classes`` order: what a class-sharded
    image worker owns. ``real_idx`` (−1 before the first selection) indexes each class's real images."""
    classes: list[int]
    images: Tensor       # len(classes)·ipc packed images
    momentum: Tensor
    gbm: Tensor          # len(classes) × 3 accumulators
    real_idx: Tensor     # len(classes) × batch_real

    @property
    def ipc(self) -> int:
        return self.images.shape[0] // len(self.classes)

    def select(self, classes: Sequence[int]) -> "ClassShard":
        pos = [self.classes.index(c) for c in classes]
        rows = torch.cat([torch.arange(p * self.ipc, (p + 1) * self.ipc) for p in pos]).to(self.images.device)
        return ClassShard(list(classes), self.images[rows].clone(), self.momentum[rows].clone(),
                          self.gbm[pos].clone(), self.real_idx[pos].clone())

    @staticmethod
    def merge(shards: Sequence["ClassShard"]) -> "ClassShard":
        """The union of disjoint shards, sorted by class."""
        parts = sorted(((c, s.select([c])) for s in shards for c in s.classes), key=lambda p: p[0])
        return ClassShard([c for c, _ in parts], *(torch.cat([getattr(p, f) for _, p in parts])
                                                   for f in ("images", "momentum", "gbm", "real_idx")))


class ImageUpdate:
    """Image step t of a shard's classes, given the pair at version t; nothing else is read, so
    any partition of the classes gives the same images as one call for all of them."""

    def __init__(self, cfg: HMDCConfig, *, seed: int, ops: Sequence[str], lr: float, momentum: float,
                 lo: Tensor, hi: Tensor, num_classes: int):
        self.cfg, self.seed, self.ops = cfg, seed, list(ops)
        self.lr, self.mom, self.lo, self.hi, self.num_classes = lr, momentum, lo, hi, num_classes
        self.seconds: dict[str, float] = {}   # per phase, of the last call (its stats stay plain numbers)

    def __call__(self, shard: ClassShard, pair: PairModels, t: int, real: Mapping[int, Tensor]) -> dict:
        """Updates ``shard`` in place (all classes, or none if any went non-finite); returns stats."""
        self.seconds = dict.fromkeys(("clustering", "augment", "matching", "image_grad"), 0.0)
        new = [self._class(shard, i, c, pair, t, real[c]) for i, c in enumerate(shard.classes)]
        images = torch.cat([n[0] for n in new])
        if not torch.isfinite(images).all():
            raise NonFiniteImages(f"HMDC images became non-finite at step {t}; lower distill.lr_img")
        shard.images, shard.momentum = images, torch.cat([n[1] for n in new])
        shard.gbm, shard.real_idx = torch.stack([n[2] for n in new]), torch.stack([n[3] for n in new])
        losses = torch.stack([n[4] for n in new])       # classes × targets
        return {"loss": float(losses.sum()), **{f"L{k + 1}": float(losses[:, k].sum())
                                                for k in range(losses.shape[1])}}

    def _class(self, shard: ClassShard, i: int, c: int, pair: PairModels, t: int, real_c: Tensor):
        cfg, ipc = self.cfg, shard.ipc
        o = t % cfg.reset_every
        acc = torch.full_like(shard.gbm[i], GBM_EPS) if o == 0 else shard.gbm[i].clone()
        idx = shard.real_idx[i]
        clock = time.perf_counter()
        if o % cfg.select_every == 0 or bool((idx < 0).all()):
            which = 1 if (o // cfg.select_every) % 2 == 0 else 2
            emb = pair.embed(real_c, which)
            k = min(cfg.batch_real, len(real_c))
            centers = kmeans(emb, k, generator(self.seed, "select", t, c), cfg.kmeans_iters)
            idx = torch.full_like(idx, -1)
            idx[:k] = nearest(emb, centers).to(idx.device)
        xr = real_c[idx[idx >= 0]]
        clock = self._lap("clustering", clock)
        packed = shard.images[i * ipc:(i + 1) * ipc].detach().requires_grad_(True)
        syn = unpack(packed, cfg.factor)
        syn = syn[torch.randperm(len(syn), generator=generator(self.seed, "shuffle", t, c))[:cfg.batch_syn]
                  .to(syn.device)]
        target = F.one_hot(torch.tensor([c]), self.num_classes).to(syn)
        batches = []
        for x in (xr, syn):      # siamese: equal generators, so one draw of every parameter for both
            g = generator(self.seed, "siamese", t, c)
            x = augment(x, self.ops, g, shared=True)
            tgt = target.expand(len(x), -1)
            batches += list(cutmix(x, tgt, g, cfg.cutmix_beta) if cfg.cutmix else (x, tgt))
        clock = self._lap("augment", clock)
        losses = matching_losses(pair, *batches, distance=cfg.match, md=cfg.md)
        clock = self._lap("matching", clock)
        if cfg.gbm:
            if o % cfg.gbm_every == 0:     # sample each target's own gradient into the accumulator
                grads = [torch.autograd.grad(L, packed, retain_graph=True)[0] for L in losses]
                acc[:len(grads)] += torch.stack([g.abs().max() for g in grads])
                w = gbm_weights(acc[:len(grads)])
                grad = sum(wk * g for wk, g in zip(w, grads))
            else:
                w = gbm_weights(acc[:len(losses)])
                grad = torch.autograd.grad(sum(wk * L for wk, L in zip(w, losses)), packed)[0]
            grad = channel_normalise(grad)
        else:
            grad = torch.autograd.grad(sum(losses), packed)[0]
        buf = self.mom * shard.momentum[i * ipc:(i + 1) * ipc] + grad
        new = torch.maximum(torch.minimum(packed.detach() - self.lr * buf, self.hi), self.lo)
        self._lap("image_grad", clock)
        loss = torch.stack([L.detach() for L in losses])
        return new, buf, acc, idx, F.pad(loss, (0, TARGETS - len(loss)))

    def _lap(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] += now - since
        return now


def matching_losses(pair: PairModels, xr: Tensor, tr: Tensor, xs: Tensor, ts: Tensor, *,
                    distance: str = "sse", md: bool = True) -> list[Tensor]:
    """[L¹, L², L³]: per net the distance between the CE gradients of the real and the synthetic
    batch over all its parameters; L³ the same for the MD loss's gradients, summed over both nets
    (the projections and M excluded). Real gradients are constants, synthetic ones differentiable."""
    dist = DISTANCES[distance]
    p1, p2 = list(pair.net1.parameters()), list(pair.net2.parameters())

    def grads(x: Tensor, t: Tensor, graph: bool) -> list[Sequence[Tensor | None]]:
        l1, f1, l2, f2 = pair.outputs(x)
        kw = dict(create_graph=graph, retain_graph=True, allow_unused=True)
        out = [torch.autograd.grad(soft_ce(l1, t), p1, **kw), torch.autograd.grad(soft_ce(l2, t), p2, **kw)]
        if md:
            m = pair.ssd.loss(f1, f2)
            out += [torch.autograd.grad(m, p1, **kw), torch.autograd.grad(m, p2, **kw)]
        return out if graph else [[None if g is None else g.detach() for g in gs] for gs in out]

    real, syn = grads(xr, tr, False), grads(xs, ts, True)
    out = [dist(real[0], syn[0]), dist(real[1], syn[1])]
    if md:
        out.append(dist(real[2], syn[2]) + dist(real[3], syn[3]))
    return out


def decode(packed: Tensor, ipc: int, factor: int, classes: int) -> tuple[Tensor, Tensor]:
    """Class-major packed images (ipc per class) to the factor²·ipc decoded ones per class, labelled."""
    parts = [unpack(packed[c * ipc:(c + 1) * ipc], factor) for c in range(classes)]
    return torch.cat(parts), torch.arange(classes).repeat_interleave(factor * factor * ipc)


def pixel_bounds(real: RealImages, device) -> tuple[Tensor, Tensor]:
    """1×C×1×1 bounds of the pixel range [0, 1] in the normalised space (the code's clamp)."""
    view = (1, len(real.mean), 1, 1)
    mean, std = (torch.tensor(v, dtype=torch.float32, device=device).view(view) for v in (real.mean, real.std))
    return (0 - mean) / std, (1 - mean) / std


def init_packed(cfg: HMDCConfig, real_by_class: Mapping[int, Tensor], ipc: int, shape: tuple[int, int, int],
                seed: int, device) -> Tensor:
    """f²·ipc real images per class packed into ipc, class-major in class order: the nearest unused
    image to each k-means centroid on a fresh untrained model1 (``kmeans``), or random ones. Each
    class depends only on its own images, so a class shard can initialise itself."""
    n = cfg.factor ** 2 * ipc
    net = fresh_pair(cfg, shape, int(generator(seed, "init-net").initial_seed()), device) \
        if cfg.init == "kmeans" else None
    out = []
    for c, xc in sorted(real_by_class.items()):
        if len(xc) < n:
            raise DataError(f"class {c} has {len(xc)} real images; HMDC with ipc={ipc} and "
                            f"factor={cfg.factor} initialises from {n}")
        g = generator(seed, "init", c)
        if net is None:
            pick = torch.randperm(len(xc), generator=g)[:n]
        else:
            emb = net.embed(xc, 1)
            pick = nearest_distinct(emb, kmeans(emb, n, g, cfg.kmeans_iters))
        out.append(pack(xc[pick.to(xc.device)], cfg.factor))
    return torch.cat(out)


@register_method("hmdc")
class HMDCGroup(Method):
    """One group: ``ipc`` packed images per class (the storage budget; :meth:`decoded` gives the
    f²·ipc images per class that evaluation trains on), the pair's trajectory and its own state.
    One round = one image step t, then the pair advances to version t+1."""

    def __init__(self, cfg: DistillConfig, labels: Tensor, *, real: RealImages, shape: tuple[int, int, int],
                 ops: Sequence[str], seed: int, device):
        h = cfg.hmdc
        self.cfg, self.h, self.shape, self.round, self.seed = cfg, h, shape, 0, seed
        classes = shape[1]
        counts = torch.bincount(labels.cpu(), minlength=classes)
        if len(counts) != classes or not bool((counts == counts[0]).all()) or int(counts[0]) < 1:
            raise RayddError(f"HMDC needs the same number of images for each of {classes} classes, got "
                             f"{counts.tolist()}")
        self.ipc = int(counts[0])
        self.y = torch.arange(classes).repeat_interleave(self.ipc).to(device)
        x = real.x.float().to(device)
        self.real_x, self.real_y = x, real.y.long().to(device)
        self.real_by_class = {c: x[self.real_y == c] for c in range(classes)}
        self.lo, self.hi = pixel_bounds(real, device)
        self.ops = list(ops)
        self.trajectory = PairTrajectory(h, shape, self.real_x, self.real_y, ops, seed, device)
        images = init_packed(h, self.real_by_class, self.ipc, shape, seed, device)
        self.shard = ClassShard(list(range(classes)), images, torch.zeros_like(images),
                                torch.full((classes, TARGETS), GBM_EPS, device=device),
                                torch.full((classes, h.batch_real), -1, dtype=torch.long, device=device))

    @classmethod
    def create(cls, cfg: DistillConfig, images: Tensor, labels: Tensor, *, seed: int,
               setup: Setup) -> "HMDCGroup":
        if setup.real is None:
            raise ConfigError("distill.method: 'hmdc' matches real batches every step and needs the real "
                              "training split in memory; data.zca is not supported with it")
        if setup.image_size % cfg.hmdc.factor:
            raise ConfigError(f"distill.hmdc.factor: {cfg.hmdc.factor} does not divide the image size "
                              f"{setup.image_size}")
        ops = validate_strategy(setup.dsa_strategy, "data.dsa_strategy") if setup.dsa_strategy else []
        return cls(cfg, labels, real=setup.real(), shape=(setup.in_channels, setup.num_classes, setup.image_size),
                   ops=ops, seed=seed, device=images.device)

    def updater(self) -> ImageUpdate:
        return ImageUpdate(self.h, seed=self.seed, ops=self.ops, lr=self.cfg.lr_img,
                           momentum=self.cfg.momentum_img, lo=self.lo, hi=self.hi, num_classes=self.shape[1])

    def step(self, services: Services | None = None) -> dict:
        t = self.round
        if self.trajectory.step != t:
            raise RayddError(f"HMDC: the pair is at version {self.trajectory.step}, the images at step {t}")
        update = self.updater()
        stats = update(self.shard, self.trajectory.models, t, self.real_by_class)
        self.trajectory.advance()
        self.round += 1
        # clustering (k-means real batches), augment (siamese DSA + CutMix), matching (both models'
        # gradients, MD's included), image_grad (its backward, GBM), models and ssd (the pair's training)
        return {"round": t, **stats, "seconds": {**update.seconds, **self.trajectory.seconds}}

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self.trajectory.reseed(seed)

    @property
    def images(self) -> Tensor:
        return self.shard.images

    @property
    def labels(self) -> Tensor:
        return self.y

    def decoded(self) -> tuple[Tensor, Tensor]:
        """The f²·ipc full-size images per class (class-major) and their labels: the training set."""
        return decode(self.shard.images, self.ipc, self.h.factor, self.shape[1])

    def synset(self) -> tuple[Tensor, Tensor]:
        return self.decoded()

    @classmethod
    def synset_per_stored(cls, cfg: DistillConfig) -> int:
        return cfg.hmdc.factor ** 2

    def state_dict(self) -> dict[str, Tensor]:
        s = self.shard
        d = {"images": s.images, "labels": self.y, "momentum": s.momentum, "gbm": s.gbm, "real_idx": s.real_idx,
             "round": torch.tensor([self.round]), "seed": torch.tensor([self.seed])}
        d = {k: v.detach().cpu().clone() for k, v in d.items()}
        d.update(self.trajectory.state_dict())
        return d

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        missing = {"images", "momentum", "gbm", "real_idx", "round", "seed", "pair_step"} - set(d)
        if missing:
            raise RayddError(f"group state lacks {', '.join(sorted(missing))}; is it an HMDC group checkpoint?")
        if d["images"].shape != self.shard.images.shape:
            raise RayddError(f"group state holds images {tuple(d['images'].shape)}, "
                             f"expected {tuple(self.shard.images.shape)}")
        dev = self.shard.images.device
        self.shard = ClassShard(list(range(self.shape[1])), *(d[k].to(dev).clone() for k in
                                                               ("images", "momentum", "gbm", "real_idx")))
        self.round, self.seed = int(d["round"]), int(d["seed"])
        self.trajectory.load_state_dict(d)
