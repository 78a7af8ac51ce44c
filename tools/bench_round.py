"""Seconds per APM round: raydd's ``APMGroup.step`` against the official loop's per-round work,
restated in plain PyTorch, and raydd with its speed levers switched on one at a time.

A benchmark, not a test. Every variant runs in its own process (the heap setting is per process),
in alternating blocks of ``--block`` rounds, so that load on the machine hits all of them alike;
a block starts at a student refresh and is timed after one warm-up cycle. The teacher is a
randomly initialised ConvNet and the images are random: the work per round does not depend on
either.

The restated official loop (``reference``), per round, as the fact sheet describes DD_APM's
``distill.py``: every ``refresh_every`` rounds a fresh student trains E + 1 epochs on the teacher's
logits (DSA per image, DataLoader batches, SGD 0.9 / 5e-4, ×0.1 after E/2 + 1) and is deep-copied
at K epochs; then for each of the K copies and each chunk of the mini-batch the teacher *and* the
copy run forward and backward (their parameters are not frozen, so their gradients are computed
too), then the teacher once more for the CE term, then one SGD step on the images. Torch's own
layers (``nn.AvgPool2d``, ``nn.GroupNorm``) and glibc's default heap.

    python tools/bench_round.py                                  # Fashion-MNIST shape, IPC 10
    python tools/bench_round.py --channels 3 --size 32 --ipc 50  # CIFAR shape
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = {  # name: (raydd?, levers)
    "reference": (False, ()),
    "raydd before": (True, ()),
    "raydd +pool": (True, ("pool",)),
    "raydd +pool +heap": (True, ("pool", "heap")),
    "raydd +pool +heap +bf16": (True, ("pool", "heap", "bf16")),
}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--epochs", type=int, default=50, help="E")
    p.add_argument("--k", type=int, default=5, help="K checkpoints")
    p.add_argument("--refresh", type=int, default=3, help="a fresh student every this many rounds")
    p.add_argument("--student-batch", type=int, default=256)
    p.add_argument("--block", type=int, default=6, help="timed rounds per block (a multiple of --refresh)")
    p.add_argument("--blocks", type=int, default=2, help="blocks per variant, alternating")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def dc_convnet(a) -> nn.Module:
    """The DC/APM ConvNet from torch's own layers: depth × [conv 3×3, GroupNorm(C, C), ReLU, AvgPool 2]."""
    pad = 3 if a.channels == 1 or a.size == 28 else 1
    layers, c, side = [], a.channels, a.size + 2 * pad - 2
    for d in range(a.depth):
        layers += [nn.Conv2d(c, a.width, 3, padding=pad if d == 0 else 1), nn.GroupNorm(a.width, a.width, affine=True),
                   nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)]
        c, side = a.width, side // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(a.width * side * side, a.classes))


