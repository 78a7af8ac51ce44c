"""Distillation orchestration: APM group workers on Ray, one live view, and the aggregator.

``distill.ipc`` images per class are split into ``distill.groups`` independent groups (paper 003,
Sec. 3.3/4.3: subsets distilled by independent workers and merged lose nothing). Every group
covers every class, starts from its own real images with its own seed, and asks the shared
teacher service for logits and input gradients.

Layout of RUN (every file written atomically, so a crash leaves the last complete version)::

    config.yaml                          resolved config (raydd.rundir: a run of another config is refused)
    distill/group-GGG/state.safetensors  APM state (images, optimiser) at the last checkpoint
    distill/group-GGG/progress.json      round, done, rollbacks, starts, completions, pid, host
    distill/group-GGG/final.safetensors  the finished group (images, labels)
    synset/{synset.safetensors, manifest.json, grid.png}

Initial images: ``ipc`` real images per class are sampled once with ``cfg.seed`` and sliced
per group, so no real image seeds two groups (a duplicate start makes groups redundant).

Workers write their checkpoints into RUN themselves, so on a multi-node cluster RUN must be on
storage every node sees; the finished images also come back with the task's result and the
driver writes them, so only resuming a killed worker on another node needs the shared storage.
"""
from __future__ import annotations

import datetime
import hashlib
import math
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .config import Config, flatten
from .errors import ConfigError, RayddError
from .io import atomic_path, load_tensors, read_json, save_tensors, sha256_file, write_json
from .rundir import claim
from .synset import MANIFEST, TENSOR_FILE, Synset, save_synset

GROUP_SEED_STRIDE = 10007      # group g's seed = cfg.seed * GROUP_SEED_STRIDE + g
MAX_ROLLBACKS = 3              # non-finite images this often after the same checkpoint = give up
REPORT_EVERY_S = 0.5           # workers report at most this often (events and checkpoints always)
GRID_MAX_CLASSES = 100         # grid.png shows at most this many classes (rows) ...
GRID_PER_ROW = 10              # ... of at most this many images each

# Distill keys that change how the work runs, not what it computes: not part of the fingerprint.
_RUN_ONLY = ("checkpoint_every", "max_retries", "resources", "service")
_TEACHER_KEYS = ("arch", "count", "epochs", "lr", "momentum", "weight_decay", "batch_size", "dsa")
_DATA_KEYS = ("source", "image_size", "zca", "dsa_strategy")

ProgressArg = bool | Callable[[dict[str, Any]], None]


@dataclass
class DistillResult:
    run_dir: Path
    synset_dir: Path
    synset_path: Path
    manifest_path: Path
    grid_path: Path | None
    groups: list[dict[str, Any]]
    seconds: float


@dataclass(frozen=True)
class GroupPlan:
    """What one group distils: ``ipc`` images per class from slot ``offset`` of the real sample."""
    index: int
    ipc: int
    offset: int
    seed: int
    rounds: int
    directory: Path

    @property
    def name(self) -> str:
        return f"group-{self.index:03d}"

    @property
    def state_path(self) -> Path:
        return self.directory / "state.safetensors"

    @property
    def progress_path(self) -> Path:
        return self.directory / "progress.json"

    @property
    def final_path(self) -> Path:
        return self.directory / "final.safetensors"


@dataclass(frozen=True)
class DataShape:
    in_channels: int
    num_classes: int
    image_size: int


# ---------------------------------------------------------------------------- planning

def split_ipc(ipc: int, groups: int) -> list[int]:
    """As even as possible; the first groups take the remainder (ipc 5, groups 2 -> [3, 2])."""
    if groups < 1 or ipc < groups:
        raise RayddError(f"cannot split distill.ipc={ipc} into distill.groups={groups}; "
                         f"expected 1 <= groups <= ipc")
    base, extra = divmod(ipc, groups)
    return [base + (g < extra) for g in range(groups)]


def plan_groups(cfg: Config, run_dir: str | Path) -> list[GroupPlan]:
    root = Path(run_dir) / "distill"
    plans, offset = [], 0
    for g, ipc in enumerate(split_ipc(cfg.distill.ipc, cfg.distill.groups)):
        plans.append(GroupPlan(index=g, ipc=ipc, offset=offset, seed=cfg.seed * GROUP_SEED_STRIDE + g,
                               rounds=cfg.distill.rounds, directory=root / f"group-{g:03d}"))
        offset += ipc
    return plans


