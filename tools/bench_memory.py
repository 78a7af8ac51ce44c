"""Peak memory of one distillation worker by segment size (a benchmark, not a test).

Each measurement runs in its own process: one APM group (``APMGroup``, teachers in-process) on
random images with a randomly initialised ConvNet teacher, as in tools/bench_round.py; the memory
of a round does not depend on the pixel values. After a warm-up cycle the process runs a round that
trains the student and updates the images, resets its peak (``/proc/self/clear_refs``), then runs a
round that only updates the images. Reported, in MB:

  worker   the process's peak RSS (interpreter, torch, data, student and teacher, all rounds)
  training the RSS growth over a round that trains the student (K checkpoints) and updates the images
  image    the RSS growth over the image-only round, the part the segment size bounds

``tensors``: with every buffer its own mapping (``MALLOC_MMAP_THRESHOLD_=4096``) so that RSS follows
the live tensors. The worker's peak also ``as run``: glibc's heap kept as raydd's workers keep it
(``raydd.train.keep_freed_memory``), where freed memory stays with the process (growth figures mean
nothing there).

    python tools/bench_memory.py                                # Fashion-MNIST and CIFAR shapes
    python tools/bench_memory.py --shapes 3x32:50:128 --segments 10,100,full
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

DEFAULT_SHAPES = "1x28:10:32,1x28:10:128,3x32:10:128,3x32:50:128"   # CxSIZE:IPC:WIDTH


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated CxSIZE:IPC:WIDTH, e.g. 3x32:50:128")
    p.add_argument("--segments", default="10,100,full", help="comma-separated segment sizes; full = the whole batch")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10, help="E (memory does not grow with it)")
    p.add_argument("--k", type=int, default=5, help="K checkpoints")
    p.add_argument("--student-batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)   # internal: SHAPE/SEGMENT
    return p.parse_args(argv)


def shape(text: str) -> tuple[int, int, int, int]:
    try:
        cs, ipc, width = text.split(":")
        c, s = cs.lower().split("x")
        out = int(c), int(s), int(ipc), int(width)
    except ValueError:
        raise SystemExit(f"bench_memory: shape {text!r} is not CxSIZE:IPC:WIDTH (e.g. 3x32:50:128)") from None
    if min(out) < 1:
        raise SystemExit(f"bench_memory: shape {text!r} needs positive numbers")
    return out


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(a) -> None:
    from raydd.config import DistillConfig
    from raydd.methods import Services
    from raydd.methods.apm import APMGroup
    from raydd.augment import DSA
    from raydd.models import build
    from raydd.services import LocalService
    from raydd.train import keep_freed_memory
    spec_text, seg_text = a.child.split("/")
    c, size, ipc, width = shape(spec_text)
    if os.environ.get("RAYDD_KEEP_HEAP") != "0":
        assert keep_freed_memory(), "glibc's mallopt was not applied"
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(ipc * a.classes, c, size, size, generator=g)
    labels = torch.arange(a.classes).repeat_interleave(ipc)
    spec = f"convnet:width={width},depth={a.depth}"
    torch.manual_seed(0)
    teacher = build(spec, c, a.classes, size)
    cfg = DistillConfig(ipc=ipc, student_epochs=a.epochs, checkpoints=a.k, refresh_every=2, lr_net=0.01,
                        student_batch=a.student_batch, segment=None if seg_text == "full" else int(seg_text))
    group = APMGroup(cfg, images, labels, student_spec=spec, in_channels=c, num_classes=a.classes,
                     image_size=size, seed=0, dsa=DSA(), build_model=lambda s: build(s, c, a.classes, size))
    services = Services(LocalService([teacher]))
    t0 = time.perf_counter()
    for _ in range(2):                                 # a warm-up cycle: torch's lazy set-up, the allocator
        group.step(services)
    worker = _status_mb("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")      # the peak (VmHWM) starts again at the current RSS
    base = _status_mb("VmRSS")
    assert group.step(services)["refreshed"]           # student training, then the images
    student, worker = _status_mb("VmHWM") - base, max(worker, _status_mb("VmHWM"))
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_mb("VmRSS")
    assert not group.step(services)["refreshed"]       # the images only
    print(json.dumps({"worker": max(worker, _status_mb("VmHWM")), "training": student,
                      "image": _status_mb("VmHWM") - base, "images": len(images),
                      "seconds": time.perf_counter() - t0}))


def measure(a, spec: str, seg: str, heap: bool) -> dict:
    env = {**os.environ, "RAYDD_KEEP_HEAP": "1" if heap else "0"}
    if not heap:
        env["MALLOC_MMAP_THRESHOLD_"] = "4096"
    argv = [sys.executable, __file__, *[f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                                        if k not in ("shapes", "segments", "out", "child")], "--child", f"{spec}/{seg}"]
    res = subprocess.run(argv, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"bench_memory: {spec} segment {seg} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    a = parse(argv)
    if a.child:
        child(a)
        return 0
    specs = [s.strip() for s in a.shapes.split(",") if s.strip()]
    segs = [s.strip() for s in a.segments.split(",") if s.strip()]
    for s in specs:
        shape(s)
    bad = [s for s in segs if s != "full" and not (s.isdigit() and int(s) > 0)]
    if bad:
        print(f"bench_memory: segment {bad[0]!r} is neither a positive integer nor 'full'", file=sys.stderr)
        return 2
    print(f"peak memory of one APM worker, ConvNet depth {a.depth}, E={a.epochs}, K={a.k}, student batch "
          f"{a.student_batch}, {a.threads} threads; MB\n\n"
          "| shape | IPC | width | segment | image step (tensors) | training round (tensors) | worker peak (tensors) | "
          "worker peak (as run) |\n|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    rows = []
    for spec in specs:
        c, size, ipc, width = shape(spec)
        n = ipc * a.classes
        for seg in segs:
            if seg != "full" and int(seg) > n:
                continue
            t, r = measure(a, spec, seg, heap=False), measure(a, spec, seg, heap=True)
            label = f"{seg} (= full)" if seg != "full" and int(seg) == n else seg
            rows.append({"shape": [c, size, size], "ipc": ipc, "width": width, "segment": seg, "images": n,
                         "tensors": t, "as_run": r})
            print(f"| {c}×{size}×{size} | {ipc} | {width} | {label} | {t['image']:.1f} | "
                  f"{t['training']:.1f} | {t['worker']:.0f} | {r['worker']:.0f} |", flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
