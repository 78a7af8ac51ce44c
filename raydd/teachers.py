"""Teacher pools: N classifiers of one spec trained on the real shards, one Ray task each.

``train_one_teacher`` is plain PyTorch. ``train_teachers`` runs it as Ray tasks that read the
shards themselves (nothing big travels through the object store), writes every finished
teacher atomically as ``RUN/teachers/teacher-NNN.safetensors`` and rewrites
``RUN/teachers/teachers.json`` after each one, so a crash loses only the teachers in flight
and a re-run trains only what is missing. ``load_teachers`` verifies checksums and specs.
The files and their index live in :mod:`raydd.teacher_index`.
"""
from __future__ import annotations

import itertools
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .augment import DSA
from .config import Config
from .errors import ConfigError, RayddError
from .data.zca import ZCA, ensure_zca
from .teacher_index import (INDEX, TEACHERS_DIR, load_teachers, read_index, reusable, same_dataset,  # noqa: F401
                            save_teacher, teacher_name, trained_provenance, write_index)
from .synset import provenance
from .tracking import Curves, curves_dir, epoch_logger
from .train import accuracy, resolve_device, set_threads, train_classifier

IN_MEMORY_BYTES = 4 << 30   # larger training splits are streamed from the shards every epoch
TEST_BATCH = 1024


@dataclass(frozen=True)
class Recipe:
    """Everything besides spec and seed that decides a teacher's weights."""
    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    dsa: str | None          # DSA strategy, None = no augmentation
    zca: bool
    precision: str = "fp32"  # "bf16": forwards under autocast (fp32 weights)

    def record(self) -> dict:
        """The recipe as teachers.json records it; fp32 is left out, as the records of before have it."""
        rec = asdict(self)
        if rec["precision"] == "fp32":
            del rec["precision"]
        return rec

    @classmethod
    def from_config(cls, cfg: Config) -> "Recipe":
        t = cfg.teachers
        return cls(epochs=t.epochs, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                   batch_size=t.batch_size, dsa=cfg.data.dsa_strategy if t.dsa else None, zca=cfg.data.zca,
                   precision=t.precision)


# ---------------------------------------------------------------------------- plain torch

def _streamed(info, batch_size: int, seed: int, whiten: Callable, read: dict) -> Callable:
    """Fresh shuffled batches from the shards for every epoch (a new shuffle seed each time)."""
    from .data import batches
    epoch = itertools.count()

    def epoch_batches():
        shuffle_seed = seed * 1000 + next(epoch)
        return ((whiten(xb), yb) for xb, yb in batches(info, "train", batch_size, shuffle=True,
                                                      seed=shuffle_seed, **read))
    return epoch_batches


def train_one_teacher(spec: str, info, seed: int, recipe: Recipe, *, zca: ZCA | None = None,
                      device: str | torch.device = "cpu", verify: bool = True, on_corrupt: str = "fail",
                      progress: Callable[[int, float], None] | None = None, curves: Curves | None = None
                      ) -> tuple[dict[str, torch.Tensor], float]:
    """Train one ``spec`` classifier on ``info``'s train split; returns (CPU state dict, test accuracy).

    ``seed`` fixes the initial weights, the shuffling and the augmentation. ``curves`` receives the
    training loss per epoch and the test accuracy at a few epochs (measuring changes no weight).
    """
    from .data import batches, load_split
    from .models import build

    device = resolve_device(device)
    torch.manual_seed(seed)
    model = build(spec, info.in_channels, info.num_classes, info.image_size)
    generator = torch.Generator().manual_seed(seed)
    whiten = zca.transform if zca is not None else (lambda x: x)
    read = dict(verify=verify, on_corrupt=on_corrupt)

    nbytes = info.counts["train"]["total"] * math.prod(info.shape) * 4
    if nbytes <= IN_MEMORY_BYTES:
        x, y = load_split(info, "train", **read)
        data: Any = (whiten(x).to(device), y.to(device))
    else:
        data = _streamed(info, recipe.batch_size, seed, whiten, read)
    test = lambda: ((whiten(xb), yb) for xb, yb in batches(info, "test", TEST_BATCH, **read))  # noqa: E731
    if curves is not None:
        progress = epoch_logger(curves, lambda: accuracy(model, test(), device), recipe.epochs, progress)
    train_classifier(model, data, epochs=recipe.epochs, lr=recipe.lr, momentum=recipe.momentum,
                     weight_decay=recipe.weight_decay, batch_size=recipe.batch_size,
                     dsa=DSA(recipe.dsa) if recipe.dsa else None, device=device,
                     generator=generator, precision=recipe.precision, progress=progress)
    acc = accuracy(model, test(), device)
    if curves is not None:
        curves.log(recipe.epochs, {"test_acc": acc})
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return state, acc