def service_name(cfg: Config, run_dir: str | Path) -> str:
    """The teacher service's actor name: configured, or derived from the run directory."""
    if cfg.distill.service.name:
        return cfg.distill.service.name
    digest = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
    return f"raydd-teachers-{digest}"


# ---------------------------------------------------------------------------- fingerprint

def fingerprint(cfg: Config) -> str:
    """sha256 of the config values a synset depends on; its manifest records it, a match means done."""
    d = cfg.to_dict()
    data, teachers, distill = d["data"], d["teachers"], d["distill"]
    values: dict[str, Any] = {"seed": d["seed"]}
    values.update({f"data.{k}": data[k] for k in _DATA_KEYS})
    values.update({f"teachers.{k}": teachers[k] for k in _TEACHER_KEYS})
    values.update(flatten({k: v for k, v in distill.items() if k not in _RUN_ONLY}, "distill"))
    text = "\n".join(f"{k}={values[k]!r}" for k in sorted(values))
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------- group worker

def _read_progress(plan: GroupPlan) -> dict[str, Any]:
    if plan.progress_path.exists():
        return read_json(plan.progress_path)
    return {"group": plan.index, "ipc": plan.ipc, "seed": plan.seed, "rounds": plan.rounds,
            "round": 0, "done": False, "rollbacks": 0, "rollback_log": [], "starts": [],
            "completions": 0, "loss": None, "seconds": {}}


def _save_state(plan: GroupPlan, group: Any) -> None:
    save_tensors(plan.state_path, group.state_dict(),
                 metadata={"group": str(plan.index), "round": str(group.round)})


def distill_group(cfg: Config, plan: GroupPlan, init: tuple[torch.Tensor, torch.Tensor], service: Any,
                  shape: DataShape, *, report: Callable[[dict[str, Any]], None] = lambda m: None,
                  device: str | torch.device = "cpu", node: str | None = None) -> dict[str, Any]:
    """Run (or resume) one group to its last round; plain PyTorch, the same under Ray and locally.

    Checkpoints every ``distill.checkpoint_every`` rounds. Non-finite images roll the group back
    to its last checkpoint with a fresh random stream (a replay of the same stream would fail the
    same way) and are reported; ``MAX_ROLLBACKS`` failures after one checkpoint stop the group.
    Returns the group's progress record with its final ``images`` and ``labels``.
    """
    from .apm import APMGroup, NonFiniteImages
    from .augment import DSA

    progress = _read_progress(plan)
    if plan.final_path.exists():   # an earlier attempt finished but died before returning
        final = load_tensors(plan.final_path)
        return {**progress, "images": final["images"], "labels": final["labels"]}

    dsa = DSA(cfg.data.dsa_strategy) if cfg.distill.dsa else None
    group = APMGroup(cfg.distill, init[0].to(device), init[1].to(device),
                     student_spec=cfg.distill.arch or cfg.teachers.arch, in_channels=shape.in_channels,
                     num_classes=shape.num_classes, image_size=shape.image_size, seed=plan.seed, dsa=dsa)
    if plan.state_path.exists():
        group.load_state_dict(load_tensors(plan.state_path))
    else:
        _save_state(plan, group)   # a rollback always has a checkpoint to return to
    start_round = group.round
    host = socket.gethostname()
    progress.update(round=group.round, pid=os.getpid(), host=host, node=node)
    progress["starts"].append(group.round)
    write_json(plan.progress_path, progress)

    seconds = {k: float(v) for k, v in progress.get("seconds", {}).items()}
    base = {"group": plan.index, "rounds": plan.rounds, "pid": os.getpid(), "host": host, "node": node}
    report({**base, "kind": "start", "round": group.round, "start": len(progress["starts"])})
    t0 = last_report = time.monotonic()
    failures = 0               # non-finite events since the last checkpoint
    loss = None
    while group.round < plan.rounds:
        try:
            stats = group.step(service)
        except NonFiniteImages:
            failed_at = group.round + 1
            failures += 1
            group.load_state_dict(load_tensors(plan.state_path))
            if failures >= MAX_ROLLBACKS:
                raise RayddError(f"group {plan.index}: images went non-finite {failures} times after its "
                                 f"checkpoint at round {group.round}; lower distill.lr_img "
                                 f"(now {cfg.distill.lr_img})")
            progress["rollbacks"] += 1
            group.gen.manual_seed(plan.seed + 7919 * progress["rollbacks"])
            progress["rollback_log"].append({"failed": failed_at, "to": group.round})
            write_json(plan.progress_path, progress)
            report({**base, "kind": "rollback", "round": group.round, "failed": failed_at,
                    "rollbacks": progress["rollbacks"]})
            continue
        loss = float(stats["loss"])
        for k, v in stats.get("seconds", {}).items():
            seconds[k] = seconds.get(k, 0.0) + float(v)
        now = time.monotonic()
        rate = (group.round - start_round) / max(now - t0, 1e-9)
        checkpoint = group.round % cfg.distill.checkpoint_every == 0 and group.round < plan.rounds
        if checkpoint:
            _save_state(plan, group)
            failures = 0
            progress.update(round=group.round, loss=loss, rate=rate, seconds=seconds)
            write_json(plan.progress_path, progress)
        if checkpoint or now - last_report >= REPORT_EVERY_S:
            report({**base, "kind": "checkpoint" if checkpoint else "round", "round": group.round,
                    "loss": loss, "rate": rate})
            last_report = now

    images, labels = group.images.detach().cpu(), group.labels.detach().cpu()
    save_tensors(plan.final_path, {"images": images, "labels": labels},
                 metadata={"group": str(plan.index), "seed": str(plan.seed), "rounds": str(plan.rounds)})
    progress.update(round=group.round, done=True, loss=loss, seconds=seconds,
                    completions=progress["completions"] + 1)
    write_json(plan.progress_path, progress)
    report({**base, "kind": "done", "round": group.round, "loss": loss})
    return {**progress, "images": images, "labels": labels}


