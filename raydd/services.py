"""Model services: frozen networks (teachers now, auxiliary nets later) hosted once per GPU share
and used by many distillation workers.

Interface, identical in-process (:class:`LocalService`) and through Ray (:class:`RayService`):
  ``num_models``                      how many networks are hosted
  ``logits(x, model)``                f(x), no graph
  ``input_grad(x, grad_logits, model)``  ∂⟨f(x), g⟩/∂x, the VJP through the frozen net: a worker
                                      gets its teacher terms' image gradient without the teacher
  ``features(x, tap, model)``         an intermediate output (``StagedNet.features``)
Results come back on the device of ``x``.

The Ray actor loads its weights in ``__init__`` so that a restart (``max_restarts``) recovers it,
and coalesces concurrent requests for the same (method, network) into one batch, so many
workers with small segments keep one GPU share busy. All calls are pure functions of their
arguments, which makes retrying them after a restart safe.
"""
from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import ray
import torch
from torch import Tensor, nn

from .config import Resources
from .errors import RayddError
from .io import load_tensors

NAMESPACE = "raydd"
RECORD_FIELDS = ("spec", "in_channels", "num_classes", "image_size", "path", "sha256")


class LocalService:
    """Frozen networks in this process (tests, single-process runs, and inside the actor)."""

    def __init__(self, models: Sequence[nn.Module], device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.models = [m.to(self.device).eval().requires_grad_(False) for m in models]

    @property
    def num_models(self) -> int:
        return len(self.models)

    def logits(self, x: Tensor, model: int) -> Tensor:
        with torch.no_grad():
            return self._net(model)(x.to(self.device)).to(x.device)

    def input_grad(self, x: Tensor, grad_logits: Tensor, model: int) -> Tensor:
        with torch.enable_grad():
            xx = x.detach().to(self.device).requires_grad_(True)
            (g,) = torch.autograd.grad(self._net(model)(xx), xx, grad_logits.to(self.device))
        return g.to(x.device)

    def features(self, x: Tensor, tap: str, model: int) -> Tensor:
        net = self._net(model)
        with torch.no_grad():
            if hasattr(net, "features"):
                return net.features(x.to(self.device), [tap])[tap].to(x.device)
            if tap == "logits":
                return net(x.to(self.device)).to(x.device)
        raise RayddError(f"feature tap {tap!r}: model {model} ({type(net).__name__}) only offers 'logits'")

    def _net(self, i: int) -> nn.Module:
        if not 0 <= i < len(self.models):
            raise RayddError(f"model index {i} is out of range; the service hosts {len(self.models)}")
        return self.models[i]


def load_models(source: Any) -> list[nn.Module]:
    """Networks from a teachers directory (``RUN`` or ``RUN/teachers``), a list of records
    ``(spec, in_channels, num_classes, image_size, safetensors path, sha256)`` (tuples or dicts
    with those keys), or a callable returning the modules."""
    if callable(source):
        return list(source())
    if isinstance(source, (str, os.PathLike)):
        from .teachers import load_teachers
        path = Path(source)
        models, _ = load_teachers(path.parent if (path / "teachers.json").exists() else path)
        return list(models)
    from .models import build
    nets = []
    for rec in source:
        r = dict(zip(RECORD_FIELDS, rec)) if isinstance(rec, (tuple, list)) else dict(rec)
        net = build(r["spec"], r["in_channels"], r["num_classes"], r["image_size"])
        net.load_state_dict(load_tensors(r["path"], sha256=r.get("sha256")))
        nets.append(net)
    return nets


def resolve_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                        "cpu" if name == "auto" else name)