# ---------------------------------------------------------------------------- Ray orchestration

def _teacher_task(index: int, spec: str, seed: int, recipe: dict, data_dir: str, read: dict,
                  device: str, threads: int, zca_state: dict | None, tracker, curves_at: str, tracking) -> Any:
    """One Ray task. User errors come back as a string, because retrying them cannot help.
    Its curves start afresh at every attempt, as its training does."""
    set_threads(threads)
    from .data import load_info
    start, cpu_start = time.time(), time.process_time()
    try:
        with Curves(curves_at, tracking=tracking, group="teachers", params={"spec": spec, "seed": seed}) as curves:
            state, acc = train_one_teacher(
                spec, load_info(data_dir), seed, Recipe(**recipe),
                zca=ZCA.from_state(zca_state) if zca_state else None, device=device, **read,
                progress=lambda epoch, loss: tracker.update.remote(index, epoch), curves=curves)
    except RayddError as e:
        return str(e)
    return state, acc, time.time() - start, time.process_time() - cpu_start


class _Tracker:
    """Epochs done per teacher, written by the tasks and polled by the driver."""

    def __init__(self):
        self.epochs: dict[int, int] = {}

    def update(self, index: int, epoch: int) -> None:
        self.epochs[index] = epoch

    def snapshot(self) -> dict[int, int]:
        return dict(self.epochs)


class _Progress:
    """A tqdm bar on a terminal, otherwise a line every ``every`` seconds (logs, CI)."""

    def __init__(self, enabled: bool, todo: list[int], epochs: int, every: float = 30.0):
        self.todo, self.epochs, self.every = todo, epochs, every
        self.enabled, self.tty = enabled, sys.stderr.isatty()
        self.last_line = time.time()
        self.clock: tuple[float, int] | None = None   # (time, epochs done) at the first finished epoch
        self.done: set[int] = set()
        self.seen: dict[int, int] = {}
        self.bar = None
        if enabled and self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=len(todo) * epochs, unit="epoch", desc="teachers", dynamic_ncols=True)

    def _epochs_done(self) -> int:
        return sum(self.epochs if i in self.done else self.seen.get(i, 0) for i in self.todo)

    def update(self, snapshot: dict[int, int]) -> None:
        self.seen.update(snapshot)
        if not self.enabled:
            return
        n = self._epochs_done()
        if self.clock is None and n > 0:
            # the rate counts from the first finished epoch: Ray's start and each task's data loading
            # would otherwise pass for slow epochs
            self.clock = (time.time(), n)
        running = " ".join(f"{teacher_name(i)[8:]}:{e}/{self.epochs}" for i, e in sorted(self.seen.items())
                           if i not in self.done)
        if self.bar is not None:
            self.bar.n = n
            self.bar.set_description(f"teachers {len(self.done)}/{len(self.todo)} done")
            self.bar.set_postfix_str(running, refresh=False)
            self.bar.refresh()
        elif time.time() - self.last_line >= self.every:
            self.last_line = time.time()
            t0, n0 = self.clock or (time.time(), 0)
            rate = (n - n0) / (time.time() - t0) if n > n0 else 0.0
            total = len(self.todo) * self.epochs
            eta = f"{(total - n) / rate:.0f}s" if rate > 0 else "?"
            self._line(f"[teachers] {len(self.done)}/{len(self.todo)} done, {n}/{total} epochs, "
                       f"{rate * 60:.1f} epochs/min, ETA {eta}" + (f" (epochs {running})" if running else ""))

    def finished(self, index: int, acc: float, seconds: float) -> None:
        self.done.add(index)
        if self.enabled:
            self._line(f"[teachers] {teacher_name(index)} done: test accuracy {acc:.2%} ({seconds:.0f}s)")
        self.update({})

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _task_device(cfg: Config) -> str:
    gpus = cfg.teachers.resources.gpus
    if cfg.device == "cuda" and gpus == 0:
        raise ConfigError("device: 'cuda' needs teachers.resources.gpus > 0 (e.g. 1, or 0.5 to share a GPU) "
                          "so that Ray gives each teacher task a GPU")
    return "cuda" if gpus > 0 and cfg.device != "cpu" else "cpu"


