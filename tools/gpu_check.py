"""GPU check: what raydd's three hot loops cost on this machine's accelerator (a benchmark, not a test).

  1. APM round     seconds per ``APMGroup.step`` at the APM paper's CIFAR-10 settings, IPC 10
                   (3x32x32, 100 images, ConvNet width 128 depth 3 instance norm, E=250, K=5,
                   lr_net 0.02, a fresh student every 3 rounds, B full), teacher in-process,
                   fp32 and bf16 (``distill.precision``), timed after one warm-up refresh cycle
  2. Ray service   one teacher service actor on a fractional GPU shared by 4 group workers (Ray
                   tasks with their own GPU fraction): total rounds/s and the actor's batching stats
  3. evaluation    one ``evaluate_once`` trial (soft labels, ConvNet, a short schedule)

Images, labels and teachers are random: the work per round does not depend on them, and the
accuracy of part 3 is meaningless (its seconds are the figure). On CUDA every clock is read after
``torch.cuda.synchronize()``. ``--tiny`` shrinks everything (8x8 images, width 16, a few epochs)
so the whole check runs in about a minute on a CPU; that is how its logic is tested.

    python tools/gpu_check.py --out gpu-check.json          # on a machine with a GPU, ~5 minutes
    python tools/gpu_check.py --device cpu --tiny           # the logic, on any machine
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_distill  # noqa: E402  (its Barrier: workers start their timed rounds together)
from bench_distill import Barrier  # noqa: E402


@dataclass(frozen=True)
class Setup:
    """Everything that sizes the check; ``TINY`` shrinks each figure's work, not its kind."""
    channels: int = 3
    size: int = 32
    num_classes: int = 10          # (not "classes": cloudpickle would take it for torch.classes)
    ipc: int = 10                  # 100 images: CIFAR-10 IPC 10
    width: int = 128
    depth: int = 3
    epochs: int = 250              # E
    checkpoints: int = 5           # K
    refresh: int = 3               # a fresh student every this many rounds
    lr_net: float = 0.02           # eta (configs/cifar10_ipc50.yaml, cifar100_ipc10.yaml)
    student_batch: int = 256
    cycles: int = 2                # timed refresh cycles per precision in part 1
    workers: int = 4               # group tasks of part 2
    worker_rounds: int = 6         # timed rounds per worker (after one warm-up cycle)
    eval_epochs: int = 100         # part 3 (the paper's schedule is 1000)
    eval_lr: float = 0.02          # = lr_net, as the official evaluation
    test_images: int = 10000       # CIFAR-10's test split size
    test_batch: int = 1000

    @property
    def spec(self) -> str:
        return f"convnet:width={self.width},depth={self.depth}"


FULL = Setup()
TINY = replace(FULL, size=8, ipc=2, width=16, epochs=4, checkpoints=2, refresh=2, cycles=1, worker_rounds=2,
               eval_epochs=3, test_images=200, test_batch=100)

# (part, figure) of every row in the final table, in order; rows marked GPU only exist on CUDA
ROWS = [("1 APM round", "fp32 s/round"), ("1 APM round", "fp32 s/refresh round"),
        ("1 APM round", "fp32 s/reuse round"), ("1 APM round", "bf16 s/round"),
        ("1 APM round", "bf16 s/refresh round"), ("1 APM round", "bf16 s/reuse round"),
        ("1 APM round", "bf16 speed-up x"),
        ("2 Ray service", "total rounds/s"), ("2 Ray service", "requests"), ("2 Ray service", "batches"),
        ("2 Ray service", "images"), ("2 Ray service", "requests/batch"), ("2 Ray service", "images/batch"),
        ("3 evaluation", "seconds"), ("3 evaluation", "s/epoch"), ("3 evaluation", "test acc")]
GPU_ROWS = [("1 APM round", "fp32 peak GPU MiB"), ("1 APM round", "bf16 peak GPU MiB"),
            ("2 Ray service", "worker peak GPU MiB"), ("2 Ray service", "service peak GPU MiB"),
            ("3 evaluation", "peak GPU MiB")]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="shrink everything: the logic in ~1 minute on a CPU")
    p.add_argument("--service-gpus", type=float, default=0.25, help="GPU fraction of the teacher service (cuda)")
    p.add_argument("--worker-gpus", type=float, default=0.15, help="GPU fraction of each group task (cuda)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of this process (default: all cores; 1 with --tiny, whose work is too "
                        "small to share and which must not stall on a loaded machine)")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class Teachers:
    """A picklable factory of the randomly initialised teacher (the service builds it in its actor)."""

    def __init__(self, s: Setup, seed: int = 0):
        self.s, self.seed = s, seed

    def __call__(self) -> list:
        from raydd.models import build
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return [build(self.s.spec, self.s.channels, self.s.num_classes, self.s.size)]


