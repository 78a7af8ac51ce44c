"""The teacher service under many groups, in a simulated cluster (a benchmark, not a test).

A ``ray.cluster_utils.Cluster`` of ``--nodes`` logical nodes (they share this machine's cores) hosts
the teacher service (``raydd.services``, a randomly initialised ConvNet of the chosen shape: the
cost of a request does not depend on the weights) and G group clients, one Ray task each, spread
over the nodes. A client makes the requests an APM group makes (per segment the teacher's logits,
then the VJP; the soft labels on refresh rounds) with real tensors of a group's size, reports each
round to a progress board as the workers do, and *sleeps* for the round's own compute: student
training and the K checkpoints' image gradients, measured in-process at the start on one real
``APMGroup`` refresh cycle (or given as ``--student-s``/``--local-s``). So 16 groups are simulated on
2 cores without 16 groups' compute, while the service, its batching, the board and the driver run
for real.

Per G: each group's rounds/s against the round time it would have with an idle service (the
slowdown), requests per batch, the queueing delay (mean, p95), the service's busy fraction, the
driver's CPU share. Then the model: a group-round needs ``c`` service seconds (measured) every
``T`` seconds, so one replica is loaded ``rho = G c / T``; the queue grows without bound as rho
nears 1, so ``distill.service.replicas`` should be at least ``ceil(G c / (0.7 T))``.

    python tools/bench_scale.py                                   # FM shape, width 128, 4 nodes
    python tools/bench_scale.py --channels 3 --size 32 --groups 1,8,16 --replicas 2
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--ipc", type=int, default=10, help="images per class of one group")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--segment", type=int, default=None, help="images per request (default: the whole group)")
    p.add_argument("--epochs", type=int, default=50, help="E, for the measured student time")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--refresh", type=int, default=3)
    p.add_argument("--student-s", type=float, default=None, help="seconds of student training per refresh")
    p.add_argument("--local-s", type=float, default=None, help="seconds of a round's image step in the worker")
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--groups", default="1,4,8,16", help="comma-separated group counts")
    p.add_argument("--replicas", type=int, default=1, help="also run the largest G with this many replicas")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--service-cpus", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    return p.parse_args(argv)


def teacher_nets(spec: str, c: int, classes: int, size: int) -> list:
    import torch   # here, not the module's: Ray pickles this script's functions by value
    from raydd.models import build
    torch.manual_seed(0)
    return [build(spec, c, classes, size)]


def measure_round(a, spec: str) -> tuple[float, float, float]:
    """Student seconds per refresh, worker-side image seconds per round, service seconds per round."""
    from raydd.augment import DSA
    from raydd.config import DistillConfig
    from raydd.methods import Services
    from raydd.methods.apm import APMGroup
    from raydd.models import build
    from raydd.services import LocalService
    n = a.ipc * a.classes
    images = torch.randn(n, a.channels, a.size, a.size, generator=torch.Generator().manual_seed(0))
    cfg = DistillConfig(ipc=a.ipc, student_epochs=a.epochs, checkpoints=a.k, refresh_every=a.refresh,
                        segment=a.segment, lr_net=0.01)
    group = APMGroup(cfg, images, torch.arange(a.classes).repeat_interleave(a.ipc), student_spec=spec,
                     in_channels=a.channels, num_classes=a.classes, image_size=a.size, seed=0, dsa=DSA(),
                     build_model=lambda s: build(s, a.channels, a.classes, a.size))
    services = Services(LocalService(teacher_nets(spec, a.channels, a.classes, a.size)))
    split = [group.step(services)["seconds"] for _ in range(a.refresh)]
    return (sum(s["student"] for s in split), sum(s["image"] for s in split) / len(split),
            sum(s["service"] for s in split) / len(split))


def client(handle, board, g: int, a, student_s: float, local_s: float) -> dict:
    import time

    import torch
    from raydd.services import RayService
    svc, n = RayService(handle), a.ipc * a.classes
    seg = a.segment or n
    x = torch.randn(n, a.channels, a.size, a.size, generator=torch.Generator().manual_seed(g))
    waited, t0 = 0.0, time.perf_counter()
    for r in range(a.rounds):
        if r % a.refresh == 0:
            t = time.perf_counter()
            for i in range(0, n, seg):
                svc.logits(x[i:i + seg], 0)
            waited += time.perf_counter() - t
            time.sleep(student_s)
        for i in range(0, n, seg):
            t = time.perf_counter()
            logits = svc.logits(x[i:i + seg], 0)
            waited += time.perf_counter() - t
            time.sleep(local_s * len(logits) / n)
            t = time.perf_counter()
            svc.input_grad(x[i:i + seg], torch.ones_like(logits), 0)
            waited += time.perf_counter() - t
        board.put.remote({"group": g, "round": r})
    return {"seconds": time.perf_counter() - t0, "service_wait_s": waited, "images": x}


def scenario(a, ray, spec: str, groups: int, replicas: int, student_s: float, local_s: float) -> dict:
    from raydd.config import Resources
    from raydd.distillation.runner import _Board
    from raydd.io import save_tensors
    from raydd.services import start_replicas
    source = functools.partial(teacher_nets, spec, a.channels, a.classes, a.size)
    handles = start_replicas(source, name=f"raydd-bench-scale-{groups}-{replicas}", replicas=replicas,
                             resources=Resources(cpus=a.service_cpus), max_restarts=0, device="cpu")
    warm = torch.zeros(a.segment or a.ipc * a.classes, a.channels, a.size, a.size).numpy()
    for h in handles:   # the first calls set torch up in the actor: not part of any round
        ray.get(h.input_grad.remote(warm, ray.get(h.logits.remote(warm, 0)), 0))
    before = ray.get([h.stats.remote() for h in handles])
    board = ray.remote(num_cpus=0)(_Board).remote()
    task = ray.remote(client).options(num_cpus=1, scheduling_strategy="SPREAD")
    t0, cpu0 = time.perf_counter(), time.process_time()
    refs = [task.remote(handles[g % replicas], board, g, a, student_s, local_s) for g in range(groups)]
    messages, pending = 0, list(refs)
    while pending:                      # the driver's loop, as the runner's: wait, then drain the board
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
        messages += len(ray.get(board.take.remote()))
    wall, driver_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    out = ray.get(refs)
    t = time.perf_counter()
    merged = torch.cat([o["images"] for o in out])          # the aggregator's merge and write
    save_tensors(Path(a.scratch) / f"merged-{groups}.safetensors", {"images": merged})
    merge_s = time.perf_counter() - t
    stats = ray.get([h.stats.remote() for h in handles])
    for h in handles + [board]:
        ray.kill(h, no_restart=True)
    rounds = groups * a.rounds

    def delta(key: str) -> float:
        return sum(s[key] - b[key] for s, b in zip(stats, before))
    compute, requests, batches = delta("compute_s"), delta("requests"), delta("batches")
    return {"groups": groups, "replicas": replicas, "wall_s": wall,
            "group_rounds_per_s": sum(a.rounds / o["seconds"] for o in out) / groups,
            "service_wait_s_per_round": sum(o["service_wait_s"] for o in out) / rounds,
            "requests_per_batch": requests / max(batches, 1),
            "queue_ms_mean": 1e3 * delta("queue_s") / max(requests, 1),
            "queue_ms_p95": max(s["queue_ms_p95"] for s in stats),
            "busy": compute / (wall * replicas), "service_s_per_round": compute / rounds,
            "driver_cpu_share": driver_cpu / wall, "board_messages": messages, "merge_s": merge_s}


def main(argv=None) -> int:
    a = parse(argv)
    import tempfile

    import ray
    from ray.cluster_utils import Cluster
    counts = [int(g) for g in a.groups.split(",") if g.strip()]
    if not counts or min(counts) < 1 or a.nodes < 1 or a.replicas < 1:
        print("bench_scale: --groups, --nodes and --replicas need positive integers", file=sys.stderr)
        return 2
    spec = f"convnet:width={a.width},depth=3"
    torch.set_num_threads(1)
    if a.student_s is None or a.local_s is None:
        student_s, local_s, service_s = measure_round(a, spec)
        print(f"measured in-process, one refresh cycle ({a.refresh} rounds): student training {student_s:.2f} s "
              f"per refresh, image step {local_s:.2f} s + teacher calls {service_s:.2f} s per round", flush=True)
    student_s = a.student_s if a.student_s is not None else student_s
    local_s = a.local_s if a.local_s is not None else local_s
    per = math.ceil(max(counts) / a.nodes)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": math.ceil(a.service_cpus * a.replicas)})
    for _ in range(a.nodes):
        cluster.add_node(num_cpus=per)
    a.scratch = tempfile.mkdtemp(prefix="raydd-bench-scale-")
    rows = []
    try:
        ray.init(address=cluster.address, logging_level="ERROR")
        cluster.wait_for_nodes()
        print(f"cluster: head (the service) + {a.nodes} nodes of {per} CPUs; {a.channels}x{a.size}x{a.size}, "
              f"{a.ipc * a.classes} images per group, ConvNet width {a.width}, segment {a.segment or 'full'}, "
              f"{a.rounds} rounds per group\n\n| groups | replicas | group rounds/s (idle-service rate) | "
              "service wait s/round | requests/batch | queue ms mean / p95 | service busy | driver CPU | "
              "merge s |\n|---:|---:|---|---:|---:|---|---:|---:|---:|", flush=True)
        plan = [(g, 1) for g in counts] + ([(max(counts), a.replicas)] if a.replicas > 1 else [])
        for groups, replicas in plan:
            row = scenario(a, ray, spec, groups, replicas, student_s, local_s)
            c = row["service_s_per_round"]
            idle = 1 / (student_s / a.refresh + local_s + c)
            row["idle_rounds_per_s"] = idle
            rows.append(row)
            print(f"| {groups} | {replicas} | {row['group_rounds_per_s']:.3f} ({idle:.3f}) | "
                  f"{row['service_wait_s_per_round']:.2f} | {row['requests_per_batch']:.2f} | "
                  f"{row['queue_ms_mean']:.0f} / {row['queue_ms_p95']:.0f} | {row['busy']:.0%} | "
                  f"{row['driver_cpu_share']:.1%} | {row['merge_s']:.3f} |", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    c = sum(r["service_s_per_round"] for r in rows) / len(rows)
    t_round = student_s / a.refresh + local_s + c
    print(f"\nservice seconds per group-round c = {c:.3f} s, round time T = {t_round:.2f} s: one replica is loaded "
          f"rho = G x {c / t_round:.3f}; replicas >= ceil(G c / (0.7 T)) keeps rho <= 0.7, i.e. one replica "
          f"per {max(1, math.floor(0.7 * t_round / c))} groups at this shape", flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows,
                                     "student_s": student_s, "local_s": local_s, "c": c, "T": t_round}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