def _group_task(cfg: Config, plan: GroupPlan, init: tuple[torch.Tensor, torch.Tensor], service_handle: Any,
                board: Any, shape: DataShape, device: str) -> dict[str, Any]:
    """The Ray task around :func:`distill_group`; a retried attempt resumes from the checkpoint."""
    import ray

    from .services import RayService
    from .train import set_threads

    set_threads(cfg.distill.resources.cpus)

    def report(msg: dict[str, Any]) -> None:
        try:
            board.put.remote(msg)      # fire and forget: progress must never stall distillation
        except Exception:
            pass

    return distill_group(cfg, plan, init, RayService(service_handle), shape, report=report,
                         device=device, node=ray.get_runtime_context().get_node_id())


class _Board:
    """Collects progress messages from all workers until the driver takes them."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def put(self, msg: dict[str, Any]) -> None:
        self.messages.append(msg)

    def take(self) -> list[dict[str, Any]]:
        out, self.messages = self.messages, []
        return out


# ---------------------------------------------------------------------------- live view

class LiveView:
    """One view of the whole run: a tqdm bar on a terminal, else a status line every 10 s.

    ``progress`` may also be a callable, which then receives every message instead.
    """

    LINE_EVERY_S = 10.0

    def __init__(self, plans: list[GroupPlan], progress: ProgressArg):
        self.callback = progress if callable(progress) else None
        self.enabled = bool(progress) and self.callback is None
        self.done = {p.index: p.final_path.exists() for p in plans}
        self.rounds = {p.index: p.rounds if self.done[p.index] else _read_progress(p)["round"] for p in plans}
        self.last: dict[int, dict[str, Any]] = {}
        self.total = sum(p.rounds for p in plans)
        self.initial = sum(self.rounds.values())
        self.t0 = self.last_line = time.monotonic()
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, initial=self.initial, unit="round", desc="distill",
                            file=sys.stderr, dynamic_ncols=True)

    def handle(self, msg: dict[str, Any]) -> None:
        if self.callback is not None:
            self.callback(msg)
            return
        g = msg["group"]
        self.rounds[g] = msg["round"]
        self.last[g] = msg
        kind = msg["kind"]
        if kind == "start" and msg.get("start", 1) > 1:
            self.note(f"group {g} restarted (start #{msg['start']}) from its checkpoint at round {msg['round']}"
                      f" on {msg['host']} pid {msg['pid']}")
        elif kind == "rollback":
            self.note(f"group {g}: images went non-finite in round {msg['failed']}; rolled back to round "
                      f"{msg['round']} ({msg['rollbacks']} rollback(s) so far)")
        elif kind == "done":
            self.done[g] = True
        self.refresh()

    def note(self, text: str) -> None:
        if self.callback is not None or not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(f"[distill] {text}", file=sys.stderr)
        else:
            print(f"[distill] {text}", file=sys.stderr, flush=True)

    def _groups_text(self) -> str:
        parts = []
        for g in sorted(self.rounds):
            m = self.last.get(g, {})
            state = "done" if self.done[g] else f"r{self.rounds[g]}"
            loss = f" L{m['loss']:.3g}" if m.get("loss") is not None else ""
            rate = f" {m['rate']:.2g}r/s" if m.get("rate") and not self.done[g] else ""
            parts.append(f"g{g} {state}{loss}{rate}")
        return " | ".join(parts)

    def refresh(self, force: bool = False) -> None:
        if not self.enabled:
            return
        done = sum(self.rounds.values())
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(self._groups_text(), refresh=False)
            self.bar.refresh()
            return
        now = time.monotonic()
        if not force and now - self.last_line < self.LINE_EVERY_S:
            return
        self.last_line = now
        rate = (done - self.initial) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else math.inf
        eta_text = str(datetime.timedelta(seconds=round(eta))) if math.isfinite(eta) else "?"
        print(f"[distill] {done}/{self.total} rounds ({done / max(self.total, 1):.0%}) "
              f"{rate:.2f} rounds/s ETA {eta_text} | {self._groups_text()}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self.refresh(force=True)


# ---------------------------------------------------------------------------- teachers and data

def _load_teachers(cfg: Config, run_dir: Path, info: Any) -> tuple[list[torch.nn.Module], list[dict]]:
    """Load and vet the teacher pool before any worker starts: checksums, shape, architecture."""
    from .models import build
    from .teachers import load_teachers
    models, records = load_teachers(run_dir, expect_classes=info.num_classes, expect_shape=tuple(info.shape))
    want = build(cfg.teachers.arch, info.in_channels, info.num_classes, info.image_size).spec
    for rec in records:
        if rec.get("spec") != want:
            raise RayddError(f"teacher {rec.get('file')} is {rec.get('spec')!r} but teachers.arch is "
                             f"{cfg.teachers.arch!r} ({want!r}); retrain the teachers or fix the config")
    return models, records


def initial_images(cfg: Config, info: Any, plans: list[GroupPlan], zca: Any = None
                   ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Each group's real starting images: disjoint slices of one per-class sample (see module doc)."""
    from .apm import init_images
    from .data import sample_per_class

    x, y = sample_per_class(info, "train", cfg.distill.ipc, cfg.seed, verify=cfg.data.verify,
                            on_corrupt=cfg.data.on_corrupt)
    if zca is not None:
        x = zca.transform(x)
    per_class = [torch.nonzero(y == c).flatten() for c in range(info.num_classes)]
    out = {}
    for plan in plans:
        idx = torch.cat([i[plan.offset:plan.offset + plan.ipc] for i in per_class])
        g = torch.Generator().manual_seed(plan.seed)
        out[plan.index] = init_images(x[idx], y[idx], plan.ipc, cfg.distill.init, g,
                                      num_classes=info.num_classes)
    return out


