"""Auxiliary-network services (MetaDD): frozen nets of other architectures, hosted once per GPU
share like the teachers, reached by workers only through two calls (``raydd.methods.metadd``):

  ``cams(x, y, t, models, cam_size)``   phase 1, per net: per-image CE, KL(a‖t), raw and
                                        normalised CAM (dicts of tensors, one per requested net)
  ``input_grad(x, y, t, cotangents, models, cam_size)``
                                        phase 2: (∂/∂x, ∂/∂t) of Σ_m ⟨cotangent_m, outputs_m⟩,
                                        summed over the requested nets (double backprop inside)

The variance across nets couples them only through the worker's ``metadd.couple`` between the
two phases, so the nets may be split over several actors (:class:`ShardedAuxiliaries` fans
both calls out to all shards at once and joins the answers).

:class:`AuxServiceActor` is the teacher service actor (``raydd.services``) with these two calls
added: the same weights-in-``__init__`` restart, the same per-key request coalescing. Each
request travels as one row per image (inputs, then outputs, packed flat), so the actor's batching
concatenates and splits rows exactly as it does images; every quantity is per image.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import ray
import torch
from torch import Tensor

from .config import Resources
from .methods.metadd import OUTPUTS, LocalAuxiliaries
from .services import NAMESPACE, ActorClient, ModelServiceActor

Outputs = list[dict[str, Tensor]]


# ---------------------------------------------------------------------------- row packing

def _widths(cam_size: int) -> list[int]:
    return [1, 1, cam_size * cam_size, cam_size * cam_size]   # ce, kl, cam, cam_norm


def pack_outputs(outs: Outputs, cam_size: int) -> Tensor:
    """Per net [ce, kl, cam, cam_norm] flattened per image, nets side by side: B × M·(2 + 2S²)."""
    return torch.cat([o[k].reshape(len(o[k]), -1) for o in outs for k in OUTPUTS], dim=1)


def unpack_outputs(rows: Tensor, models: int, cam_size: int) -> Outputs:
    b, s = len(rows), cam_size
    parts = rows.split(_widths(cam_size) * models, dim=1)
    shapes = {"ce": (b,), "kl": (b,), "cam": (b, s, s), "cam_norm": (b, s, s)}
    return [{k: parts[4 * m + j].reshape(shapes[k]) for j, k in enumerate(OUTPUTS)} for m in range(models)]


def _pack_inputs(x: Tensor, y: Tensor, t: Tensor, cots: Outputs | None = None, cam_size: int = 0) -> np.ndarray:
    cols = [x.detach().reshape(len(x), -1), y.reshape(-1, 1).to(x.dtype), t.detach().to(x.dtype)]
    if cots is not None:
        cols.append(pack_outputs(cots, cam_size).to(x.dtype))
    return torch.cat([c.cpu() for c in cols], dim=1).numpy()


def _unpack_inputs(rows: Tensor, shape: tuple) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    c, h, w, k = shape
    x, y, t, rest = rows.split([c * h * w, 1, k, rows.shape[1] - c * h * w - 1 - k], dim=1)
    return x.reshape(-1, c, h, w), y[:, 0].round().long(), t, rest


# ---------------------------------------------------------------------------- the actor

class AuxServiceActor(ModelServiceActor):
    """Body of the Ray actor: the teacher service actor plus the two MetaDD calls."""

    def __init__(self, source: Any, device: str = "auto", max_batch: int = 256,
                 threads: int | None = None, window_s: float = 0.001):
        super().__init__(source, device=device, max_batch=max_batch, threads=threads, window_s=window_s)
        self.aux = LocalAuxiliaries(self.local.models, self.local.device)

    async def specs(self) -> list[str]:
        return self.aux.specs

    async def cams(self, rows: np.ndarray, models: tuple, cam_size: int, shape: tuple) -> np.ndarray:
        return await self._submit(("cams", tuple(models), (cam_size, tuple(shape))), rows, None)

    async def aux_grad(self, rows: np.ndarray, models: tuple, cam_size: int, shape: tuple) -> np.ndarray:
        return await self._submit(("aux_grad", tuple(models), (cam_size, tuple(shape))), rows, None)

    def _run(self, key: tuple, take: list) -> np.ndarray:
        method, models, tap = key
        if method not in ("cams", "aux_grad"):
            return super()._run(key, take)
        cam_size, shape = tap
        rows = torch.from_numpy(np.concatenate([t[0] for t in take]))
        outs = []
        for i in range(0, len(rows), self.max_batch):   # a single oversized request runs in bounds
            x, y, t, rest = _unpack_inputs(rows[i:i + self.max_batch], shape)
            if method == "cams":
                outs.append(pack_outputs(self.aux.cams(x, y, t, models, cam_size), cam_size))
            else:
                cots = unpack_outputs(rest, len(models), cam_size)
                gx, gt = self.aux.input_grad(x, y, t, cots, models, cam_size)
                outs.append(torch.cat([gx.reshape(len(gx), -1), gt], dim=1))
        self.counts["batches"] += 1
        self.counts["images"] += len(rows)
        return torch.cat(outs).cpu().numpy()


_ACTOR_CLASS = None


def start_aux_service(source: Any, *, name: str, resources: Resources | None = None, max_batch: int = 256,
                      max_restarts: int = 3, device: str = "auto", detached: bool = False,
                      window_s: float = 0.001):
    """Start the named auxiliary actor, or return the running one of that name (namespace
    ``raydd``). ``resources.gpus`` may be fractional, so several shards share a GPU."""
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        _ACTOR_CLASS = ray.remote(AuxServiceActor)
    res = resources or Resources()
    opts = dict(name=name, namespace=NAMESPACE, get_if_exists=True, num_cpus=res.cpus,
                num_gpus=res.gpus, max_restarts=max_restarts, max_task_retries=-1, max_concurrency=64)
    if detached:
        opts["lifetime"] = "detached"
    return _ACTOR_CLASS.options(**opts).remote(source, device=device, max_batch=max_batch,
                                               threads=max(1, int(res.cpus)), window_s=window_s)


# ---------------------------------------------------------------------------- clients

class RayAuxiliaries(ActorClient):
    """Client of one auxiliary actor with :class:`LocalAuxiliaries`' interface, plus ``submit_*``
    variants returning a wait function (so a sharded pool calls all actors at once)."""

    @property
    def specs(self) -> list[str]:
        return ray.get(self.handle.specs.remote())

    @staticmethod
    def _shape(x: Tensor, t: Tensor) -> tuple:
        return (*x.shape[1:], t.shape[1])

    def submit_cams(self, x: Tensor, y: Tensor, t: Tensor, models: Sequence[int],
                    cam_size: int) -> Callable[[], Outputs]:
        models = tuple(int(m) for m in models)
        ref = self.handle.cams.remote(_pack_inputs(x, y, t), models, cam_size, self._shape(x, t))
        return lambda: unpack_outputs(_fetch(ref, x), len(models), cam_size)

    def submit_input_grad(self, x: Tensor, y: Tensor, t: Tensor, cotangents: Outputs, models: Sequence[int],
                          cam_size: int) -> Callable[[], tuple[Tensor, Tensor]]:
        models = tuple(int(m) for m in models)
        ref = self.handle.aux_grad.remote(_pack_inputs(x, y, t, list(cotangents), cam_size), models,
                                          cam_size, self._shape(x, t))

        def wait() -> tuple[Tensor, Tensor]:
            gx, gt = _fetch(ref, x).split([x[0].numel(), t.shape[1]], dim=1)
            return gx.reshape(x.shape), gt
        return wait

    def cams(self, x, y, t, models, cam_size) -> Outputs:
        return self.submit_cams(x, y, t, models, cam_size)()

    def input_grad(self, x, y, t, cotangents, models, cam_size) -> tuple[Tensor, Tensor]:
        return self.submit_input_grad(x, y, t, cotangents, models, cam_size)()


def _fetch(ref: Any, like: Tensor) -> Tensor:
    # Copy: arrays read from the object store are read-only.
    return torch.from_numpy(np.array(ray.get(ref))).to(like.device)


class ShardedAuxiliaries:
    """Several auxiliary services seen as one: net ``i`` of the pool is net ``j`` of shard ``s``
    in shard order. Both calls go out to every shard before any answer is awaited."""

    def __init__(self, shards: Sequence[Any]):
        self.shards = list(shards)
        self.index = [(s, j) for s, shard in enumerate(self.shards) for j in range(shard.num_models)]

    @property
    def num_models(self) -> int:
        return len(self.index)

    def _split(self, models: Sequence[int]) -> dict[int, list[tuple[int, int]]]:
        """shard → [(position in the request, local index)]."""
        out: dict[int, list[tuple[int, int]]] = {}
        for pos, m in enumerate(models):
            s, j = self.index[m]
            out.setdefault(s, []).append((pos, j))
        return out

    def cams(self, x, y, t, models, cam_size) -> Outputs:
        parts = self._split(list(models))
        waits = {s: _submit(self.shards[s], "cams", x, y, t, [j for _, j in p], cam_size)
                 for s, p in parts.items()}
        result: list = [None] * len(models)
        for s, p in parts.items():
            for (pos, _), out in zip(p, waits[s]()):
                result[pos] = out
        return result

    def input_grad(self, x, y, t, cotangents, models, cam_size) -> tuple[Tensor, Tensor]:
        parts = self._split(list(models))
        waits = [_submit(self.shards[s], "input_grad", x, y, t, [j for _, j in p], cam_size,
                         [cotangents[pos] for pos, _ in p]) for s, p in parts.items()]
        gx, gt = torch.zeros_like(x), torch.zeros_like(t)
        for wait in waits:
            a, b = wait()
            gx, gt = gx + a, gt + b
        return gx, gt


def _submit(shard: Any, call: str, x, y, t, models, cam_size, cots=None) -> Callable:
    """``shard.submit_<call>`` where it has one (Ray), else the call made now (in-process)."""
    args = (x, y, t, models, cam_size) if cots is None else (x, y, t, cots, models, cam_size)
    submit = getattr(shard, f"submit_{call}", None)
    if submit is not None:
        return submit(*args)
    result = getattr(shard, call)(*args)
    return lambda: result
