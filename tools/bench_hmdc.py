"""HMDC image steps per second: the single-process group vs the Ray pair actor with 1 and 2 class
shards, on a local Ray and (``--cluster``) in a ``ray.cluster_utils.Cluster`` of two logical nodes.

    nice -n 19 python tools/bench_hmdc.py --rounds 6            # configs/digits_hmdc.yaml's models

The digits are prepared into a temporary directory (another ``--config``'s data.dir is used as it
is). The single-process run also prints the per-step cost split: k-means selection, siamese
augmentation with CutMix, gradient matching (MD's terms included), the image gradient with GBM,
and the pair's model and SSD training. A Ray run's rate is over its steady state:
(rounds - 1) steps between the first and the last step's end, over all shards (worker start-up
and the first step excluded), the single-process rate likewise.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def config(args, data: str, shards: int):
    from raydd.config import load_config
    return load_config(args.config, [f"data.dir={data}", f"distill.rounds={args.rounds}",
                                     f"distill.checkpoint_every={args.rounds + 1}",
                                     f"distill.hmdc.shards={shards}", "distill.resources.cpus=1"])


def single(args, data: str, out: Path) -> float:
    from raydd.data import load_info
    from raydd.distillation.plan import DataShape, plan_groups
    from raydd.distillation.worker import build_method
    torch.set_num_threads(1)
    cfg = config(args, data, 1)
    info = load_info(data)
    shape = DataShape(info.in_channels, info.num_classes, info.image_size)
    plan = plan_groups(cfg, out)[0]
    init = (torch.zeros(plan.ipc * info.num_classes, *info.shape), torch.arange(info.num_classes).repeat_interleave(plan.ipc))
    group = build_method(cfg, init, plan.seed, shape)
    group.step(None)                 # as the Ray runs: the rate from the first step's end
    t0 = time.perf_counter()
    split: dict[str, float] = {}
    while group.round < plan.rounds:
        for k, v in group.step(None)["seconds"].items():
            split[k] = split.get(k, 0.0) + v
    total = sum(split.values())
    print("single-process step split: " + ", ".join(f"{k} {v / (plan.rounds - 1):.3f} s ({v / total:.0%})"
                                                    for k, v in split.items()), flush=True)
    return (plan.rounds - 1) / (time.perf_counter() - t0)


def sharded(args, data: str, out: Path, shards: int) -> float:
    from raydd.data import load_info
    from raydd.distillation.hmdc_ray import distill_sharded
    from raydd.distillation.plan import DataShape, plan_groups
    cfg = config(args, data, shards)
    info = load_info(data)
    plan = plan_groups(cfg, out)[0]
    res = distill_sharded(cfg, plan, DataShape(info.in_channels, info.num_classes, info.image_size))
    firsts = [d[0] for d in res["done_at"]]
    lasts = [d[-1] for d in res["done_at"]]
    return (plan.rounds - 1) / (max(lasts) - max(firsts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/digits_hmdc.yaml")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--cluster", action="store_true", help="also in a Cluster of two logical nodes (1 CPU each)")
    ap.add_argument("--single-only", action="store_true", help="only the single-process rate and split")
    args = ap.parse_args()
    import ray

    from raydd.config import load_config
    from raydd.data import prepare
    tmp = Path(tempfile.mkdtemp(prefix="bench_hmdc_"))
    base = load_config(args.config).data
    data = base.dir
    if base.source == "digits":
        data = str(tmp / "digits")
        prepare("digits", data, workers=1)
    rates = {"single-process": single(args, data, tmp / "single")}
    if args.single_only:
        print(json.dumps({"rounds": args.rounds, "steps_per_s": rates}, indent=1))
        return
    ray.init(num_cpus=2, include_dashboard=False)
    for s in (1, 2):
        rates[f"local ray, {s} shard(s)"] = sharded(args, data, tmp / f"local{s}", s)
    ray.shutdown()
    if args.cluster:
        from ray.cluster_utils import Cluster
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address)
        for s in (1, 2):
            rates[f"cluster of 2 nodes, {s} shard(s)"] = sharded(args, data, tmp / f"cluster{s}", s)
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps({"rounds": args.rounds, "steps_per_s": {k: round(v, 4) for k, v in rates.items()}}, indent=1))


if __name__ == "__main__":
    main()
