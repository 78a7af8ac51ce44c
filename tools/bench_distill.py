"""Distillation throughput and cost, measured in one run (a benchmark, not a test).

  service overhead  rounds/s of one group with its teachers in-process vs behind the Ray service actor
  parallel groups   total rounds/s of 2 groups as parallel Ray tasks vs 1 group alone
  round split       seconds per round in student training, image update and service calls
  student GFLOP/s   achieved by student training vs this machine's fp32 matmul GFLOP/s, same threads
  peak memory       of one image update with the whole group as one segment vs segments of 10

Defaults: configs/digits.yaml with 2 quickly trained teachers (a few minutes on 2 cores).
Bigger: pass another config and flags, e.g.

    python tools/bench_distill.py configs/fashion_mnist_ipc10.yaml --set data.dir=/data/fmnist \\
        --rounds 30 --mem-ipc 50 --out /tmp/bench-distill
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from raydd.config import Config, RayConfig, load_config
from raydd.distillation import DataShape, build_method, initial_images, plan_groups
from raydd.methods import Services

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "digits.yaml"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--rounds", type=int, default=30, help="timed rounds per measurement (after 1 warm-up)")
    p.add_argument("--teachers", type=int, default=2, help="teachers.count for the benchmark's pool")
    p.add_argument("--teacher-epochs", type=int, default=5)
    p.add_argument("--mem-ipc", type=int, default=50, help="images per class for the memory measurement")
    p.add_argument("--mem-segment", type=int, default=10)
    p.add_argument("--matmul-n", type=int, default=1024)
    p.add_argument("--out", type=Path, default=Path("runs/bench-distill"),
                   help="scratch run directory (teachers are kept and reused)")
    p.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)  # internal: 'full' or a segment
    return p.parse_args(argv)


def config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides + [f"teachers.count={args.teachers}",
                                                      f"teachers.epochs={args.teacher_epochs}"])


def group(cfg: Config, info, seed: int, init):
    return build_method(cfg, init, seed, DataShape(info.in_channels, info.num_classes, info.image_size))


def timed_rounds(g, service, rounds: int, ready=None) -> dict:
    """One warm-up round (imports, first student), then ``rounds`` timed ones.

    ``ready``: called after the warm-up; it returns when every parallel group is warm."""
    services = Services(service)
    g.step(services)
    if ready is not None:
        ready()
    stats, t0 = [], time.time()
    for _ in range(rounds):
        stats.append(g.step(services))
    t1 = time.time()
    split = {k: sum(s["seconds"][k] for s in stats) / rounds for k in ("student", "image", "service")}
    return {"start": t0, "end": t1, "rounds": rounds, "rate": rounds / (t1 - t0), "split": split,
            "refreshes": sum(bool(s["refreshed"]) for s in stats),
            "student_s": sum(s["seconds"]["student"] for s in stats)}


class Barrier:
    """Parallel groups start their timed rounds together, after every worker is warm."""

    def __init__(self, parties: int):
        self.parties, self.arrived = parties, 0

    def arrive(self) -> None:
        self.arrived += 1

    def open(self) -> bool:
        return self.arrived >= self.parties


def _group_task(cfg: Config, info, seed: int, init, handle, rounds: int, barrier) -> dict:
    import ray

    from raydd.services import RayService
    from raydd.train import set_threads

    def ready() -> None:
        ray.get(barrier.arrive.remote())
        while not ray.get(barrier.open.remote()):
            time.sleep(0.01)

    set_threads(cfg.distill.resources.cpus)
    return timed_rounds(group(cfg, info, seed, init), RayService(handle), rounds, ready)


def matmul_gflops(n: int, threads: int) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        a @ b
        reps += 1
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def student_flops(cfg: Config, info, init, service) -> int:
    """FLOPs (convolutions and matmuls, forward + backward) of one student refresh."""
    from torch.utils.flop_counter import FlopCounterMode

    from raydd.methods.apm import train_student
    from raydd.augment import DSA
    from raydd.models import build
    torch.manual_seed(0)
    student = build(cfg.distill.arch or cfg.teachers.arch, info.in_channels, info.num_classes, info.image_size)
    u = init[0]
    n = min(cfg.distill.batch_size or len(u), len(u))
    with FlopCounterMode(display=False) as fc:
        train_student(student, u[:n], service.logits(u[:n], 0), epochs=cfg.distill.student_epochs,
                      checkpoints=cfg.distill.checkpoints, lr=cfg.distill.lr_net, batch=cfg.distill.student_batch,
                      dsa=DSA(cfg.data.dsa_strategy) if cfg.distill.dsa else None,
                      generator=torch.Generator().manual_seed(0))
    return fc.get_total_flops()


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def probe_memory(args: argparse.Namespace) -> None:
    """Child process: peak RSS growth of one image-update round (teachers in-process)."""
    from raydd.data import load_info
    from raydd.services import LocalService
    from raydd.teachers import load_teachers
    torch.set_num_threads(1)
    cfg = config(args)
    cfg.distill.ipc, cfg.distill.groups = args.mem_ipc, 1
    cfg.distill.segment = None if args.probe_memory == "full" else int(args.probe_memory)
    info = load_info(cfg.data.dir)
    service = LocalService(load_teachers(args.out)[0])
    plan = plan_groups(cfg, args.out)[0]
    g = group(cfg, info, plan.seed, initial_images(cfg, info, [plan])[plan.index])
    g.step(Services(service))                         # round 0 trains the student
    Path("/proc/self/clear_refs").write_text("5")     # reset the peak (VmHWM) to the current RSS
    base = _status_kb("VmRSS")
    stats = g.step(Services(service))                 # an image update without a refresh
    print(json.dumps({"peak_mb": (_status_kb("VmHWM") - base) / 1024, "refreshed": stats["refreshed"],
                      "images": len(g.images)}))


def measure_memory(args: argparse.Namespace, which: str) -> dict:
    # Page-sized mmap threshold: every tensor buffer is its own mapping, returned to the OS when
    # freed, so RSS follows the tensors instead of glibc's reused heap.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "4096"}
    argv = [sys.executable, __file__, args.config, *sum((["--set", o] for o in args.overrides), []),
            "--teachers", str(args.teachers), "--teacher-epochs", str(args.teacher_epochs),
            "--mem-ipc", str(args.mem_ipc), "--out", str(args.out), "--probe-memory", which]
    res = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.probe_memory:
        probe_memory(args)
        return 0
    import ray

    from raydd.data import load_info
    from raydd.pipeline import ensure_data
    from raydd.raycluster import init_ray
    from raydd.services import LocalService, RayService, start_service
    from raydd.teachers import load_teachers, train_teachers

    cfg = config(args)
    cfg.distill.rounds = args.rounds + 1
    ensure_data(cfg)
    info = load_info(cfg.data.dir)
    res, svc = cfg.distill.resources, cfg.distill.service
    threads = max(1, int(res.cpus))
    # Logical CPUs for 2 group tasks and the service at once; they share the physical cores.
    init_ray(RayConfig(num_cpus=math.ceil(2 * res.cpus + svc.resources.cpus)))
    train_teachers(cfg, args.out, progress=False)
    models, _ = load_teachers(args.out)
    plans = plan_groups(cfg, args.out)
    inits = initial_images(cfg, info, plans)
    shape = DataShape(info.in_channels, info.num_classes, info.image_size)
    print(f"[bench] {cfg.data.source} {shape}, student {cfg.distill.arch or cfg.teachers.arch}, "
          f"{plans[0].ipc} img/class/group, E={cfg.distill.student_epochs}, K={cfg.distill.checkpoints}, "
          f"refresh every {cfg.distill.refresh_every}, {args.rounds} timed rounds, {threads} thread(s)/group, "
          f"{os.cpu_count()} cores", flush=True)

    torch.set_num_threads(threads)
    local = timed_rounds(group(cfg, info, plans[0].seed, inits[0]), LocalService(models), args.rounds)
    handle = start_service(args.out, name="raydd-bench-teachers", resources=svc.resources,
                           max_batch=svc.max_batch, max_restarts=0, device="cpu")
    remote = timed_rounds(group(cfg, info, plans[0].seed, inits[0]), RayService(handle), args.rounds)

    task = ray.remote(_group_task).options(num_cpus=res.cpus)
    barrier = ray.remote(num_cpus=0)(Barrier)
    one = ray.get(task.remote(cfg, info, plans[0].seed, inits[0], handle, args.rounds, barrier.remote(1)))
    pair = barrier.remote(2)
    two = ray.get([task.remote(cfg, info, p.seed, inits[p.index], handle, args.rounds, pair) for p in plans[:2]])
    ray.kill(handle)
    pair_rate = sum(t["rounds"] for t in two) / (max(t["end"] for t in two) - min(t["start"] for t in two))

    flops = student_flops(cfg, info, inits[0], LocalService(models))
    per_refresh_s = local["student_s"] / max(local["refreshes"], 1)
    student_gflops = flops / per_refresh_s / 1e9
    mm = matmul_gflops(args.matmul_n, threads)
    mem_full = measure_memory(args, "full")
    mem_seg = measure_memory(args, str(args.mem_segment))

    s = local["split"]
    total = sum(s.values())
    summary = {
        "rounds_per_s": {"in_process": local["rate"], "ray_service": remote["rate"],
                         "overhead_ratio": local["rate"] / remote["rate"]},
        "parallel": {"one_group": one["rate"], "two_groups": pair_rate, "ratio": pair_rate / one["rate"]},
        "seconds_per_round": {"in_process": s, "ray_service": remote["split"]},
        "student": {"gflop_per_refresh": flops / 1e9, "seconds_per_refresh": per_refresh_s,
                    "gflops": student_gflops, "matmul_gflops": mm, "ratio": student_gflops / mm},
        "memory_mb": {"full": mem_full, f"segment_{args.mem_segment}": mem_seg,
                      "ratio": mem_full["peak_mb"] / max(mem_seg["peak_mb"], 1e-9)},
    }
    print(f"service overhead  {local['rate']:.2f} rounds/s in-process vs {remote['rate']:.2f} through the Ray "
          f"service = {summary['rounds_per_s']['overhead_ratio']:.2f}x")
    print(f"parallel groups   {pair_rate:.2f} rounds/s with 2 groups vs {one['rate']:.2f} with 1 = "
          f"{summary['parallel']['ratio']:.2f}x on {os.cpu_count()} cores")
    print("round split       " + ", ".join(f"{k} {v * 1e3:.1f} ms ({v / total:.0%})" for k, v in s.items())
          + " in-process; through Ray: "
          + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in remote["split"].items()))
    print(f"student training  {student_gflops:.2f} GFLOP/s ({flops / 1e9:.3f} GFLOP per refresh in "
          f"{per_refresh_s:.2f}s) vs fp32 matmul {mm:.1f} GFLOP/s ({threads} thread) = "
          f"{summary['student']['ratio']:.1%}")
    print(f"peak memory       {mem_full['peak_mb']:.1f} MB for one segment of {mem_full['images']} images vs "
          f"{mem_seg['peak_mb']:.1f} MB in segments of {args.mem_segment} = {summary['memory_mb']['ratio']:.1f}x")
    json.dump(summary, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
