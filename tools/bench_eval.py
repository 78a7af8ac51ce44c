"""Test-set pass and training step (fp32 and bf16 autocast) of evaluation architectures on CPU.

Times a forward pass over ``--images`` test-sized images in eval mode, once in PyTorch's default
(contiguous) layout and once channels-last (what :func:`raydd.train.channels_last_pays` picks on CPU
for training and testing nets without GroupNorm or LayerNorm), and a training step on a 100-image batch (IPC 10 × 10 classes: one step per
epoch) in fp32 and under bf16 autocast (``evaluate.precision: bf16``). Best of ``--repeats`` after
a warm-up; both layouts are timed back to back, for the training step too.

    python tools/bench_eval.py resnet18 vgg11 convnet:width=32 --shape 1,28,28
"""
from __future__ import annotations

import argparse
import time

import torch

from raydd.models import build
from raydd.train import autocast, set_threads

DEFAULT_ARCHS = ("convnet:width=32", "resnet18", "vgg11", "alexnet", "mobilenetv2", "vit_tiny")


def _seconds(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN picks its kernels on the first call
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_gflops(dtype: torch.dtype, n: int = 1024) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n ** 3 / _seconds(lambda: a @ b, 20) / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("archs", nargs="*", default=list(DEFAULT_ARCHS),
                   help=f"architecture specs (default: {' '.join(DEFAULT_ARCHS)}, the README's table)")
    p.add_argument("--shape", default="1,28,28", help="C,H,W")
    p.add_argument("--images", type=int, default=1024, help="test images per forward pass")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true",
                   help="also time the fp32 training step of torch.compile(net) (its first call, which "
                        "compiles, is reported apart)")
    p.add_argument("--flops", action="store_true",
                   help="also print each training step's GFLOP (3x the forward's convolutions and matmuls, "
                        "torch's counter) and rate beside this CPU's fp32 and bf16 matmul rate at --threads: how far from the limit")
    args = p.parse_args(argv)
    set_threads(args.threads)   # as a trial does: threads, and freed memory kept for reuse
    if args.flops:
        peak = {d: max(matmul_gflops(d) for _ in range(3)) for d in (torch.float32, torch.bfloat16)}
        print(f"matmul 1024x1024, {args.threads} thread(s): fp32 {peak[torch.float32]:.0f} GFLOP/s, "
              f"bf16 {peak[torch.bfloat16]:.0f} GFLOP/s\n")
    c, h, w = (int(v) for v in args.shape.split(","))
    x = torch.randn(args.images, c, h, w)
    xb, yb = torch.randn(100, c, h, w), torch.randint(0, 10, (100,))
    print("| architecture | test pass, contiguous (s) | channels-last (s) | speed-up | train step fp32 (s) "
          "| bf16 autocast (s) | speed-up | channels-last fp32 (s) | channels-last bf16 (s) | speed-up of both |"
          + (" compiled fp32 (s) | speed-up | compiling (s) |" if args.compile else "")
          + (" GFLOP/step | fp32 GFLOP/s (of matmul) | channels-last bf16 GFLOP/s (of matmul) |" if args.flops else ""))
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if args.compile else "")
          + ("---|---|---|" if args.flops else ""))
    for arch in args.archs:
        torch.manual_seed(0)
        net = build(arch, c, 10, h)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

        def step(precision, x=xb, model=net):
            with autocast("cpu", precision):
                loss = torch.nn.functional.cross_entropy(model(x).float(), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()

        train = _seconds(lambda: step("fp32"), args.repeats)
        train16 = _seconds(lambda: step("bf16"), args.repeats)
        net.to(memory_format=torch.channels_last)
        xbc = xb.contiguous(memory_format=torch.channels_last)
        train_cl = _seconds(lambda: step("fp32", xbc), args.repeats)
        train16_cl = _seconds(lambda: step("bf16", xbc), args.repeats)
        net.to(memory_format=torch.contiguous_format)
        compiled = ""
        if args.compile:
            cnet = torch.compile(net)
            t0 = time.perf_counter()
            step("fp32", model=cnet)
            first = time.perf_counter() - t0
            train_c = _seconds(lambda: step("fp32", model=cnet), args.repeats)
            compiled = f" {train_c:.3f} | {train / train_c:.2f}× | {first:.0f} |"
        rates = ""
        if args.flops:
            from torch.utils.flop_counter import FlopCounterMode
            with FlopCounterMode(display=False) as fc, torch.no_grad():
                net(xb)
            # a step is ~3 forwards (the backward's input and weight products); torch's counter itself
            # counts a grouped convolution's backward `groups` times over (MobileNetV2's depthwise ones)
            g = 3 * fc.get_total_flops() / 1e9
            rates = (f" {g:.2f} | {g / train:.0f} ({g / train / peak[torch.float32]:.0%}) "
                     f"| {g / train16_cl:.0f} ({g / train16_cl / peak[torch.bfloat16]:.0%}) |")
        net.eval()
        with torch.no_grad():
            plain = _seconds(lambda: net(x), args.repeats)
            net.to(memory_format=torch.channels_last)
            xc = x.contiguous(memory_format=torch.channels_last)
            last = _seconds(lambda: net(xc), args.repeats)
        print(f"| {arch} | {plain:.2f} | {last:.2f} | {plain / last:.2f}× | {train:.3f} | {train16:.3f} "
              f"| {train / train16:.2f}× | {train_cl:.3f} | {train16_cl:.3f} | {train / train16_cl:.2f}× |{compiled}{rates}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
