"""Teacher-pool throughput: the same teachers trained one at a time, then in parallel.

Each mode starts its own local Ray: ``serial`` with exactly the CPUs of one teacher task
(``teachers.resources.cpus``), ``parallel`` with ``ray.num_cpus`` of the config (all cores
when unset), so the only difference is how many teacher tasks run at once.

Defaults: configs/digits.yaml (prepared on the fly), 2 teachers per mode, scratch runs/bench-teachers.

    python tools/bench_teachers.py configs/fashion_mnist_ipc10.yaml --count 2 \\
        --set data.dir=/tmp/fashion-mnist --out /tmp/bench-teachers
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import ray

from raydd.config import load_config
from raydd.pipeline import ensure_data
from raydd.raycluster import init_ray
from raydd.teachers import train_teachers

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "digits.yaml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--count", type=int, default=2, help="teachers per mode")
    p.add_argument("--modes", default="serial,parallel")
    p.add_argument("--out", type=Path, default=Path("runs/bench-teachers"),
                   help="scratch directory (emptied first)")
    args = p.parse_args(argv)

    cfg = load_config(args.config, args.overrides + [f"teachers.count={args.count}"])
    ensure_data(cfg)  # the embedded digits are prepared on the fly, as by raydd run
    per_task = cfg.teachers.resources.cpus
    total = cfg.ray.num_cpus or os.cpu_count()
    shutil.rmtree(args.out, ignore_errors=True)
    summary = {"config": args.config, "overrides": args.overrides, "count": args.count,
               "teacher": {"arch": cfg.teachers.arch, "epochs": cfg.teachers.epochs, "lr": cfg.teachers.lr,
                           "batch_size": cfg.teachers.batch_size, "cpus": per_task,
                           "dsa": cfg.data.dsa_strategy if cfg.teachers.dsa else None},
               "modes": {}}
    for mode in args.modes.split(","):
        cfg.ray.num_cpus = math.ceil(per_task) if mode == "serial" else total
        init_ray(cfg.ray)
        load_before = os.getloadavg()[0]  # other users of the machine skew the comparison
        start = time.time()
        records = train_teachers(cfg, args.out / mode)
        wall = time.time() - start
        ray.shutdown()
        summary["modes"][mode] = {"ray_cpus": cfg.ray.num_cpus, "wall_s": round(wall, 1),
                                  "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                                  "test_acc": [round(r["test_acc"], 4) for r in records],
                                  "task_s": [r["train_seconds"] for r in records],
                                  # below 1.0: the task waited for a core (another process had it)
                                  "task_cpu_share": [round(r["cpu_seconds"] / r["train_seconds"], 2)
                                                     for r in records]}
        print(f"{mode}: {len(records)} teachers in {wall:.1f}s on {cfg.ray.num_cpus} CPUs; test accuracy "
              + ", ".join(f"{r['test_acc']:.2%}" for r in records), flush=True)
    modes = summary["modes"]
    if "serial" in modes and "parallel" in modes:
        summary["speedup"] = round(modes["serial"]["wall_s"] / modes["parallel"]["wall_s"], 2)
        print(f"speed-up of parallel over serial: {summary['speedup']}x", flush=True)
    json.dump(summary, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
