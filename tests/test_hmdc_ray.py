"""HMDC's synset of decoded images, and HMDC across class shards on Ray (raydd/distillation/hmdc_ray.py):
a pair actor and two class-shard tasks give the single-process group's images bit for bit, also
after a resume from the shards' checkpoints; the actor stays a bounded window ahead."""
from __future__ import annotations

import time

import pytest
import torch

from raydd.config import from_dict
from raydd.errors import ConfigError
from raydd.io import load_tensors, read_json
from raydd.methods import method_class

TINY = dict(model1="convnet:width=8", model2="vit_tiny:width=16,depth=2,heads=2", model_steps=2, ssd_steps=2,
            batch_real=16, batch_syn=8, reset_every=3, select_every=1, gbm_every=2, kmeans_iters=10)
ROUNDS = 5


def cfg_for(digits: str, shards: int = 1, **distill):
    return from_dict({"data": {"dir": digits, "dsa_strategy": "color_crop_cutout_scale_rotate"},
                      "distill": {"method": "hmdc", "ipc": 1, "lr_img": 0.01, "rounds": ROUNDS,
                                  "checkpoint_every": 2, "resources": {"cpus": 0.5},
                                  "hmdc": {**TINY, "shards": shards}, **distill}})


def shape():
    from raydd.distillation.plan import DataShape
    return DataShape(1, 10, 8)


def single_process(cfg, plan):
    """The reference: the in-process HMDCGroup run to the last round."""
    from raydd.distillation.worker import build_method
    group = build_method(cfg, (torch.zeros(10, 1, 8, 8), torch.arange(10)), plan.seed, shape())
    while group.round < plan.rounds:
        group.step(None)
    return group


def test_hmdc_synset_holds_the_decoded_images_and_the_manifest_says_so(digits, tmp_path):
    from raydd.data import load_info
    from raydd.distillation.aggregate import aggregate
    from raydd.distillation.plan import plan_groups
    from raydd.distillation.worker import distill_group
    from raydd.models import build
    from raydd.services import LocalService

    cfg = cfg_for(digits, rounds=1)
    assert method_class("apm").synset_per_stored(cfg.distill) == 1          # APM: stored = synset
    assert method_class("hmdc").synset_per_stored(cfg.distill) == 4         # factor 2: 2x2 per stored image
    plans = plan_groups(cfg, tmp_path)
    out = distill_group(cfg, plans[0], (torch.zeros(10, 1, 8, 8), torch.arange(10)), None, shape())
    assert out["images"].shape == (40, 1, 8, 8) and torch.bincount(out["labels"]).tolist() == [4] * 10
    info = load_info(digits)
    service = LocalService([build("convnet:width=8", 1, 10, 8)])
    synset_dir, _ = aggregate(cfg, tmp_path, plans, service, [{"file": "t0"}], info, fingerprint_sha="fp")
    m = read_json(synset_dir / "manifest.json")
    assert m["counts"]["packing"] == {"per_stored": 4, "stored_per_class": 1, "images_per_class": 4, "factor": 2}
    assert m["counts"]["images"] == 40 and m["counts"]["per_group"] == [40]
    syn = load_tensors(synset_dir / "synset.safetensors")
    assert torch.bincount(syn["labels"]).tolist() == [4] * 10


def test_shards_partition_the_classes():
    from raydd.distillation.hmdc_ray import partition
    assert partition(10, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert partition(10, 1) == [list(range(10))]
    with pytest.raises(ConfigError, match=r"distill\.hmdc\.shards: 11"):
        partition(10, 11)
    with pytest.raises(ConfigError, match=r"distill\.hmdc\.shards"):
        cfg_for("unused", shards=0)


@pytest.mark.ray
@pytest.mark.slow
def test_two_shards_equal_the_single_process_group_bit_for_bit_and_after_a_resume(digits, ray_local, tmp_path):
    import ray

    from raydd.distillation.hmdc_ray import WINDOW, PairActor, distill_sharded, pair_path, shard_path
    from raydd.distillation.plan import plan_groups

    cfg = cfg_for(digits, shards=2)
    plan = plan_groups(cfg, tmp_path)[0]
    ref = single_process(cfg, plan)
    want_x, want_y = ref.decoded()

    got = distill_sharded(cfg, plan, shape())
    for f in ("images", "momentum", "gbm", "real_idx"):
        assert torch.equal(getattr(got["shard"], f), getattr(ref.shard, f)), f
    assert torch.equal(got["images"], want_x) and torch.equal(got["labels"], want_y)
    assert torch.equal(load_tensors(plan.final_path)["images"], want_x)

    # Stopped after its checkpoint at round 4: the shards and the actor resume from there.
    assert [int(load_tensors(shard_path(plan, k))["round"]) for k in (0, 1)] == [4, 4]
    assert pair_path(plan, 4).exists() and pair_path(plan, 2).exists()
    plan.final_path.unlink()
    again = distill_sharded(cfg, plan, shape())
    assert read_json(plan.progress_path)["starts"] == [0, 4]
    assert not pair_path(plan, 2).exists()                              # before the slowest shard: dropped
    assert torch.equal(again["images"], want_x)
    assert torch.equal(again["shard"].momentum, ref.shard.momentum)

    # The actor runs at most WINDOW versions ahead of a shard that does not come.
    long = plan_groups(cfg_for(digits, shards=2, rounds=40), tmp_path / "w")[0]
    actor = ray.remote(PairActor).options(num_cpus=0, max_concurrency=4).remote(
        cfg_for(digits, shards=2, rounds=40), long, shape(), {0: 0, 1: 0}, "cpu")
    ray.get(actor.version.remote(0, 0))
    deadline = time.monotonic() + 30
    while ray.get(actor.step.remote()) < WINDOW - 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)
    assert ray.get(actor.step.remote()) == WINDOW - 1
    ray.kill(actor)