class Reference:
    """The official per-round work, restated (see the module docstring)."""

    def __init__(self, a, images, labels, teacher):
        from raydd.augment import DSA
        self.a, self.teacher = a, teacher.eval()
        self.x = images.clone().requires_grad_(True)
        self.y = labels
        self.opt = torch.optim.SGD([self.x], lr=1.0, momentum=0.5)
        self.dsa, self.round, self.models = DSA(), 0, []

    def _train_student(self, targets):
        a = self.a
        net = dc_convnet(a)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [a.epochs // 2 + 1], gamma=0.1)
        data = torch.utils.data.TensorDataset(self.x.detach().clone(), targets)
        loader = torch.utils.data.DataLoader(data, batch_size=a.student_batch, shuffle=True)
        step = a.epochs // a.k
        save = list(range(step, a.epochs, step))[:a.k - 1] + [a.epochs]
        self.models = []
        for ep in range(a.epochs + 1):
            net.train()
            for img, lab in loader:
                out = net(self.dsa(img))
                loss = F.l1_loss(out, lab)
                opt.zero_grad()
                loss.backward()
                opt.step()
                (out.argmax(1) == lab.argmax(1)).sum().item()    # the official epoch's accuracy count
            if ep in save:
                self.models.append(copy.deepcopy(net))
            sched.step()

    def step(self) -> dict:
        t0 = time.perf_counter()
        if self.round % self.a.refresh == 0:
            self._train_student(self.teacher(self.x.detach()).detach())
        t1 = time.perf_counter()
        n, acc = len(self.x), torch.zeros_like(self.x)
        for m in self.models:
            m.eval()
            loss = -F.l1_loss(m(self.x), self.teacher(self.x))
            loss.backward()
            acc += self.x.grad
            self.x.grad.zero_()
        loss = 0.1 * F.cross_entropy(self.teacher(self.x), self.y)
        loss.backward()
        acc += self.x.grad
        self.x.grad = acc
        self.opt.step()
        self.opt.zero_grad()
        self.round += 1
        return {"student": t1 - t0, "image": time.perf_counter() - t1}


def raydd_group(a, images, labels, teacher, levers):
    from raydd.config import DistillConfig
    from raydd.methods.apm import APMGroup
    from raydd.augment import DSA
    from raydd.models import build
    if "pool" not in levers:   # torch's own kernel, as before the fast path
        from raydd.models import layers
        layers.AvgPool2x2.forward = lambda self, x: F.avg_pool2d(x, 2, 2)
    cfg = DistillConfig(ipc=a.ipc, student_epochs=a.epochs, checkpoints=a.k, refresh_every=a.refresh, lr_net=0.01,
                        student_batch=a.student_batch, precision="bf16" if "bf16" in levers else "fp32")
    spec = f"convnet:width={a.width},depth={a.depth}"
    group = APMGroup(cfg, images, labels, student_spec=spec, in_channels=a.channels, num_classes=a.classes,
                     image_size=a.size, seed=0, dsa=DSA(),
                     build_model=lambda s: build(s, a.channels, a.classes, a.size))
    from raydd.methods import Services
    from raydd.services import LocalService
    services = Services(LocalService([teacher]))

    def step() -> dict:
        s = group.step(services)["seconds"]
        return {"student": s["student"], "image": s["image"] + s["service"], "teacher": s["service"]}
    return step


def child(a) -> None:
    name = a.child
    is_raydd, levers = VARIANTS[name]
    os.environ["RAYDD_KEEP_HEAP"] = "1" if "heap" in levers else "0"
    torch.set_num_threads(a.threads)
    if "heap" in levers:
        from raydd.train import keep_freed_memory
        assert keep_freed_memory(), "glibc's mallopt was not applied"
    g = torch.Generator().manual_seed(0)
    n = a.ipc * a.classes
    images = torch.randn(n, a.channels, a.size, a.size, generator=g)
    labels = torch.arange(a.classes).repeat_interleave(a.ipc)
    torch.manual_seed(0)
    teacher = dc_convnet(a)
    if is_raydd:
        from raydd.models import build
        torch.manual_seed(0)
        teacher = build(f"convnet:width={a.width},depth={a.depth}", a.channels, a.classes, a.size)
        step = raydd_group(a, images, labels, teacher, levers)
    else:
        step = Reference(a, images, labels, teacher).step
    for _ in range(a.refresh):   # warm-up cycle: imports, allocator, first student
        step()
    rounds = [step() for _ in range(a.block)]
    print(json.dumps({"rounds": rounds}))


def main(argv=None) -> int:
    a = parse(argv)
    if a.child:
        child(a)
        return 0
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        print(f"bench_round: unknown variant {bad[0]!r}; expected one of {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if a.block % a.refresh:
        print(f"bench_round: --block {a.block} must be a multiple of --refresh {a.refresh}", file=sys.stderr)
        return 2
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                   if k not in ("variants", "out", "child", "blocks")]
    results: dict[str, list[dict]] = {n: [] for n in names}
    print(f"APM round, {a.channels}x{a.size}x{a.size}, IPC {a.ipc} ({a.ipc * a.classes} images, full batch), "
          f"ConvNet width {a.width} depth {a.depth}, E={a.epochs}, K={a.k}, refresh every {a.refresh}, "
          f"DSA, {a.threads} threads; {a.blocks} alternating blocks of {a.block} rounds", flush=True)
    for b in range(a.blocks):
        for n in names:
            t0 = time.time()
            res = subprocess.run([sys.executable, __file__, *passthrough, "--child", n],
                                 capture_output=True, text=True)
            if res.returncode:
                print(res.stderr[-2000:], file=sys.stderr)
                return 1
            rounds = json.loads(res.stdout.strip().splitlines()[-1])["rounds"]
            results[n] += rounds
            per = sum(r["student"] + r["image"] for r in rounds) / len(rounds)
            print(f"  block {b + 1} {n:<26} {per:7.2f} s/round   ({time.time() - t0:.0f} s with start-up)", flush=True)
    ref = results.get("reference")
    ref_s = sum(r["student"] + r["image"] for r in ref) / len(ref) if ref else None
    rows = []
    print("\n| variant | s/round | student training | image step (teacher calls) | vs reference |\n"
          "|---|---:|---:|---:|---:|")
    for n, rounds in results.items():
        m = len(rounds)
        st, im = sum(r["student"] for r in rounds) / m, sum(r["image"] for r in rounds) / m
        te = sum(r["teacher"] for r in rounds) / m if "teacher" in rounds[0] else None
        ratio = f"{ref_s / (st + im):.2f}×" if ref_s else "–"
        rows.append({"variant": n, "s_per_round": st + im, "student_s": st, "image_s": im, "teacher_s": te,
                     "speedup_vs_reference": ref_s / (st + im) if ref_s else None, "rounds": m})
        print(f"| {n} | {st + im:.2f} | {st:.2f} | {im:.2f}" + (f" ({te:.2f})" if te is not None else "")
              + f" | {ratio} |")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
