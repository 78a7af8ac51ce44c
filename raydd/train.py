"""The field's classifier recipe: SGD with momentum and weight decay, lr ×0.1 at half the epochs.

The loop of teacher training and of every evaluation trial, so every accuracy raydd reports comes
from the same loop. APM's students train in their own short loop (``raydd.methods.apm``): they
stop at their last checkpoint and regress teacher logits with L1, and the official student loop
they reproduce is checked against them.
"""
from __future__ import annotations

import ctypes
import math
import os
import sys
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
    """Set up a compute process: torch's intra-op threads matched to the CPUs a task was given (at
    least one), and freed memory kept for reuse (:func:`keep_freed_memory`)."""
    torch.set_num_threads(max(1, int(n)))
    keep_freed_memory()


_heap_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Serve every allocation from glibc's heap and never trim it; True when applied.

    glibc hands blocks over 32 MB straight back to the OS, so a 100×128×32×32 float activation
    (52 MB) is page-faulted afresh on every step. Kept, the memory freed by one step serves the
    next: an APM round at width 128 took ~3 s less of its ~9 s (tools/bench_round.py); the price is that
    the process holds its peak until it exits. Once per process; off with ``RAYDD_KEEP_HEAP=0``;
    nothing happens where the C library is not glibc."""
    global _heap_kept
    if _heap_kept is None:
        _heap_kept = False
        if os.environ.get("RAYDD_KEEP_HEAP", "1") != "0" and sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL("libc.so.6")
                m_trim_threshold, m_mmap_max = -1, -4   # mallopt parameters of glibc's malloc.h
                _heap_kept = bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
            except (OSError, AttributeError):
                pass
    return _heap_kept


def peak_memory(device: torch.device | str = "cpu") -> dict[str, float]:
    """This process's peak resident memory in MB since it started (Ray reuses worker processes, so it
    covers earlier tasks there too), and on CUDA the peak the caching allocator handed out."""
    import resource
    out = {"rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}   # KiB on Linux
    if torch.device(device).type == "cuda":
        out["cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def bf16_native(device: torch.device | str) -> bool:
    """Whether bf16 convolutions and matmuls run in hardware here: a CUDA GPU with bf16, or a CPU
    with AVX512-BF16 or AMX. Elsewhere torch emulates them, far slower than fp32."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


_bf16_warned = False


def autocast(device: torch.device | str, precision: str = "fp32"):
    """bf16 autocast for a forward pass and its loss (weights and optimiser stay fp32), or nothing.

    On CPUs with AMX/AVX512-BF16 and on CUDA GPUs, convolutions and matmuls run at several times
    their fp32 rate; reductions and norms stay fp32 under autocast's own rules. Without such
    hardware bf16 still computes the same thing, emulated (a ConvNet-128 forward took 5.0 s
    against fp32's 0.12 s on an AVX2-only CPU), and the process says so once on stderr."""
    global _bf16_warned
    dev = torch.device(device).type
    if precision == "bf16" and not _bf16_warned and not bf16_native(dev):
        _bf16_warned = True
        where = f"a CPU without AVX512-BF16 or AMX ({_cpu_name()})" if dev == "cpu" else "a GPU without bf16"
        print(f"raydd: precision bf16 on {where}: torch emulates it, many times slower than fp32; use "
              f"precision fp32 here", file=sys.stderr, flush=True)
    return torch.autocast(dev, dtype=torch.bfloat16, enabled=precision == "bf16")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "this CPU"


def tensor_batches(tensors: Sequence[torch.Tensor], batch_size: int, *, shuffle: bool = False,
                   generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """Mini-batches of aligned per-sample tensors (indexed where they live)."""
    n = tensors[0].shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        yield tuple(t[idx.to(t.device)] for t in tensors)


def decay_epoch(epochs: int) -> int:
    """The epoch (from 0) at which the recipe's lr drops ×0.1: half-way; a single epoch never decays."""
    return max(1, epochs // 2)


def _cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def channels_last_pays(model: nn.Module, device: torch.device) -> bool:
    """Whether ``model`` trains and tests faster channels-last here: oneDNN's CPU convolutions do
    (fp32 training step on 100 Fashion-MNIST images: MobileNetV2 1.50x, ConvNet-BN-32 1.26x, LeNet
    1.22x, AlexNet 1.12x, ResNet18 1.01x; tools/bench_eval.py), but GroupNorm (raydd's instance/layer/
    group norms) is slower in that layout (ConvNet-32 0.61x, VGG11 0.87x) and the ViTs gain nothing."""
    return (device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())
            and not any(isinstance(m, (nn.GroupNorm, nn.LayerNorm)) for m in model.modules()))


def train_classifier(model: nn.Module,
                     data: Sequence[torch.Tensor] | Callable[[], Iterable[Batch]], *,
                     epochs: int, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                     batch_size: int = 256, dsa: Callable | None = None, loss_fn: LossFn | None = None,
                     targets: torch.Tensor | None = None, device: str | torch.device = "cpu",
                     generator: torch.Generator | None = None, precision: str = "fp32",
                     progress: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``model`` in place; returns the mean training loss of every epoch.

    ``data`` is either aligned tensors ``(x, y, *extras)`` (shuffled every epoch with
    ``generator``) or a callable returning a fresh iterator of such batches per epoch (streamed
    data). ``targets`` is one more per-sample tensor appended to the extras (e.g. soft labels).
    ``dsa(x, generator)`` augments the images only; ``loss_fn(model, x_aug, y, *extras)``
    replaces the default cross-entropy and must be given whenever there are extras.
    ``progress(epoch, loss)`` is called after every epoch (epoch counted from 1).
    ``precision`` "bf16" runs each forward and loss under :func:`autocast`.
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
    layout = torch.channels_last if channels_last_pays(model, device) else None
    if layout is not None:
        model.to(memory_format=layout)   # in place: the optimiser below holds the same parameters
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    decay_at = decay_epoch(epochs)
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
            if layout is not None and x.dim() == 4:
                x = x.contiguous(memory_format=layout)
            with autocast(device, precision):
                loss = loss_fn(model, x, y, *extras).float()
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
    if layout is not None:
        model.to(memory_format=torch.contiguous_format)   # what state_dict consumers expect
    return history


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[Batch], device: str | torch.device = "cpu",
             precision: str = "fp32") -> float:
    """Top-1 accuracy over ``(x, y, …)`` batches, in eval mode (the previous mode is restored);
    ``precision`` "bf16" runs the forwards under :func:`autocast`, as the training did."""
    device = resolve_device(device)
    was_training = model.training
    cpu = channels_last_pays(model, device)
    model.to(device).eval()
    if cpu:
        model.to(memory_format=torch.channels_last)
    correct, total = torch.zeros((), dtype=torch.long, device=device), 0
    try:
        for x, y, *_ in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cpu and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                correct += (model(x).argmax(1) == y).sum()
            total += y.shape[0]
    finally:
        model.train(was_training)
        if cpu:
            model.to(memory_format=torch.contiguous_format)
    if total == 0:
        raise RayddError("no test samples to measure accuracy on")
    return int(correct) / total
