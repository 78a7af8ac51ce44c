"""Stacked evaluation trials (``evaluate.stack``) against the same trials trained one after another.

For each architecture: S soft-label trials (seeds 0..S-1, each on its own random set of IPC x 10
images) by ``evaluate_once`` one after another, then the same S as one wide net by
``evaluate_stacked``, in one process on ``--threads`` threads; prints both times, their ratio and
how far the members' final losses and test accuracies are from their lone runs. Random data: the
work per trial does not depend on it. A warm-up trial first, so neither side pays the first call.

    python tools/bench_stack.py convnet:width=16 convnet_bn:width=16 mlp lenet --shape 1,8,8 --ipc 2 --epochs 300
    python tools/bench_stack.py convnet:width=32 resnet18 --shape 1,28,28 --ipc 10 --epochs 20
"""
from __future__ import annotations

import argparse
import time

import torch

from raydd.config import EvalConfig
from raydd.evaluate.protocol import evaluate_once
from raydd.evaluate.stacked import evaluate_stacked
from raydd.synset import Synset
from raydd.train import set_threads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("archs", nargs="+")
    p.add_argument("--shape", default="1,8,8", help="C,H,W")
    p.add_argument("--ipc", type=int, default=2)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--stack", type=int, default=4, help="trials per stack (S)")
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--strategy", default="color_crop_cutout_flip_scale_rotate")
    a = p.parse_args(argv)
    set_threads(a.threads)
    C, H, W = (int(v) for v in a.shape.split(","))
    g = torch.Generator().manual_seed(0)
    n = a.ipc * 10
    sets = [Synset(torch.randn(n, C, H, W, generator=g), torch.arange(10).repeat_interleave(a.ipc),
                   soft_labels=torch.randn(n, 10, generator=g), meta={"num_classes": 10}) for _ in range(a.stack)]
    tx, ty = torch.randn(a.test_images, C, H, W, generator=g), torch.randint(10, (a.test_images,), generator=g)

    def tests():
        return [(tx[i:i + 500], ty[i:i + 500]) for i in range(0, a.test_images, 500)]

    print(f"{a.stack} soft trials of {n} images {C}x{H}x{W}, {a.epochs} epochs, {a.threads} thread(s), "
          f"{a.test_images} test images\n")
    print("| architecture | one after another (s) | stacked (s) | speed-up | max loss diff | max acc diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for arch in a.archs:
        ecfg = EvalConfig(archs=[arch], epochs=a.epochs, lr=0.05, soft_loss="kl", soft_temperature=4.0)
        kw = dict(image_shape=(C, H, W), num_classes=10, dsa_strategy=a.strategy)
        evaluate_once(arch, "soft", 0, sets[0], tests, ecfg, epochs=2, **kw)          # warm-up
        t0 = time.perf_counter()
        lone = [evaluate_once(arch, "soft", s, sets[s], tests, ecfg, **kw) for s in range(a.stack)]
        t1 = time.perf_counter()
        stacked = evaluate_stacked(arch, "soft", list(range(a.stack)), sets, tests, ecfg, **kw)
        t2 = time.perf_counter()
        dl = max(abs(x["train_loss_last"] - y["train_loss_last"]) for x, y in zip(lone, stacked))
        da = max(abs(x["test_acc"] - y["test_acc"]) for x, y in zip(lone, stacked))
        print(f"| {arch} | {t1 - t0:.2f} | {t2 - t1:.2f} | {(t1 - t0) / (t2 - t1):.2f}x | {dl:.1e} | {da:.3f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
