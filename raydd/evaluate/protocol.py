"""One evaluation trial in plain PyTorch: a fresh model trained on a (synthetic) set, tested on real data.

The schedule is the field's (DC/DSA/DM, DC-BENCH, APM): SGD, momentum 0.9, weight decay 5e-4,
lr ×0.1 at half the epochs, batch 256, DSA augmentation, via :func:`raydd.train.train_classifier`.
Label modes:

``hard``  cross-entropy with the class labels.
``soft``  match the stored teacher logits of every image: L1 between logits as the APM evaluation
          does, or KL(teacher_T ‖ student_T)·T² at ``soft_temperature``. The stored logits belong to
          the un-augmented image; the student sees the augmented one (as in APM's evaluation).
``kd``    paper 002: first train ``kd.teacher_arch`` on the same set (hard labels, same protocol),
          then the evaluated net with (1−α)·CE + α·T²·KL(teacher_T ‖ student_T), both nets seeing the
          same augmented batch. The public code of the paper swaps the KL arguments; here the
          teacher distribution is the target, as in Hinton et al.
``elf``   paper 001: features F of the un-augmented images from a feature model trained on real
          data; the evaluated net is split at ``model.elf_split`` into front/rear and trained with
          CE(net(x̃), y) + λ_front·D(front(x̃), F) + λ_rear·CE(rear(F), y). As in the official ELF
          code, x̃ is the DSA-augmented image while F stays the feature of the un-augmented image.
          D is cross-entropy over channels by default (the features are the targets, unnormalised,
          exactly as the official code's ``nn.CrossEntropyLoss``), or L1, L2, cosine.
          Shape adaptation (documented, learned with the net, dropped at test time): different
          channel counts get two 1×1 convolutions (front→feature width for D, feature→front width
          for the rear); a different spatial grid resizes the stored features once (area when
          shrinking, bilinear when growing). A net without a split (MLP, ViT, timm models) or
          a front output of a different rank than the features is refused.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import EvalConfig
from ..errors import ConfigError, RayddError
from ..synset import Synset
from .elf import ElfNet, shape_text

MODES = ("hard", "soft", "kd", "elf")

# (phase, epoch, mean loss), plus — when the trial has validation batches — a callable returning the
# validation accuracy of the net that phase trains (computed only when called)
EpochHook = Callable[..., None]


# ----------------------------------------------------------------------------- losses

def soft_l1(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between logits (APM's evaluation loss, ``nn.L1Loss``)."""
    return (logits - target_logits).abs().mean()


