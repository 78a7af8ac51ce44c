"""Several evaluation trials of one architecture trained at once, as one stacked ensemble.

A small net on a few hundred images leaves a core mostly idle: each step is a handful of tiny
kernels and Python between them. Widening S such nets into one (:class:`Stack`: grouped
convolutions, S-times wider norms and linear layers) turns S small steps into one step of
S-times larger kernels. Nothing else is shared: every member has its own initialisation
(``torch.manual_seed(seed)`` then ``build``, as a lone trial), its own data (a seed's random
subset, or the synset), its own generator for the batch order and the per-image DSA draws, drawn
in the order :func:`raydd.train.train_classifier` draws them, and its own loss — the summed loss's
gradient with respect to member s's weights is member s's gradient, and SGD's update is
elementwise — so a member follows its lone trial's trajectory up to floating-point rounding
(tests/test_stacked.py).

Stacked: ``hard`` (cross-entropy, no CutMix) and ``soft`` (L1 or KL to the stored logits) on
stored sets. ``kd``, ``elf``, CutMix and the whole-data baseline train alone, as do trials under a
scheduler or searcher (they need each trial's own intermediate reports).
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import EvalConfig
from ..errors import RayddError
from ..synset import Synset

STACKED_MODES = ("hard", "soft")


def stackable(mode: str, ecfg: EvalConfig) -> bool:
    """Whether trials of ``mode`` under these settings may train stacked."""
    return mode in STACKED_MODES and not (mode == "hard" and ecfg.hard_cutmix)


class StackedLinear(nn.Module):
    """S linear layers as one: input [B, S·F] (member s's features in block s), output [B, S·K]."""

    def __init__(self, linears: Sequence[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in linears]))        # S, K, F
        self.bias = (nn.Parameter(torch.stack([m.bias.detach() for m in linears]))
                     if linears[0].bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        S, K, Fi = self.weight.shape
        y = torch.bmm(x.reshape(x.shape[0], S, Fi).transpose(0, 1), self.weight.transpose(1, 2))   # S, B, K
        if self.bias is not None:
            y = y + self.bias[:, None]
        return y.transpose(0, 1).reshape(x.shape[0], S * K)


def _cat(mods: Sequence[nn.Module], name: str) -> nn.Parameter:
    return nn.Parameter(torch.cat([getattr(m, name).detach() for m in mods]))


class Stack:
    """S nets of one architecture as ONE wide net: member s owns channel block s of every layer.

    Convolutions become grouped ones (``groups`` × S), norms get S× the channels (per-channel or
    per-group statistics stay each member's own: the batch dimension holds sample b of every member),
    linear layers become :class:`StackedLinear`; pooling, activations, residual adds and flattening
    act per channel and need nothing. The input is the members' batches side by side on the channel
    axis. A net whose forward mixes channels elsewhere (a ViT's tokens, a LayerNorm over features)
    would silently couple members, so :meth:`build` compares the wide net's logits with each
    member's and refuses any such architecture (:class:`NotStackable`).

    Why not ``torch.func.vmap`` over stacked states: in a one-off timing on a 2-core EPYC (1 thread,
    4 members, ConvNet-16 on 8x8, forward and backward) its batched convolutions ran at 0.83x of
    four separate nets (layout copies around every op), the wide net at 2.0x.
    """

    def __init__(self, net: nn.Module, size: int, classes: int):
        self.net, self.size, self.classes = net, size, classes

    @classmethod
    def build(cls, models: Sequence[nn.Module], probe: torch.Tensor) -> "Stack":
        """Widen ``models`` (left untouched) into one net; ``probe`` is one member's input batch."""
        S = len(models)
        net = copy.deepcopy(models[0])
        parts = [dict(m.named_modules()) for m in models]
        for name, mod in list(net.named_modules()):
            same = [p[name] for p in parts]
            if isinstance(mod, nn.Linear):
                parent, _, leaf = name.rpartition(".")
                setattr(net.get_submodule(parent) if parent else net, leaf, StackedLinear(same))
            elif isinstance(mod, nn.Conv2d):
                mod.weight = _cat(same, "weight")
                if mod.bias is not None:
                    mod.bias = _cat(same, "bias")
                mod.in_channels, mod.out_channels, mod.groups = mod.in_channels * S, mod.out_channels * S, mod.groups * S
            elif isinstance(mod, nn.GroupNorm):
                if mod.affine:
                    mod.weight, mod.bias = _cat(same, "weight"), _cat(same, "bias")
                mod.num_groups, mod.num_channels = mod.num_groups * S, mod.num_channels * S
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                if mod.affine:
                    mod.weight, mod.bias = _cat(same, "weight"), _cat(same, "bias")
                if mod.track_running_stats:
                    mod.running_mean = torch.cat([m.running_mean for m in same])
                    mod.running_var = torch.cat([m.running_var for m in same])
                mod.num_features *= S
        with torch.no_grad():
            ref = torch.stack([m.eval()(probe) for m in models], 1)          # B, S, K
            for m in models:
                m.train()
            try:
                out = net.eval()(probe.repeat(1, S, *[1] * (probe.dim() - 2))).view(ref.shape)
            except RuntimeError as e:
                raise NotStackable(f"its forward does not run widened ({str(e).splitlines()[0][:120]})") from None
            finally:
                net.train()
        err = float((out - ref).abs().max())
        if not err <= 1e-4 * max(1.0, float(ref.abs().max())):
            raise NotStackable(f"the widened net's logits differ from its members' by {err:.2g} "
                               f"(its forward mixes channels outside convolutions, norms and linear layers)")
        return cls(net, S, ref.shape[2])

    def to(self, device: torch.device) -> "Stack":
        self.net.to(device)
        return self

    def train(self, mode: bool = True) -> "Stack":
        self.net.train(mode)
        return self

    def parameters(self):
        return self.net.parameters()

    def __call__(self, x: torch.Tensor, shared: bool = False) -> torch.Tensor:
        """Logits [S, B, classes] of x [S, B, C, ...] (each member its own batch) or, ``shared``, x [B, C, ...]."""
        if shared:
            wide = x.repeat(1, self.size, *[1] * (x.dim() - 2))
        else:
            wide = x.transpose(0, 1).reshape(x.shape[1], -1, *x.shape[3:])
        return self.net(wide).view(x.shape[0] if shared else x.shape[1], self.size, self.classes).transpose(0, 1)


class NotStackable(RayddError):
    """An architecture whose members cannot share one wide net; its trials train alone."""


def _member_losses(mode: str, ecfg: EvalConfig, logits: torch.Tensor, y: torch.Tensor,
                   targets: torch.Tensor | None) -> torch.Tensor:
    """Each member's mean loss over its batch, [S] (the lone trial's loss, per member)."""
    S, B = logits.shape[:2]
    if mode == "hard":
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(S, B).mean(1)
    if ecfg.soft_loss == "l1":
        return (logits - targets).abs().mean(dim=(1, 2))
    t = float(ecfg.soft_temperature)
    kl = F.kl_div(F.log_softmax(logits / t, dim=2), F.softmax(targets / t, dim=2), reduction="none")
    return kl.sum(dim=2).mean(dim=1) * (t * t)


def train_stacked(stack: Stack, sets: Sequence[Sequence[torch.Tensor]], mode: str, ecfg: EvalConfig, *,
                  epochs: int, lr: float, dsa: Callable | None, generators: Sequence[torch.Generator],
                  device: torch.device,
                  progress: Callable[[int, list[float]], None] | None = None) -> list[list[float]]:
    """Train the stack in place; ``sets[s]`` = member s's (x, y[, soft targets]) on ``device``.
    Returns each member's mean training loss per epoch; ``progress(epoch, losses)`` after each."""
    from ..train import autocast, decay_epoch
    n = sets[0][0].shape[0]
    if any(s[0].shape[0] != n for s in sets):
        raise RayddError(f"stacked trials need sets of one size; got {sorted({s[0].shape[0] for s in sets})} images")
    bs = ecfg.batch_size
    opt = torch.optim.SGD(list(stack.parameters()), lr=lr, momentum=ecfg.momentum, weight_decay=ecfg.weight_decay)
    decay_at = decay_epoch(epochs)
    stack.train(True)
    history: list[list[float]] = [[] for _ in sets]
    for epoch in range(epochs):
        if epoch == decay_at:
            for group in opt.param_groups:
                group["lr"] = lr * 0.1
        # the lone trial's draws, per member: its epoch's permutation, then DSA batch by batch
        orders = [torch.randperm(n, generator=g) for g in generators]
        total = torch.zeros(len(sets), device=device)
        for start in range(0, n, bs):
            xs, ys, ts = [], [], []
            for s, (tensors, g) in enumerate(zip(sets, generators)):
                idx = orders[s][start:start + bs].to(device)
                x = tensors[0][idx]
                xs.append(dsa(x, g) if dsa is not None else x)
                ys.append(tensors[1][idx])
                if len(tensors) > 2:
                    ts.append(tensors[2][idx])
            x, y = torch.stack(xs), torch.stack(ys)
            with autocast(device, ecfg.precision):
                losses = _member_losses(mode, ecfg, stack(x), y, torch.stack(ts) if ts else None).float()
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            opt.step()
            total += losses.detach() * y.shape[1]
        means = (total / n).tolist()   # one device sync per epoch
        for s, m in enumerate(means):
            if not math.isfinite(m):
                raise RayddError(f"training diverged in epoch {epoch + 1} (loss {m}); lower the learning rate {lr}")
            history[s].append(m)
        if progress is not None:
            progress(epoch + 1, means)
    return history


@torch.no_grad()
def stacked_accuracy(stack: Stack, batches: Iterable, device: torch.device,
                     precision: str = "fp32") -> list[float]:
    """Each member's top-1 accuracy over shared ``(x, y, …)`` batches, in eval mode."""
    from ..train import autocast
    stack.train(False)
    correct, total = torch.zeros(stack.size, dtype=torch.long, device=device), 0
    try:
        for x, y, *_ in batches:
            x, y = x.to(device), y.to(device)
            with autocast(device, precision):
                correct += (stack(x, shared=True).argmax(2) == y).sum(1)
            total += y.shape[0]
    finally:
        stack.train(True)
    if total == 0:
        raise RayddError("no test samples to measure accuracy on")
    return (correct.double() / total).tolist()


def evaluate_stacked(arch: str, mode: str, seeds: Sequence[int], trains: Sequence[Synset],
                     test_batches: Callable[[], Iterable], ecfg: EvalConfig, *,
                     image_shape: tuple[int, int, int], num_classes: int, lr: float | None = None,
                     dsa_strategy: str | None = None, device: str | torch.device = "cpu",
                     on_epoch: Callable[[int, list[float]], None] | None = None,
                     val_batches: Callable[[], Iterable] | None = None) -> list[dict[str, Any]]:
    """:func:`~raydd.evaluate.protocol.evaluate_once` for member s = (``seeds[s]``, ``trains[s]``),
    all trained at once; one result dict per member, as a lone trial's (``seconds``: the pack's
    time shared equally, ``stacked``: the pack's size)."""
    from ..augment import DSA
    from ..models import build
    from ..train import resolve_device
    from .protocol import _check_set, check_mode

    check_mode(mode)
    if not stackable(mode, ecfg):
        raise RayddError(f"mode {mode!r} (hard_cutmix {ecfg.hard_cutmix}) trains alone; stacked: hard without "
                         f"CutMix and soft")
    if len(seeds) != len(trains) or not seeds:
        raise ValueError("evaluate_stacked needs one set per seed")
    t0 = time.time()
    device = resolve_device(device)
    lr = float(lr if lr is not None else ecfg.lr)
    C, H, W = image_shape
    models = []
    for seed, train in zip(seeds, trains):
        _check_set(train, mode, image_shape, num_classes)
        torch.manual_seed(int(seed))
        models.append(build(arch, C, num_classes, H))
    stack = Stack.build(models, trains[0].images[:2].float()).to(device)
    sets = [tuple(t.to(device) for t in (tr.images.float(), tr.labels.long())
                  + ((tr.soft_labels.float(),) if mode == "soft" else ())) for tr in trains]
    dsa = DSA(dsa_strategy) if ecfg.dsa and dsa_strategy else None
    gens = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    history = train_stacked(stack, sets, mode, ecfg, epochs=int(ecfg.epochs), lr=lr, dsa=dsa, generators=gens,
                            device=device, progress=on_epoch)
    val = stacked_accuracy(stack, val_batches(), device, ecfg.precision) if val_batches is not None else None
    accs = stacked_accuracy(stack, test_batches(), device, ecfg.precision)
    seconds = time.time() - t0
    return [{"test_acc": accs[s], "train_loss_first": history[s][0], "train_loss_last": history[s][-1],
             "epochs": int(ecfg.epochs), "lr": lr, "seconds": seconds / len(seeds), "stacked": len(seeds),
             **({"val_acc": val[s]} if val is not None else {})} for s in range(len(seeds))]


def stack_refusal(arch: str, image_shape: tuple[int, int, int], num_classes: int) -> str | None:
    """Why ``arch`` cannot train stacked (two tiny members widened and compared), or None."""
    from ..models import build
    C, H, W = image_shape
    try:
        models = [build(arch, C, num_classes, H) for _ in range(2)]
        Stack.build(models, torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(0)))
    except NotStackable as e:
        return str(e)
    return None
