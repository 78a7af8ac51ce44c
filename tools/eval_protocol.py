"""Evaluate a synset with raydd's evaluator under APM's protocol and print mean ± std over seeds.

APM's evaluation (distill.py / template.sh of the official code): a fresh net trained on the synset
with L1 to the stored soft labels (teacher logits), SGD 0.9 / 5e-4, batch 256, DSA, lr ×0.1 at half.

    python tools/eval_protocol.py RUN/synset --data data/digits --arch convnet --epochs 1000 \\
        --lr 0.05 --seeds 3

``--data`` defaults to the dataset directory recorded in the synset's manifest (relative paths are
taken from the current directory, as ``raydd run`` wrote them); the DSA strategy defaults to the
run's ``data.dsa_strategy``. The std is the population std (numpy's default), as the field reports it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from raydd.config import EvalConfig  # noqa: E402
from raydd.data import batches, load_info  # noqa: E402
from raydd.evaluate.protocol import evaluate_once  # noqa: E402
from raydd.synset import load_synset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("synset", help="synset directory (synset.safetensors + manifest.json)")
    p.add_argument("--data", help="prepared dataset directory (default: the one in the manifest)")
    p.add_argument("--arch", default="convnet")
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1")
    p.add_argument("--mode", default="soft", choices=["soft", "hard"])
    p.add_argument("--soft-loss", default="l1", choices=["l1", "kl"])
    p.add_argument("--dsa-strategy", help="default: the run's data.dsa_strategy")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    syn = load_synset(a.synset)
    config = syn.meta.get("config", {})
    data = a.data or syn.meta.get("dataset", {}).get("dir")
    if not data:
        p.error("the manifest names no dataset directory; pass --data")
    strategy = a.dsa_strategy or config.get("data", {}).get("dsa_strategy") or "color_crop_cutout_flip_scale_rotate"
    info = load_info(data)
    ecfg = EvalConfig(epochs=a.epochs, lr=a.lr, soft_loss=a.soft_loss)
    test = lambda: batches(info, "test", 1000)  # noqa: E731
    accs = []
    for seed in range(a.seeds):
        t0 = time.time()
        r = evaluate_once(a.arch, a.mode, seed, syn, test, ecfg, image_shape=tuple(info.shape),
                          num_classes=info.num_classes, dsa_strategy=strategy)
        accs.append(100 * r["test_acc"])
        print(f"seed {seed}: {accs[-1]:.2f} % ({time.time() - t0:.0f} s)", flush=True)
    std = statistics.pstdev(accs) if len(accs) > 1 else 0.0
    print(f"{a.arch} {a.mode}/{a.soft_loss} on {a.synset}: {statistics.mean(accs):.2f} ± {std:.2f} % "
          f"({a.seeds} seeds, {a.epochs} epochs, lr {a.lr}, DSA {strategy})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