def kl_teacher_student(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)) averaged over the batch — the teacher is the target."""
    t = float(temperature)
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                    reduction="batchmean") * (t * t)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor,
            alpha: float, temperature: float) -> torch.Tensor:
    """(1−α)·CE(student, y) + α·T²·KL(teacher_T ‖ student_T) (paper 002, eq. in §3.3)."""
    return ((1.0 - alpha) * F.cross_entropy(student_logits, y)
            + alpha * kl_teacher_student(student_logits, teacher_logits, temperature))


# ----------------------------------------------------------------------------- one trial

def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"evaluation mode {mode!r} is unknown; expected one of {', '.join(MODES)}")


def evaluate_once(arch: str, mode: str, seed: int, train: Synset | Callable[[], Iterable],
                  test_batches: Callable[[], Iterable], ecfg: EvalConfig, *,
                  image_shape: tuple[int, int, int], num_classes: int, lr: float | None = None,
                  epochs: int | None = None, dsa_strategy: str | None = None,
                  device: str | torch.device = "cpu", on_epoch: EpochHook | None = None,
                  val_batches: Callable[[], Iterable] | None = None) -> dict[str, Any]:
    """Train a freshly initialised ``arch`` on ``train`` with label ``mode``; test on real data.

    ``train`` is a :class:`Synset` (its ``soft_labels`` are needed for ``soft``, its
    ``elf_features`` for ``elf``) or, for the whole-data baseline, a callable returning fresh
    ``(x, y)`` batches per epoch (hard labels only). Returns test accuracy, first/last training
    loss, epochs, seconds and mode-specific details. With ``val_batches`` (held-out real training
    images) also ``val_acc``, and ``on_epoch`` gets a fourth argument measuring it mid-training
    (evaluation mode, no RNG drawn: the training itself is unchanged).
    """
    from ..augment import DSA
    from ..models import build, is_vit
    from ..train import accuracy, resolve_device, train_classifier

    check_mode(mode)
    t0 = time.time()
    device = resolve_device(device)
    lr = float(lr if lr is not None else ecfg.lr)
    epochs = int(epochs if epochs is not None else ecfg.epochs)
    C, H, W = image_shape
    streamed = callable(train)
    if streamed and mode != "hard":
        raise RayddError(f"mode {mode!r} needs a stored set; the whole-data baseline is trained with hard labels")
    if not streamed:
        _check_set(train, mode, image_shape, num_classes)
    dsa = DSA(dsa_strategy) if ecfg.dsa and dsa_strategy else None
    gen = torch.Generator().manual_seed(int(seed))
    common = dict(epochs=epochs, lr=lr, momentum=ecfg.momentum, weight_decay=ecfg.weight_decay,
                  batch_size=ecfg.batch_size, dsa=dsa, device=device, generator=gen,
                  precision=ecfg.precision)

    def hook(phase: str, model: nn.Module | None = None):
        if on_epoch is None:
            return None
        if val_batches is None:
            return lambda ep, loss: on_epoch(phase, ep, loss)
        m = net if model is None else model
        return lambda ep, loss: on_epoch(phase, ep, loss,
                                         lambda: accuracy(m, val_batches(), device, ecfg.precision))

    extra: dict[str, Any] = {}
    torch.manual_seed(int(seed))
    net = build(arch, C, num_classes, H)
    if streamed:
        history = train_classifier(net, train, progress=hook("train"), **common)
    else:
        x, y = train.images.float().to(device), train.labels.long().to(device)  # small sets live on the device
        if mode == "hard":
            mix = _cutmix_fn(ecfg.hard_cutmix, seed, num_classes) if ecfg.hard_cutmix and not is_vit(net) else None
            history = train_classifier(net, (x, y), loss_fn=mix, progress=hook("train"), **common)
            if mix is not None:
                extra["cutmix"] = ecfg.hard_cutmix
        elif mode == "soft":
            history = train_classifier(net, (x, y, train.soft_labels.float().to(device)), loss_fn=_soft_fn(ecfg),
                                       progress=hook("train"), **common)
        elif mode == "kd":
            torch.manual_seed(int(seed) + 1_000_003)  # a teacher initialised unlike the student
            teacher = build(ecfg.kd.teacher_arch, C, num_classes, H)
            train_classifier(teacher, (x, y), progress=hook("teacher", teacher), **common)
            extra["teacher_acc"] = accuracy(teacher, test_batches(), device, ecfg.precision)
            teacher.eval().requires_grad_(False)
            history = train_classifier(net, (x, y), loss_fn=_kd_fn(teacher, ecfg), progress=hook("train"),
                                       **common)
        else:  # elf
            if ecfg.elf.distance == "ce" and float(train.elf_features.min()) < 0:
                raise RayddError("ELF distance 'ce' treats the features as channel targets and needs them "
                                 "non-negative (post-ReLU); these have negative values — use elf.distance l2, "
                                 "l1 or cosine")
            model = ElfNet(net, image_shape, tuple(train.elf_features.shape[1:]))
            feats = model.fit_features(train.elf_features.float()).to(device)
            extra["elf_adapted"] = model.adapted
            history = train_classifier(model, (x, y, feats),
                                       loss_fn=lambda m, xa, ya, f: m.loss(xa, ya, f, ecfg.elf),
                                       progress=hook("train"), **common)
    if val_batches is not None:
        extra["val_acc"] = accuracy(net, val_batches(), device, ecfg.precision)
    acc = accuracy(net, test_batches(), device, ecfg.precision)
    return {"test_acc": acc, "train_loss_first": history[0], "train_loss_last": history[-1],
            "epochs": epochs, "lr": lr, "seconds": time.time() - t0, **extra}


def _cutmix_fn(beta: float, seed: int, num_classes: int):
    """HMDC's evaluation loss: CutMix on the augmented batch, CE to the area-mixed one-hot labels.
    Its own generator, so the DSA draws stay those of a trial without CutMix."""
    from ..augment import cutmix
    g = torch.Generator().manual_seed(int(seed) + 2_000_003)

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xm, t = cutmix(x, F.one_hot(y, num_classes).to(x.dtype), g, beta)
        return F.cross_entropy(model(xm), t)
    return loss


def _soft_fn(ecfg: EvalConfig):
    if ecfg.soft_loss == "l1":
        return lambda m, x, y, t: soft_l1(m(x), t)
    return lambda m, x, y, t: kl_teacher_student(m(x), t, ecfg.soft_temperature)


def _kd_fn(teacher: nn.Module, ecfg: EvalConfig):
    def loss(m, x, y):
        with torch.no_grad():
            t = teacher(x)
        return kd_loss(m(x), t, y, ecfg.kd.alpha, ecfg.kd.temperature)
    return loss


def _check_set(s: Synset, mode: str, image_shape: tuple[int, ...], num_classes: int) -> None:
    if tuple(s.images.shape[1:]) != tuple(image_shape):
        raise RayddError(f"training images are {shape_text(s.images.shape[1:])} but the test data is {shape_text(image_shape)}")
    if s.labels.numel() and (int(s.labels.min()) < 0 or int(s.labels.max()) >= num_classes):
        raise RayddError(f"training labels span {int(s.labels.min())}..{int(s.labels.max())} but the test "
                         f"data has {num_classes} classes")
    if mode == "soft":
        if s.soft_labels is None:
            raise RayddError("mode 'soft' needs stored soft labels (teacher logits); this set has none")
        if s.soft_labels.shape[1:] != (num_classes,):
            raise RayddError(f"soft labels have {s.soft_labels.shape[1]} classes, the test data {num_classes}")
    if mode == "elf" and s.elf_features is None:
        raise RayddError("mode 'elf' needs ELF features of the images; this set has none")
