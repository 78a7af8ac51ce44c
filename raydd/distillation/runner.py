"""Distillation on Ray: one task per group against a shared teacher-service actor, the progress
board, retries, and the aggregator at the end; or the same groups in-process (no Ray).

Workers write their checkpoints into RUN themselves, so on a multi-node cluster RUN must be on
storage every node sees; the finished images also come back with the task's result and the
driver writes them, so only resuming a killed worker on another node needs the shared storage.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..errors import ConfigError, RayddError
from ..io import read_json, sha256_file, write_json
from ..methods import Services
from ..rundir import claim
from ..synset import MANIFEST, TENSOR_FILE
from . import auxiliaries, hmdc_ray
from .aggregate import aggregate
from .init import initial_images
from .plan import DataShape, GroupPlan, fingerprint, plan_groups, service_name
from .view import LiveView, ProgressArg
from .worker import distill_group, save_final


@dataclass
class DistillResult:
    run_dir: Path
    synset_dir: Path
    synset_path: Path
    manifest_path: Path
    grid_path: Path | None
    groups: list[dict[str, Any]]
    seconds: float


def _group_task(cfg: Config, plan: GroupPlan, init: tuple[torch.Tensor, torch.Tensor], service_handle: Any,
                board: Any, shape: DataShape, device: str, aux_handles: list | None = None) -> dict[str, Any]:
    """The Ray task around :func:`distill_group`; a retried attempt resumes from the checkpoint."""
    import ray

    from ..services import RayService
    from ..train import set_threads

    set_threads(cfg.distill.resources.cpus)

    def report(msg: dict[str, Any]) -> None:
        try:
            board.put.remote(msg)      # fire and forget: progress must never stall distillation
        except Exception:
            pass

    services = Services(teachers=RayService(service_handle), auxiliaries=auxiliaries.ray_client(aux_handles))
    return distill_group(cfg, plan, init, services, shape, report=report,
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


def _load_teachers(cfg: Config, run_dir: Path, info: Any) -> tuple[list[torch.nn.Module], list[dict]]:
    """Load and vet the teacher pool before any worker starts: checksums, shape, architecture."""
    from ..models import build
    from ..teachers import load_teachers
    models, records = load_teachers(run_dir, expect_classes=info.num_classes, expect_shape=tuple(info.shape))
    want = build(cfg.teachers.arch, info.in_channels, info.num_classes, info.image_size).spec
    for rec in records:
        if rec.get("spec") != want:
            raise RayddError(f"teacher {rec.get('file')} is {rec.get('spec')!r} but teachers.arch is "
                             f"{cfg.teachers.arch!r} ({want!r}); retrain the teachers or fix the config")
    return models, records


def loss_explanation(cfg: Config) -> str:
    """One line saying what the ``loss`` of the progress view and the curves is, and which way is good."""
    d = cfg.distill
    if d.method == "hmdc":
        return ("loss (HMDC) = L1 + L2 + L3 summed over classes: distances between the gradients that real "
                "and synthetic batches give the model pair (L3: the MD loss's), >= 0, lower = better matched")
    term = ("" if d.objective == "linear" else "log ") + f"d_{d.distance}(student_k, teacher)"
    line = (f"loss (APM, Eq. 4) = {d.alpha:g}·CE(teacher, label) − Σ over K={d.checkpoints} student checkpoints "
            f"of {term}, per image: the images descend it, maximising the students' disagreement with the "
            f"teacher, so it is negative by design and more negative = more adversarial")
    if d.metadd.enabled:
        line += "; MetaDD's terms come on top (loss_all in the curves)"
    return line


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

    from ..data import load_info
    from ..data.zca import ensure_zca
    info = load_info(cfg.data.dir)
    shape = DataShape(info.in_channels, info.num_classes, info.image_size)
    models, records = _load_teachers(cfg, run_dir, info)
    aux_nets, aux_records = auxiliaries.load_pool(cfg, run_dir, info)   # MetaDD's, vetted before any work
    zca = ensure_zca(cfg, run_dir, info)   # the teachers' whitening, when data.zca is on
    plans = plan_groups(cfg, run_dir)
    todo = [p for p in plans if not p.final_path.exists()]
    fresh = [p for p in todo if not p.state_path.exists()]
    inits = initial_images(cfg, info, fresh, zca) if fresh else {}
    # A resumed group rebuilds its method before loading its state; any images of the right shape do.
    for p in todo:
        if p.index not in inits:
            inits[p.index] = (torch.zeros(p.ipc * info.num_classes, *info.shape),
                              torch.arange(info.num_classes).repeat_interleave(p.ipc))

    if backend == "ray":   # before the view: Ray's start lines would otherwise cut through its bar
        import ray
        if not ray.is_initialized():
            from ..raycluster import init_ray
            init_ray(cfg.ray, progress=progress is True)
    view = LiveView(plans, progress)
    if todo:
        view.note(loss_explanation(cfg))
    try:
        if backend == "local":
            from ..services import LocalService
            from ..train import resolve_device
            device = resolve_device(cfg.device)
            service = LocalService(models, device)
            services = Services(teachers=service, auxiliaries=auxiliaries.local_client(aux_nets, device))
            for p in todo:
                distill_group(cfg, p, inits[p.index], services, shape, report=view.handle, device=device)
            out, groups = aggregate(cfg, run_dir, plans, service, records, info, fingerprint_sha=fp, zca=zca,
                                    auxiliaries=aux_records)
        else:
            out, groups = _run_on_ray(cfg, run_dir, plans, todo, inits, shape, view, records, info, fp, zca,
                                      aux_records)
    finally:
        view.close()
    grid = out / "grid.png"
    return DistillResult(run_dir, out, out / TENSOR_FILE, out / MANIFEST, grid, groups, time.time() - t0)


def _run_on_ray(cfg: Config, run_dir: Path, plans: list[GroupPlan], todo: list[GroupPlan],
                inits: dict[int, tuple[torch.Tensor, torch.Tensor]], shape: DataShape, view: LiveView,
                records: list[dict], info: Any, fp: str, zca: Any,
                aux_records: list[dict] = ()) -> tuple[Path, list[dict]]:
    import ray
    from ray.exceptions import RayError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ..services import RayService, resources_text, start_replicas

    if not ray.is_initialized():
        from ..raycluster import init_ray
        init_ray(cfg.ray, progress=view.enabled)
    svc, res = cfg.distill.service, cfg.distill.resources
    device = ray_device(cfg, res, "distill.resources")
    service_device = ray_device(cfg, svc.resources, "distill.service.resources")
    owned = not svc.name            # a configured name is shared across runs: leave it running
    handles: list = []
    board = None
    aux_handles: list = []
    pending: dict[Any, GroupPlan] = {}
    errors: list[Exception] = []
    try:
        if hmdc_ray.sharded(cfg):   # a pair actor and class shards per group; teachers only for the soft labels
            hmdc_ray.distill_groups(cfg, todo, shape, device, view.handle)
            todo = []
        t_service = time.monotonic()
        on = f"{resources_text(svc.resources)} ({service_device})" + \
            (f" × {svc.replicas} replicas" if svc.replicas > 1 else "")
        view.note(f"starting the teacher service: {len(records)} teachers on {on} …")
        handles = start_replicas(run_dir, name=service_name(cfg, run_dir), replicas=svc.replicas,
                                 resources=svc.resources, max_batch=svc.max_batch, max_restarts=svc.max_restarts,
                                 device=service_device)
        for hosted in map(_service_size, handles):
            if hosted != len(records):
                raise RayddError(f"teacher service {service_name(cfg, run_dir)!r} hosts {hosted} networks but "
                                 f"{run_dir / 'teachers'} has {len(records)}; it serves another run, so set "
                                 f"distill.service.name to a new name")
        view.note(f"teacher service up: {hosted} teachers on {on} ({time.monotonic() - t_service:.1f} s)")
        aux_device = ray_device(cfg, cfg.auxiliaries.service.resources, "auxiliaries.service.resources")
        t_aux = time.monotonic()
        aux_handles = auxiliaries.start_shards(cfg, run_dir, list(aux_records), info, aux_device)
        if aux_handles:
            view.note(f"auxiliary service up: {len(aux_records)} networks in {len(aux_handles)} shard(s) "
                      f"({time.monotonic() - t_aux:.1f} s)")
        # On the driver's node, which lives as long as the run: a board on a node that is lost would
        # take the run with it. Restartable anyway (soft affinity); lost progress messages are harmless.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        board = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(_Board).options(
            scheduling_strategy=here).remote()
        ray.get(board.take.remote())   # alive before any worker reports to it
        task = ray.remote(_group_task)
        if todo:
            view.note(f"{len(todo)} group task(s) submitted ({resources_text(res)} each); rate and ETA count "
                      f"from the first finished round")
        for p in todo:
            # SPREAD: groups are equal and independent, so one per node balances a cluster best.
            opts = dict(num_cpus=res.cpus, num_gpus=res.gpus, max_retries=cfg.distill.max_retries,
                        retry_exceptions=[RayError, OSError], scheduling_strategy="SPREAD",
                        name=f"raydd-distill-{p.name}")
            pending[task.options(**opts).remote(cfg, p, inits[p.index], handles[p.index % len(handles)], board,
                                                shape, device, aux_handles)] = p
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
                    save_final(plan, summary["images"], summary["labels"])
                    write_json(plan.progress_path, {k: v for k, v in summary.items()
                                                    if k not in ("images", "labels")})
        for msg in ray.get(board.take.remote()):
            view.handle(msg)
        _service_report(handles, run_dir, view)
        _memory_report(plans, aux_handles, view)
        if errors:
            raise errors[0]
        return aggregate(cfg, run_dir, plans, RayService(handles[0]), records, info, fingerprint_sha=fp, zca=zca,
                         auxiliaries=list(aux_records))
    finally:
        for ref in pending:        # interrupted: stop the workers; their checkpoints stay for a resume
            ray.cancel(ref, force=True)
        if board is not None:
            ray.kill(board)
        for h in handles if owned else ():
            ray.kill(h, no_restart=True)
        if not cfg.auxiliaries.service.name:
            for h in aux_handles:
                ray.kill(h, no_restart=True)


def _service_report(handles: list, run_dir: Path, view: LiveView) -> None:
    """How the teacher service kept up, per replica (since it started): ``distill/service.json`` and a
    line each. A report only: a service that does not answer is left out, never a failed run."""
    import ray
    try:
        stats = ray.get([h.stats.remote() for h in handles], timeout=30)
    except Exception:
        return
    if not any(s["requests"] for s in stats):   # a method that never asked (HMDC: soft labels only)
        return
    write_json(run_dir / "distill" / "service.json", {"replicas": stats})
    for r, s in enumerate(stats):
        view.note(f"teacher service{f' replica {r}' if len(stats) > 1 else ''}: {s['requests']} requests in "
                  f"{s['batches']} batches ({s['requests_per_batch']:.1f} per batch), queued "
                  f"{s['queue_ms_mean']:.1f} ms mean / {s['queue_ms_p95']:.1f} ms p95, busy {s['busy']:.0%}, "
                  f"peak RSS {s['memory']['rss_mb']:,.0f} MB")


def _memory_report(plans: list[GroupPlan], aux_handles: list, view: LiveView) -> None:
    """One line of peak memory: each group's worker (from its progress record) and each auxiliary
    service shard (the teacher service's is on its own line)."""
    import ray
    groups = [p.read_progress().get("memory") for p in plans]
    try:
        aux = [s["memory"] for s in ray.get([h.stats.remote() for h in aux_handles], timeout=30)]
    except Exception:
        aux = []
    if any(groups):
        text = ", ".join(f"group {p.index} {m['rss_mb']:,.0f} MB" for p, m in zip(plans, groups) if m)
        view.note(f"peak RSS: {text}" + "".join(f", auxiliary shard {i} {m['rss_mb']:,.0f} MB"
                                               for i, m in enumerate(aux)))


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