# ---------------------------------------------------------------------------- aggregation

def soft_labels(service: Any, images: torch.Tensor, mode: str, batch: int) -> tuple[torch.Tensor, list[int]]:
    """Teacher logits on the final images: the first teacher (APM Alg. 1, line 12) or the mean."""
    models = [0] if mode == "first" else list(range(service.num_models))
    out = []
    for start in range(0, images.shape[0], batch):
        x = images[start:start + batch]
        out.append(torch.stack([service.logits(x, m).float().cpu() for m in models]).mean(0))
    return torch.cat(out), models


def write_grid(path: Path, images: torch.Tensor, labels: torch.Tensor, info: Any, zca: Any = None) -> Path:
    """One row per class (≤ 10 images each), denormalised to pixels; ZCA undone first if used."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .data import denormalize

    x = zca.inverse(images) if zca is not None else images
    x = denormalize(x, info).clamp(0, 1)
    classes = list(range(min(info.num_classes, GRID_MAX_CLASSES)))
    cols = max(1, min(GRID_PER_ROW, max(int((labels == c).sum()) for c in classes)))
    c_, h, w = x.shape[1:]
    pad = max(1, h // 16)
    mosaic = torch.ones(len(classes) * (h + pad) + pad, cols * (w + pad) + pad, c_)
    for r, c in enumerate(classes):
        for j, i in enumerate(torch.nonzero(labels == c).flatten()[:cols].tolist()):
            top, left = pad + r * (h + pad), pad + j * (w + pad)
            mosaic[top:top + h, left:left + w] = x[i].permute(1, 2, 0)
    img = mosaic.squeeze(-1).numpy() if c_ == 1 else mosaic.numpy()
    fig = Figure(figsize=(1.5 + 0.6 * cols, 0.6 + 0.6 * len(classes)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(img, cmap="gray" if c_ == 1 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([pad + r * (h + pad) + h / 2 for r in range(len(classes))],
                  [str(info.classes[c]) for c in classes], fontsize=7)
    shown = "" if len(classes) == info.num_classes else f" (first {len(classes)} of {info.num_classes} classes)"
    ax.set_title(f"synthetic images by class{shown}", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def aggregate(cfg: Config, run_dir: Path, plans: list[GroupPlan], service: Any, records: list[dict],
              info: Any, *, fingerprint_sha: str, zca: Any = None) -> tuple[Path, list[dict]]:
    """Merge finished groups into RUN/synset; refuse missing groups and non-finite values."""
    missing = [p.index for p in plans if not p.final_path.exists()]
    if missing:
        raise RayddError(f"refusing to write the synset: group(s) {missing} of {len(plans)} are not finished")
    images, labels, groups, provenance = [], [], [], []
    for p in plans:
        t = load_tensors(p.final_path)
        x, y = t["images"].float(), t["labels"].long()
        counts = torch.bincount(y, minlength=info.num_classes).tolist()
        if counts != [p.ipc] * info.num_classes or tuple(x.shape[1:]) != tuple(info.shape):
            raise RayddError(f"refusing to write the synset: {p.final_path} holds {tuple(x.shape)} images with "
                             f"per-class counts {counts}, expected {p.ipc} per class of shape {tuple(info.shape)}")
        if not torch.isfinite(x).all():
            raise RayddError(f"refusing to write the synset: group {p.index} holds non-finite images")
        order = torch.argsort(y, stable=True)
        images.append(x[order])
        labels.append(y[order])
        groups.append(torch.full((len(y),), p.index, dtype=torch.int64))
        prog = _read_progress(p)
        provenance.append({"group": p.index, "ipc": p.ipc, "seed": p.seed, "rounds": p.rounds,
                           "rollbacks": prog.get("rollbacks", 0), "starts": prog.get("starts", []),
                           "completions": prog.get("completions", 0), "loss": prog.get("loss"),
                           "seconds": prog.get("seconds", {}), "sha256": sha256_file(p.final_path)})
    images_t, labels_t = torch.cat(images), torch.cat(labels)
    soft, used = soft_labels(service, images_t, cfg.distill.soft_labels, cfg.distill.service.max_batch)
    if not torch.isfinite(soft).all():
        raise RayddError("refusing to write the synset: the teachers' soft labels hold non-finite values")
    synset = Synset(images=images_t, labels=labels_t, soft_labels=soft, groups=torch.cat(groups),
                    meta={"num_classes": info.num_classes})
    synset.check()
    out = run_dir / "synset"
    write_grid(out / "grid.png", images_t, labels_t, info, zca)
    manifest = {
        "kind": "raydd.synset",
        "method": "apm",
        "fingerprint": fingerprint_sha,
        "dataset": {"source": info.source, "dir": cfg.data.dir,
                    "classes": list(info.classes), "zca": cfg.data.zca},
        "ipc": cfg.distill.ipc,
        "teachers": [{"file": r.get("file"), "sha256": r.get("sha256"), "spec": r.get("spec"),
                      "test_acc": r.get("test_acc")} for r in records],
        "soft_labels": {"mode": cfg.distill.soft_labels, "teachers": [records[i].get("file") for i in used]},
        "groups": provenance,
        "counts": {"images": int(images_t.shape[0]), "per_group": [p.ipc * info.num_classes for p in plans]},
        "grid": "grid.png",
        "config": cfg.to_dict(),
    }
    save_synset(out, synset, manifest)
    return out, provenance


def _finished(run_dir: Path, fingerprint_sha: str, t0: float) -> DistillResult | None:
    """The result of a complete earlier run of the same config, if RUN holds one intact."""
    out = run_dir / "synset"
    if not (out / MANIFEST).exists():
        return None
    doc = read_json(out / MANIFEST)
    if doc.get("fingerprint") != fingerprint_sha or not (out / TENSOR_FILE).exists():
        return None
    if sha256_file(out / TENSOR_FILE) != doc.get("sha256"):
        return None
    grid = out / "grid.png"
    return DistillResult(run_dir, out, out / TENSOR_FILE, out / MANIFEST, grid if grid.exists() else None,
                         doc.get("groups", []), time.time() - t0)


# ---------------------------------------------------------------------------- driver

def run_distill(cfg: Config, run_dir: str | Path, *, progress: ProgressArg = True,
                backend: str = "ray") -> DistillResult:
    """Distil RUN/synset from the teachers in RUN/teachers, resuming whatever RUN already holds.

    ``backend="ray"`` runs one Ray task per group against a shared teacher-service actor;
    ``backend="local"`` runs the groups one after another in this process (no Ray).
    ``progress``: True for the live view, False for silence, or a callable receiving every message.
    """
    t0 = time.time()
    if backend not in ("ray", "local"):
        raise RayddError(f"backend {backend!r} is unknown; expected 'ray' or 'local'")
    cfg.validate()
    run_dir = Path(run_dir).resolve()   # Ray workers and the service may not share our cwd
    claim(cfg, run_dir, "distill")  # called directly, run_distill guards RUN as the pipeline does
    fp = fingerprint(cfg)
    if (done := _finished(run_dir, fp, t0)) is not None:
        return done

    from .data import load_info
    from .teachers import ensure_zca
    info = load_info(cfg.data.dir)
    shape = DataShape(info.in_channels, info.num_classes, info.image_size)
    models, records = _load_teachers(cfg, run_dir, info)
    zca = ensure_zca(cfg, run_dir, info)   # the teachers' whitening, when data.zca is on
    plans = plan_groups(cfg, run_dir)
    todo = [p for p in plans if not p.final_path.exists()]
    fresh = [p for p in todo if not p.state_path.exists()]
    inits = initial_images(cfg, info, fresh, zca) if fresh else {}
    # A resumed group rebuilds APMGroup before loading its state; any images of the right shape do.
    for p in todo:
        if p.index not in inits:
            inits[p.index] = (torch.zeros(p.ipc * info.num_classes, *info.shape),
                              torch.arange(info.num_classes).repeat_interleave(p.ipc))

    view = LiveView(plans, progress)
    try:
        if backend == "local":
            from .services import LocalService
            from .train import resolve_device
            device = resolve_device(cfg.device)
            service = LocalService(models, device)
            for p in todo:
                distill_group(cfg, p, inits[p.index], service, shape, report=view.handle, device=device)
            out, groups = aggregate(cfg, run_dir, plans, service, records, info, fingerprint_sha=fp, zca=zca)
        else:
            out, groups = _run_on_ray(cfg, run_dir, plans, todo, inits, shape, view, records, info, fp, zca)
    finally:
        view.close()
    grid = out / "grid.png"
    return DistillResult(run_dir, out, out / TENSOR_FILE, out / MANIFEST, grid, groups, time.time() - t0)


def _run_on_ray(cfg: Config, run_dir: Path, plans: list[GroupPlan], todo: list[GroupPlan],
                inits: dict[int, tuple[torch.Tensor, torch.Tensor]], shape: DataShape, view: LiveView,
                records: list[dict], info: Any, fp: str, zca: Any) -> tuple[Path, list[dict]]:
    import ray
    from ray.exceptions import RayError

    from .services import RayService, start_service

    if not ray.is_initialized():
        from .raycluster import init_ray
        init_ray(cfg.ray)
    svc, res = cfg.distill.service, cfg.distill.resources
    device = ray_device(cfg, res, "distill.resources")
    service_device = ray_device(cfg, svc.resources, "distill.service.resources")
    owned = not svc.name            # a configured name is shared across runs: leave it running
    handle = board = None
    pending: dict[Any, GroupPlan] = {}
    errors: list[Exception] = []
    try:
        handle = start_service(run_dir, name=service_name(cfg, run_dir), resources=svc.resources,
                               max_batch=svc.max_batch, max_restarts=svc.max_restarts, device=service_device)
        hosted = _service_size(handle)
        if hosted != len(records):
            raise RayddError(f"teacher service {service_name(cfg, run_dir)!r} hosts {hosted} networks but "
                             f"{run_dir / 'teachers'} has {len(records)}; it serves another run, so set "
                             f"distill.service.name to a new name")
        board = ray.remote(num_cpus=0)(_Board).remote()
        ray.get(board.take.remote())   # alive before any worker reports to it
        task = ray.remote(_group_task)
        for p in todo:
            # SPREAD: groups are equal and independent, so one per node balances a cluster best.
            opts = dict(num_cpus=res.cpus, num_gpus=res.gpus, max_retries=cfg.distill.max_retries,
                        retry_exceptions=[RayError, OSError], scheduling_strategy="SPREAD",
                        name=f"raydd-distill-{p.name}")
            pending[task.options(**opts).remote(cfg, p, inits[p.index], handle, board, shape, device)] = p
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0.5)
            for msg in ray.get(board.take.remote()):
                view.handle(msg)
            for ref in ready:
                plan = pending.pop(ref)
                try:
                    summary = ray.get(ref)
                except Exception as e:   # reported per group once the others have finished
                    errors.append(_group_error(cfg, plan, e))
                    view.note(f"group {plan.index} failed: {errors[-1]}")
                    continue
                # Without shared storage the worker's files stay on its node; the driver keeps its own copy.
                if not plan.final_path.exists():
                    save_tensors(plan.final_path, {"images": summary["images"], "labels": summary["labels"]},
                                 metadata={"group": str(plan.index), "seed": str(plan.seed),
                                           "rounds": str(plan.rounds)})
                    write_json(plan.progress_path, {k: v for k, v in summary.items()
                                                    if k not in ("images", "labels")})
        for msg in ray.get(board.take.remote()):
            view.handle(msg)
        if errors:
            raise errors[0]
        return aggregate(cfg, run_dir, plans, RayService(handle), records, info, fingerprint_sha=fp, zca=zca)
    finally:
        for ref in pending:        # interrupted: stop the workers; their checkpoints stay for a resume
            ray.cancel(ref, force=True)
        if board is not None:
            ray.kill(board)
        if owned and handle is not None:
            ray.kill(handle, no_restart=True)


def _service_size(handle: Any) -> int:
    """Networks the service hosts; waits for it to load them, surfacing a failed start in one line."""
    import ray
    from ray.exceptions import RayActorError

    try:
        return ray.get(handle.num_models.remote())
    except RayActorError as e:
        text = str(e).strip().splitlines()
        raise RayddError(f"the teacher service failed to start: {text[-1] if text else type(e).__name__}") from None


def ray_device(cfg: Config, res: Any, key: str) -> str:
    """A Ray task's device: the GPU only when Ray gives it one (``res.gpus``) and cfg.device allows."""
    if cfg.device == "cuda" and res.gpus == 0:
        raise ConfigError(f"device: 'cuda' needs {key}.gpus > 0 (e.g. 1, or 0.5 to share a GPU)")
    return "cuda" if res.gpus > 0 and cfg.device != "cpu" else "cpu"


def _group_error(cfg: Config, plan: GroupPlan, exc: Exception) -> Exception:
    """One line for the user (the original stays attached as the cause)."""
    from ray.exceptions import RayTaskError

    cause = exc.cause if isinstance(exc, RayTaskError) else exc
    if isinstance(cause, RayddError):
        return cause
    text = str(cause).strip().splitlines()
    err = RayddError(f"group {plan.index} failed (distill.max_retries={cfg.distill.max_retries} retries "
                     f"used): {type(cause).__name__}: {text[0] if text else ''}")
    err.__cause__ = exc
    return err