class ModelServiceActor:
    """Body of the Ray actor (async: requests wait on futures while one thread computes).

    Each (method, model, tap) has a queue. The first request of an idle queue starts a drain
    loop, which waits ``window_s`` for company, then repeatedly takes up to ``max_batch`` images
    of pending requests, runs them as one batch and hands each caller its slice. While a batch
    computes, new requests pile up and form the next one."""

    def __init__(self, source: Any, device: str = "auto", max_batch: int = 1024,
                 threads: int | None = None, window_s: float = 0.001):
        if threads:
            torch.set_num_threads(threads)
        from .train import keep_freed_memory
        keep_freed_memory()
        self.local = LocalService(load_models(source), resolve_device(device))
        self.max_batch, self.window_s = max_batch, window_s
        self.queues: dict[tuple, list] = {}
        self.draining: set[tuple] = set()
        self.tasks: set[asyncio.Task] = set()
        self.compute = ThreadPoolExecutor(1)  # one batch at a time on the device
        self.counts = {"requests": 0, "batches": 0, "images": 0, "queue_s": 0.0, "compute_s": 0.0}
        self.waits: deque[float] = deque(maxlen=4096)   # recent queueing delays, for a percentile
        self.since: float | None = None                 # the first request

    async def num_models(self) -> int:
        return self.local.num_models

    async def stats(self) -> dict:
        """Counters since start, and how well batching keeps up: requests per batch, the delay from a
        request's arrival to the start of its batch (mean, and p95 of the last 4,096), and the
        fraction of the time since the first request that the device computed (``busy``)."""
        c, waits = self.counts, sorted(self.waits)
        up = time.monotonic() - self.since if self.since is not None else 0.0
        from .train import peak_memory
        return {**c, "pid": os.getpid(), "device": str(self.local.device), "memory": peak_memory(self.local.device),
                "requests_per_batch": c["requests"] / max(c["batches"], 1),
                "queue_ms_mean": 1e3 * c["queue_s"] / max(c["requests"], 1),
                "queue_ms_p95": 1e3 * waits[int(0.95 * (len(waits) - 1))] if waits else 0.0,
                "busy": c["compute_s"] / up if up > 0 else 0.0}

    async def logits(self, x: np.ndarray, model: int) -> np.ndarray:
        return await self._submit(("logits", model, None), x, None)

    async def input_grad(self, x: np.ndarray, grad_logits: np.ndarray, model: int) -> np.ndarray:
        return await self._submit(("input_grad", model, None), x, grad_logits)

    async def features(self, x: np.ndarray, tap: str, model: int) -> np.ndarray:
        return await self._submit(("features", model, tap), x, None)

    async def _submit(self, key: tuple, x: np.ndarray, g: np.ndarray | None) -> np.ndarray:
        fut = asyncio.get_running_loop().create_future()
        now = time.monotonic()
        self.since = now if self.since is None else self.since
        self.queues.setdefault(key, []).append((x, g, fut, now))
        self.counts["requests"] += 1
        if key not in self.draining:
            self.draining.add(key)
            task = asyncio.create_task(self._drain(key))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return await fut

    async def _drain(self, key: tuple) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(self.window_s)
            while queue := self.queues.get(key):
                take, size = [], 0
                while queue and (not take or size + len(queue[0][0]) <= self.max_batch):
                    take.append(queue.pop(0))
                    size += len(take[-1][0])
                now = time.monotonic()
                waits = [now - t[3] for t in take]
                self.waits.extend(waits)
                self.counts["queue_s"] += sum(waits)
                try:
                    out = await loop.run_in_executor(self.compute, self._run, key, take)
                except Exception as e:  # every caller of the batch gets the error
                    for _, _, fut, _ in take:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                for (_, _, fut, _), part in zip(take, np.split(out, np.cumsum([len(t[0]) for t in take])[:-1])):
                    if not fut.done():  # a cancelled caller no longer waits
                        fut.set_result(part)
        finally:
            self.draining.discard(key)

    def _run(self, key: tuple, take: list) -> np.ndarray:
        method, model, tap = key
        t0 = time.monotonic()
        x = torch.from_numpy(np.concatenate([t[0] for t in take]))
        g = torch.from_numpy(np.concatenate([t[1] for t in take])) if method == "input_grad" else None
        outs = []
        for i in range(0, len(x), self.max_batch):  # a single oversized request still runs in bounds
            xi = x[i:i + self.max_batch]
            if method == "logits":
                outs.append(self.local.logits(xi, model))
            elif method == "input_grad":
                outs.append(self.local.input_grad(xi, g[i:i + self.max_batch], model))
            else:
                outs.append(self.local.features(xi, tap, model))
        self.counts["batches"] += 1
        self.counts["images"] += len(x)
        out = torch.cat(outs).cpu().numpy()
        self.counts["compute_s"] += time.monotonic() - t0
        return out


_ACTOR_CLASS = None


def _actor_class():
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        _ACTOR_CLASS = ray.remote(ModelServiceActor)
    return _ACTOR_CLASS


def start_service(source: Any, *, name: str, resources: Resources | None = None, max_batch: int = 1024,
                  max_restarts: int = 3, device: str = "auto", detached: bool = False,
                  window_s: float = 0.001):
    """Start the named service actor, or return the running one of that name (namespace
    ``raydd``), so several runs and workers share one copy of the networks."""
    res = resources or Resources()
    opts = dict(name=name, namespace=NAMESPACE, get_if_exists=True, num_cpus=res.cpus,
                num_gpus=res.gpus, max_restarts=max_restarts, max_task_retries=-1, max_concurrency=64)
    if detached:
        opts["lifetime"] = "detached"
    return _actor_class().options(**opts).remote(source, device=device, max_batch=max_batch,
                                                 threads=max(1, int(res.cpus)), window_s=window_s)


def start_replicas(source: Any, *, name: str, replicas: int = 1, **kw: Any) -> list:
    """``replicas`` copies of the service (:func:`start_service`; copy 0 keeps ``name``, copy r is
    ``name-rR``). A client is given one copy, so each copy still coalesces its clients' requests."""
    return [start_service(source, name=name if r == 0 else f"{name}-r{r}", **kw) for r in range(replicas)]


def resources_text(res: Resources) -> str:
    """A service's share of a node in words, for progress lines: ``0.5 CPU``, ``1 CPU + 0.25 GPU``."""
    return f"{res.cpus:g} CPU" + (f" + {res.gpus:g} GPU" if res.gpus else "")


class ActorClient:
    """A service actor's handle, with its model count asked once; pickles as its handle."""

    def __init__(self, handle: Any):
        self.handle = handle
        self._num_models: int | None = None

    @property
    def num_models(self) -> int:
        if self._num_models is None:
            self._num_models = ray.get(self.handle.num_models.remote())
        return self._num_models

    def stats(self) -> dict:
        return ray.get(self.handle.stats.remote())


class RayService(ActorClient):
    """Client of a service actor with :class:`LocalService`'s interface."""

    def logits(self, x: Tensor, model: int) -> Tensor:
        return _tensor(self.handle.logits.remote(_array(x), model), x)

    def input_grad(self, x: Tensor, grad_logits: Tensor, model: int) -> Tensor:
        return _tensor(self.handle.input_grad.remote(_array(x), _array(grad_logits), model), x)

    def features(self, x: Tensor, tap: str, model: int) -> Tensor:
        return _tensor(self.handle.features.remote(_array(x), tap, model), x)


def _array(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _tensor(ref: Any, like: Tensor) -> Tensor:
    # Copy: arrays read from the object store are read-only.
    return torch.from_numpy(np.array(ray.get(ref))).to(like.device)