def _failure(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e  # RayTaskError wraps the task's own exception
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}".rstrip(": ")


def train_teachers(cfg: Config, run_dir: str | os.PathLike, *, progress: bool = True) -> list[dict]:
    """Train the missing teachers of ``cfg.teachers`` as parallel Ray tasks; returns all records.

    Ray is started from ``cfg.ray`` only when something is left to train and it is not running.
    """
    import ray

    from .data import load_info
    from .models import build
    from .raycluster import init_ray, task_threads

    tc = cfg.teachers
    info = load_info(cfg.data.dir)
    spec = build(tc.arch, info.in_channels, info.num_classes, info.image_size).spec
    recipe = Recipe.from_config(cfg)
    device = _task_device(cfg)
    out = Path(run_dir) / TEACHERS_DIR
    out.mkdir(parents=True, exist_ok=True)
    dataset = {"source": info.source, "classes": info.classes, "shape": list(info.shape)}

    old, prov = read_index(out) if same_dataset(out, dataset) else ({}, None)
    wanted = {i: {"spec": spec, "seed": cfg.seed * 1000 + i, "epochs": tc.epochs, "recipe": recipe.record(),
                  "in_channels": info.in_channels, "num_classes": info.num_classes,
                  "image_size": info.image_size, "shape": list(info.shape)}
              for i in range(tc.count)}
    done = {i: old[i] for i in wanted if reusable(old.get(i), wanted[i], out)}
    if not done:
        prov = None   # nothing left that the earlier provenance describes
    write_index(out, dataset, done, prov)  # drop stale records before anything else changes
    todo = [i for i in wanted if i not in done]
    if not todo:
        return [done[i] for i in sorted(done)]

    zca = ensure_zca(cfg, run_dir, info)
    init_ray(cfg.ray, progress=progress)
    res = tc.resources
    if progress:
        reused = f" ({len(done)} reused)" if done else ""
        from .services import resources_text
        what = (f"{len(todo)} teachers{reused} as Ray tasks of {resources_text(res)} each, "
                f"{_at_once(res, len(todo))} at a time" if len(todo) > 1 else
                f"1 teacher{reused} as a Ray task of {resources_text(res)}")
        print(f"[teachers] training {what}; {tc.epochs} epochs" + (" each" if len(todo) > 1 else ""),
              file=sys.stderr, flush=True)
    task = ray.remote(num_cpus=res.cpus, num_gpus=res.gpus, max_retries=tc.max_retries,
                      retry_exceptions=True)(_teacher_task)
    tracker = ray.remote(num_cpus=0)(_Tracker).remote()
    zca_ref = ray.put(zca.state_dict()) if zca is not None else None
    read = {"verify": cfg.data.verify, "on_corrupt": cfg.data.on_corrupt}
    pending = {task.remote(i, spec, wanted[i]["seed"], asdict(recipe), cfg.data.dir, read, device,
                           task_threads(res), zca_ref, tracker,
                           str(curves_dir(Path(run_dir).resolve(), TEACHERS_DIR, teacher_name(i))), cfg.tracking): i
               for i in todo}
    bar = _Progress(progress, todo, tc.epochs)
    mine = provenance()   # versions and git commit, asked once (git runs as a subprocess)
    failures: list[str] = []
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:  # the task failed on every attempt
                    failures.append(f"{teacher_name(i)} failed after {tc.max_retries + 1} attempt(s): {_failure(e)}")
                    continue
                if isinstance(result, str):
                    failures.append(f"{teacher_name(i)} failed: {result}")
                    continue
                state, acc, seconds, cpu_seconds = result
                done[i] = save_teacher(out, i, state, acc, seconds, cpu_seconds, wanted[i])
                prov = trained_provenance(prov, mine)
                write_index(out, dataset, done, prov)
                bar.finished(i, acc, seconds)
            bar.update(ray.get(tracker.snapshot.remote()))
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        ray.kill(tracker)
        bar.close()
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise RayddError(failures[0] + more)
    return [done[i] for i in sorted(done)]


def _at_once(res, tasks: int) -> str:
    """How many of ``tasks`` tasks of ``res`` the running Ray runs at once, for the start line."""
    import ray
    try:
        total = ray.cluster_resources()
    except Exception:   # informative only
        return "?"
    return str(min(res.copies_in(total), tasks))


