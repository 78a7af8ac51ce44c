"""The field's classifier recipe: SGD with momentum and weight decay, lr ×0.1 at half the epochs.

The loop of teacher training and of every evaluation trial, so every accuracy raydd reports comes
from the same loop. APM's students train in their own short loop (``raydd.methods.apm``): they
stop at their last checkpoint and regress teacher logits with L1, and the official student loop
they reproduce is checked against them.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import RayddError

Batch = Sequence[torch.Tensor]
LossFn = Callable[..., torch.Tensor]


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` = the GPU when one is visible, else the CPU; refuse a GPU that is not there."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RayddError(f"device {name!r} is not a device; expected auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RayddError(f"device {name!r} requested but this process sees no CUDA GPU")
    return device


def set_threads(n: float) -> None:
    """Match torch's intra-op threads to the CPUs a task was given (at least one)."""
    torch.set_num_threads(max(1, int(n)))


def tensor_batches(tensors: Sequence[torch.Tensor], batch_size: int, *, shuffle: bool = False,
                   generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """Mini-batches of aligned per-sample tensors (indexed where they live)."""
    n = tensors[0].shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        yield tuple(t[idx.to(t.device)] for t in tensors)


def _cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def train_classifier(model: nn.Module,
                     data: Sequence[torch.Tensor] | Callable[[], Iterable[Batch]], *,
                     epochs: int, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                     batch_size: int = 256, dsa: Callable | None = None, loss_fn: LossFn | None = None,
                     targets: torch.Tensor | None = None, device: str | torch.device = "cpu",
                     generator: torch.Generator | None = None,
                     progress: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``model`` in place; returns the mean training loss of every epoch.

    ``data`` is either aligned tensors ``(x, y, *extras)`` (shuffled every epoch with
    ``generator``) or a callable returning a fresh iterator of such batches per epoch (streamed
    data). ``targets`` is one more per-sample tensor appended to the extras (e.g. soft labels).
    ``dsa(x, generator)`` augments the images only; ``loss_fn(model, x_aug, y, *extras)``
    replaces the default cross-entropy and must be given whenever there are extras.
    ``progress(epoch, loss)`` is called after every epoch (epoch counted from 1).
    """
    device = resolve_device(device)
    streamed = callable(data)
    if not streamed:
        tensors = tuple(data) + ((targets,) if targets is not None else ())
        if len(tensors) < 2 or any(t.shape[0] != tensors[0].shape[0] for t in tensors):
            raise ValueError("train_classifier needs (x, y, *extras) tensors with the same first dimension")
        if len(tensors) > 2 and loss_fn is None:
            raise ValueError("extra per-sample tensors need a loss_fn that uses them")
    elif targets is not None:
        raise ValueError("targets cannot be aligned with streamed data; yield them in the batches")
    loss_fn = loss_fn or _cross_entropy
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    decay_at = max(1, epochs // 2)  # a single epoch is never decayed
    history: list[float] = []
    for epoch in range(epochs):
        if epoch == decay_at:
            for group in opt.param_groups:
                group["lr"] = lr * 0.1
        batches = data() if streamed else tensor_batches(tensors, batch_size, shuffle=True, generator=generator)
        total, count = torch.zeros((), device=device), 0
        for batch in batches:
            x, y, *extras = (t.to(device, non_blocking=True) for t in batch)
            if dsa is not None:
                x = dsa(x, generator)
            loss = loss_fn(model, x, y, *extras)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * x.shape[0]
            count += x.shape[0]
        if count == 0:
            raise RayddError("training data yielded no batches")
        mean = float(total) / count  # one device sync per epoch
        if not math.isfinite(mean):
            raise RayddError(f"training diverged in epoch {epoch + 1} (loss {mean}); lower the learning rate {lr}")
        history.append(mean)
        if progress is not None:
            progress(epoch + 1, mean)
    return history


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[Batch], device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy over ``(x, y, …)`` batches, in eval mode (the previous mode is restored)."""
    device = resolve_device(device)
    was_training = model.training
    # oneDNN's inference convolutions are ~1.3-1.5x faster channels-last on CPU (tools/bench_eval.py);
    # training is not, so the model goes back to the default layout afterwards.
    cpu = device.type == "cpu"
    model.to(device).eval()
    if cpu:
        model.to(memory_format=torch.channels_last)
    correct, total = torch.zeros((), dtype=torch.long, device=device), 0
    try:
        for x, y, *_ in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cpu and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            correct += (model(x).argmax(1) == y).sum()
            total += y.shape[0]
    finally:
        model.train(was_training)
        if cpu:
            model.to(memory_format=torch.contiguous_format)
    if total == 0:
        raise RayddError("no test samples to measure accuracy on")
    return int(correct) / total