def make_group(s: Setup, precision: str, device: torch.device, seed: int):
    """An APM group of random images with raydd's CIFAR-10 student settings."""
    from raydd.augment import DSA
    from raydd.config import DistillConfig
    from raydd.methods.apm import APMGroup
    cfg = DistillConfig(ipc=s.ipc, student_epochs=s.epochs, checkpoints=s.checkpoints, refresh_every=s.refresh,
                        lr_net=s.lr_net, student_batch=s.student_batch, lr_img=1.0, alpha=0.1, batch_size=None,
                        precision=precision)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(s.ipc * s.num_classes, s.channels, s.size, s.size, generator=g).to(device)
    labels = torch.arange(s.num_classes).repeat_interleave(s.ipc).to(device)
    return APMGroup(cfg, images, labels, student_spec=s.spec, in_channels=s.channels, num_classes=s.num_classes,
                    image_size=s.size, seed=seed, dsa=DSA())


def timed_step(group, services, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    group.step(services)
    sync(device)
    return time.perf_counter() - t0


def part_round(s: Setup, precision: str, device: torch.device, say) -> dict:
    """Part 1: seconds per round, in-process teacher, after one warm-up refresh cycle."""
    from raydd.methods import Services
    from raydd.services import LocalService
    reset_peak(device)
    group = make_group(s, precision, device, seed=0)
    services = Services(LocalService(Teachers(s)(), device))
    for _ in range(s.refresh):                      # warm-up: allocator, kernels, first student
        timed_step(group, services, device)
    times = [timed_step(group, services, device) for _ in range(s.cycles * s.refresh)]
    refresh = times[::s.refresh]
    reuse = [t for i, t in enumerate(times) if i % s.refresh]
    out = {"s_per_round": sum(times) / len(times), "s_refresh_round": sum(refresh) / len(refresh),
           "s_reuse_round": sum(reuse) / len(reuse) if reuse else math.nan, "rounds": len(times),
           "peak_gpu_mib": peak_mib(device)}
    say(f"[1] {precision}: {out['s_per_round']:.3f} s/round over {len(times)} rounds "
        f"(refresh round {out['s_refresh_round']:.3f} s, reuse round {out['s_reuse_round']:.3f} s)"
        + (f", peak {out['peak_gpu_mib']:.0f} MiB" if device.type == "cuda" else ""))
    return out


def _worker(s: Setup, device: str, threads: int, seed: int, handle, barrier) -> dict:
    """A group task: one warm-up cycle, wait for the others, then ``worker_rounds`` timed rounds."""
    import ray

    from raydd.methods import Services
    from raydd.services import RayService
    from raydd.train import set_threads
    set_threads(threads)
    dev = torch.device(device)
    reset_peak(dev)
    group = make_group(s, "fp32", dev, seed)
    services = Services(RayService(handle))
    for _ in range(s.refresh):
        group.step(services)
    ray.get(barrier.arrive.remote())
    while not ray.get(barrier.open.remote()):
        time.sleep(0.01)
    sync(dev)
    t0 = time.time()
    for _ in range(s.worker_rounds):
        group.step(services)
    sync(dev)
    return {"start": t0, "end": time.time(), "rounds": s.worker_rounds, "peak_gpu_mib": peak_mib(dev)}


def _service_peak(actor) -> float | None:
    dev = actor.local.device
    return torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None


def part_service(s: Setup, device: torch.device, a: argparse.Namespace, say) -> dict:
    """Part 2: one teacher service shared by ``workers`` group tasks."""
    import ray

    from raydd.config import RayConfig, Resources
    from raydd.raycluster import init_ray
    from raydd.services import start_service
    cuda = device.type == "cuda"
    cores = os.cpu_count() or 1
    threads = max(1, (cores - 1) // (s.workers + 1))      # the service and the workers share the cores
    # Logical CPUs: every worker and the service hold at least one, whatever the physical count.
    init_ray(RayConfig(num_cpus=max(cores, (s.workers + 1) * threads), num_gpus=1 if cuda else 0))
    try:
        svc_res = Resources(cpus=threads, gpus=a.service_gpus if cuda else 0.0)
        handle = start_service(Teachers(s), name="raydd-gpu-check-teachers", resources=svc_res, max_restarts=0,
                               device=device.type)
        ray.get(handle.num_models.remote())                  # the actor is up before the clocks start
        barrier = ray.remote(num_cpus=0)(Barrier).remote(s.workers)
        task = ray.remote(_worker).options(num_cpus=threads, num_gpus=a.worker_gpus if cuda else 0, max_retries=0)
        runs = ray.get([task.remote(s, device.type, threads, seed, handle, barrier) for seed in range(s.workers)])
        stats = ray.get(handle.stats.remote())
        service_peak, peak_error = None, None
        try:
            service_peak = ray.get(handle.__ray_call__.remote(_service_peak))
        except Exception as e:  # an older Ray without __ray_call__: the figure is left out, the reason kept
            peak_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ray.kill(handle)
    finally:
        ray.shutdown()
    rounds = sum(r["rounds"] for r in runs)
    span = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    peaks = [r["peak_gpu_mib"] for r in runs if r["peak_gpu_mib"] is not None]
    out = {"workers": s.workers, "threads": threads, "service_gpus": svc_res.gpus,
           "worker_gpus": a.worker_gpus if cuda else 0.0, "rounds": rounds, "rounds_per_s": rounds / span,
           "requests": stats["requests"], "batches": stats["batches"], "images": stats["images"],
           "requests_per_batch": stats["requests"] / max(stats["batches"], 1),
           "images_per_batch": stats["images"] / max(stats["batches"], 1), "service_device": stats["device"],
           "worker_peak_gpu_mib": max(peaks) if peaks else None, "service_peak_gpu_mib": service_peak, "service_peak_error": peak_error}
    say(f"[2] {s.workers} workers x {s.worker_rounds} rounds through one service ({stats['device']}, "
        f"{svc_res.gpus:g} GPU; workers {out['worker_gpus']:g} GPU, {threads} thread(s) each): "
        f"{out['rounds_per_s']:.3f} rounds/s; service {stats['requests']} requests in {stats['batches']} batches "
        f"({out['requests_per_batch']:.2f} requests, {out['images_per_batch']:.0f} images per batch)"
        + (f"; peak worker {out['worker_peak_gpu_mib']:.0f} MiB" if out["worker_peak_gpu_mib"] is not None else "")
        + (f", service {service_peak:.0f} MiB" if service_peak is not None else ""))
    return out


def part_eval(s: Setup, device: torch.device, say) -> dict:
    """Part 3: one soft-label evaluation trial of ConvNet on a random synset of the right shape."""
    from raydd.config import EvalConfig
    from raydd.evaluate.protocol import evaluate_once
    from raydd.synset import Synset
    reset_peak(device)
    g = torch.Generator().manual_seed(1)
    n = s.ipc * s.num_classes
    syn = Synset(torch.randn(n, s.channels, s.size, s.size, generator=g),
                 torch.arange(s.num_classes).repeat_interleave(s.ipc),
                 soft_labels=torch.randn(n, s.num_classes, generator=g), meta={"num_classes": s.num_classes})
    tx = torch.randn(s.test_images, s.channels, s.size, s.size, generator=g)
    ty = torch.randint(s.num_classes, (s.test_images,), generator=g)

    def tests():
        return ((tx[i:i + s.test_batch], ty[i:i + s.test_batch]) for i in range(0, len(tx), s.test_batch))

    ecfg = EvalConfig(archs=[s.spec], modes=["soft"], seeds=1, epochs=s.eval_epochs, lr=s.eval_lr, soft_loss="l1")
    sync(device)
    t0 = time.perf_counter()
    res = evaluate_once(s.spec, "soft", 0, syn, tests, ecfg, image_shape=(s.channels, s.size, s.size),
                        num_classes=s.num_classes, dsa_strategy=dsa_strategy(), device=device)
    sync(device)
    seconds = time.perf_counter() - t0
    out = {"epochs": s.eval_epochs, "seconds": seconds, "s_per_epoch": seconds / s.eval_epochs,
           "test_acc": res["test_acc"], "test_images": s.test_images, "peak_gpu_mib": peak_mib(device)}
    say(f"[3] evaluate_once soft {s.spec}, {n} images, {s.eval_epochs} epochs, {s.test_images} test images: "
        f"{seconds:.2f} s ({out['s_per_epoch'] * 1e3:.1f} ms/epoch), test acc {res['test_acc']:.3f} (random data)"
        + (f", peak {out['peak_gpu_mib']:.0f} MiB" if device.type == "cuda" else ""))
    return out


def dsa_strategy() -> str:
    """The DSA strategy raydd uses for CIFAR-10 (the data section's default)."""
    from raydd.config import DataConfig
    return DataConfig().dsa_strategy


def environment(device: torch.device) -> dict:
    import ray
    env = {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
           "cuda_build": torch.version.cuda, "cpu_cores": os.cpu_count(), "device": device.type}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_gib=p.total_memory / 2**30, capability=f"{p.major}.{p.minor}",
                   cudnn=torch.backends.cudnn.version(), gpus_visible=torch.cuda.device_count(),
                   tf32_conv=torch.backends.cudnn.allow_tf32, tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   bf16_supported=torch.cuda.is_bf16_supported())
    return env


def table(parts: dict, device: torch.device) -> list[dict]:
    p1, p2, p3 = parts["round"], parts["service"], parts["eval"]
    values = {
        ("1 APM round", "fp32 s/round"): p1["fp32"]["s_per_round"],
        ("1 APM round", "fp32 s/refresh round"): p1["fp32"]["s_refresh_round"],
        ("1 APM round", "fp32 s/reuse round"): p1["fp32"]["s_reuse_round"],
        ("1 APM round", "bf16 s/round"): p1["bf16"]["s_per_round"],
        ("1 APM round", "bf16 s/refresh round"): p1["bf16"]["s_refresh_round"],
        ("1 APM round", "bf16 s/reuse round"): p1["bf16"]["s_reuse_round"],
        ("1 APM round", "bf16 speed-up x"): p1["fp32"]["s_per_round"] / p1["bf16"]["s_per_round"],
        ("2 Ray service", "total rounds/s"): p2["rounds_per_s"],
        ("2 Ray service", "requests"): p2["requests"], ("2 Ray service", "batches"): p2["batches"],
        ("2 Ray service", "images"): p2["images"], ("2 Ray service", "requests/batch"): p2["requests_per_batch"],
        ("2 Ray service", "images/batch"): p2["images_per_batch"],
        ("3 evaluation", "seconds"): p3["seconds"], ("3 evaluation", "s/epoch"): p3["s_per_epoch"],
        ("3 evaluation", "test acc"): p3["test_acc"],
        ("1 APM round", "fp32 peak GPU MiB"): p1["fp32"]["peak_gpu_mib"],
        ("1 APM round", "bf16 peak GPU MiB"): p1["bf16"]["peak_gpu_mib"],
        ("2 Ray service", "worker peak GPU MiB"): p2["worker_peak_gpu_mib"],
        ("2 Ray service", "service peak GPU MiB"): p2["service_peak_gpu_mib"],
        ("3 evaluation", "peak GPU MiB"): p3["peak_gpu_mib"],
    }
    keys = ROWS + (GPU_ROWS if device.type == "cuda" else [])
    return [{"part": k[0], "figure": k[1], "value": values[k]} for k in keys]


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA GPU (torch.cuda.is_available() is False); "
              "run on a machine with a GPU or pass --device cpu", file=sys.stderr)
        return 2
    device = torch.device(a.device)
    s = TINY if a.tiny else FULL
    torch.set_num_threads(a.threads or (1 if a.tiny else max(1, os.cpu_count() or 1)))

    def say(text: str) -> None:
        print(text, flush=True)

    env = environment(device)
    say("gpu_check: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    say(f"setup{' (tiny)' if a.tiny else ''}: {s.channels}x{s.size}x{s.size}, {s.ipc * s.num_classes} images, "
        f"{s.spec}, E={s.epochs}, K={s.checkpoints}, refresh every {s.refresh}, lr_net {s.lr_net}, "
        f"student batch {s.student_batch}, B full")
    t0, took = time.time(), {}

    def timed(name: str, fn, *args):
        t = time.time()
        try:
            return fn(*args)
        finally:
            took[name] = time.time() - t

    parts = {"round": {p: timed(f"round_{p}", part_round, s, p, device, say) for p in ("fp32", "bf16")},
             "service": timed("service", part_service, s, device, a, say),
             "eval": timed("eval", part_eval, s, device, say)}
    rows = table(parts, device)
    say(f"\n| part | figure | value |\n|---|---|---:|")
    for r in rows:
        v = r["value"]
        say(f"| {r['part']} | {r['figure']} | {'–' if v is None else f'{v:.4g}'} |")
    say(f"total {time.time() - t0:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in took.items())
        + ", Ray's start and the workers' imports included)")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"environment": env, "setup": asdict(s), "tiny": a.tiny, "parts": parts,
                                     "part_seconds": took, "rows": rows}, indent=1))
    return 0


from ray import cloudpickle  # noqa: E402  (Ray's workers cannot import tools/: classes travel by value)

cloudpickle.register_pickle_by_value(bench_distill)
if __name__ != "__main__":   # imported: this module's task and actor bodies too
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

if __name__ == "__main__":
    sys.exit(main())
