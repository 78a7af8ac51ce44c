"""HMDC (paper 004) on tiny inputs: its parts against direct definitions, a few steps on digits,
bit-for-bit resumption, and the class-sharding seam (a partition of the classes = one joint update)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from raydd.config import from_dict
from raydd.config.hmdc import HMDCConfig
from raydd.errors import ConfigError
from raydd.io import load_tensors, save_tensors
from raydd.methods import RealImages, Setup
from raydd.methods.hmdc import ClassShard, HMDCGroup, init_packed
from raydd.methods.hmdc_pair import PairTrajectory, fresh_pair
from raydd.augment import cutmix
from raydd.methods.gbm import GradientBalance, channel_normalise, gbm_weights
from raydd.methods.hmdc_parts import augment, generator, kmeans, layerwise, nearest_distinct, pack, sse, unpack

torch.set_num_threads(1)
ALL_OPS = ["flip", "color", "crop", "scale", "rotate", "cutout"]
TINY = dict(model1="convnet:width=8", model2="vit_tiny:width=16,depth=2,heads=2", model_steps=2, ssd_steps=2,
            batch_real=16, batch_syn=8, reset_every=2, select_every=1, gbm_every=1, kmeans_iters=10)


def test_siamese_augmentation_gives_real_and_synthetic_the_same_transform():
    g = torch.Generator().manual_seed(0)
    real, syn = torch.randn(5, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    syn[1] = real[3]                                  # one image in both batches, at other positions
    boxes = []
    for seed in range(12):
        ops = ALL_OPS if seed % 2 else ["crop", "scale", "rotate"]   # every geometric op gets drawn
        a = augment(real, ops, generator(seed, "s"), shared=True)
        b = augment(syn, ops, generator(seed, "s"), shared=True)
        assert torch.allclose(a[3], b[1], atol=1e-6)
        # CutMix: λ and the box are shared (drawn before the batch-size dependent permutation)
        ka, kb = (torch.arange(1.0, n + 1).view(n, 1, 1, 1).expand(n, 1, 8, 8) for n in (5, 3))
        ma = (cutmix(ka, torch.eye(5), generator(seed, "c"))[0] != ka).any(0)
        mb = (cutmix(kb, torch.eye(3), generator(seed, "c"))[0] != kb).any(0)
        if ma.any() and mb.any():
            assert torch.equal(ma, mb)
            boxes.append(seed)
    assert boxes


def test_gradient_distance_is_the_sum_of_squared_differences_over_all_parameters():
    g = torch.Generator().manual_seed(1)
    a = [torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, generator=g), None, torch.randn(2, 5, generator=g)]
    b = [torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, generator=g), torch.randn(7),
         torch.randn(2, 5, generator=g)]
    keep = [0, 1, 3]
    want = ((torch.cat([a[i].flatten() for i in keep]) - torch.cat([b[i].flatten() for i in keep])) ** 2).sum()
    assert torch.allclose(sse(a, b), want)
    # DC's layer-wise option: 0 for equal gradients, biases ignored, 1 - cos per output row
    assert float(layerwise(a, a)) == pytest.approx(0.0, abs=1e-5)
    rows = torch.nn.functional.cosine_similarity(a[3], b[3], dim=1, eps=0)
    conv = torch.nn.functional.cosine_similarity(a[0].flatten(1), b[0].flatten(1), dim=1, eps=0)
    assert float(layerwise(a, b)) == pytest.approx(float((1 - rows).sum() + (1 - conv).sum()), rel=1e-4)


def test_gbm_weights_and_per_channel_linf_normalisation():
    assert torch.allclose(gbm_weights(torch.tensor([2.0, 1.0, 4.0])), torch.tensor([0.5, 1.0, 0.25]))
    g = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(2)) * torch.tensor([0.5, 30.0]).view(1, 2, 1, 1)
    n = channel_normalise(g)
    assert torch.allclose(n.abs().amax(dim=(2, 3)), torch.ones(3, 2), atol=1e-5)
    assert torch.allclose(n * g.abs().amax(dim=(2, 3), keepdim=True), g, atol=1e-4)   # only a rescale


def test_gradient_balance_over_classes_by_hand():
    """APM + MetaDD's balancer (distill.balance: gbm): per-class accumulators of each target's max |g|,
    sampled every `every` steps, weights min(A)/a_k per class, then the per-channel L-inf normalisation."""
    labels = torch.tensor([0, 0, 1])
    g_dd = torch.zeros(3, 1, 2, 2)
    g_dd[0, 0, 0, 0], g_dd[1, 0, 1, 1], g_dd[2, 0, 0, 1] = 4.0, -2.0, 1.0    # class maxima 4 and 1
    g_aux = torch.zeros(3, 1, 2, 2)
    g_aux[0, 0, 1, 0], g_aux[1, 0, 0, 0], g_aux[2, 0, 1, 1] = 1.0, -0.5, 3.0  # class maxima 1 and 3
    gbm = GradientBalance(num_classes=3, targets=2, every=2)
    out, w = gbm.balance([g_dd, g_aux], labels, step=0)
    eps = 1e-6
    # class 0: A = (4, 1) -> w = (1/4, 1); class 1: A = (1, 3) -> w = (1, 1/3); class 2 absent: w = (1, 1)
    assert torch.allclose(gbm.acc, torch.tensor([[4 + eps, 1 + eps], [1 + eps, 3 + eps], [eps, eps]]))
    assert torch.allclose(w, torch.tensor([[0.25, 1.0], [1.0, 1 / 3], [1.0, 1.0]]), atol=1e-5)
    combined = torch.stack([0.25 * g_dd[0] + g_aux[0], 0.25 * g_dd[1] + g_aux[1], g_dd[2] + g_aux[2] / 3])
    assert torch.allclose(out, combined / (combined.abs().amax(dim=(2, 3), keepdim=True) + eps), atol=1e-6)
    gbm.balance([g_dd, g_aux], labels, step=1)           # not a sampling step: the accumulator stays
    assert torch.allclose(gbm.acc[0], torch.tensor([4 + eps, 1 + eps]))
    gbm.balance([g_dd, 2 * g_aux], labels, step=2)      # sampled again: the maxima add up
    assert torch.allclose(gbm.acc[0], torch.tensor([8 + eps, 3 + eps]))
    with pytest.raises(ValueError, match="2 targets"):
        gbm.balance([g_dd], labels, step=3)


def test_multi_formation_packs_and_decodes_factor_squared_images():
    x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 2, 8, 8).contiguous()   # constant images
    packed = pack(x, 2)
    assert packed.shape == (2, 2, 8, 8)
    assert float(packed[0, 0, 0, 4]) == 2.0 and float(packed[1, 0, 7, 7]) == 7.0    # chunk k -> tile k
    dec = unpack(packed, 2)
    assert dec.shape == (8, 2, 8, 8) and torch.allclose(dec, x, atol=1e-5)   # order kept
    y = torch.randn(4, 1, 8, 8)
    assert unpack(pack(y, 2), 2).shape == (4, 1, 8, 8)


def test_kmeans_initialisation_picks_one_real_image_per_cluster():
    g = torch.Generator().manual_seed(3)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    pts = torch.cat([c + 0.1 * torch.randn(30, 2, generator=g) for c in centres])
    pick = nearest_distinct(pts, kmeans(pts, 4, torch.Generator().manual_seed(0)))
    assert sorted((pick // 30).tolist()) == [0, 1, 2, 3]                       # one per cluster
    # factor 1: the initial images are exactly distinct real images of their class
    cfg = HMDCConfig(**{**TINY, "factor": 1})
    real = {c: torch.randn(20, 1, 8, 8, generator=g) for c in range(3)}
    init = init_packed(cfg, real, 2, (1, 3, 8), seed=0, device="cpu")
    assert init.shape == (6, 1, 8, 8)
    for c in range(3):
        hits = [int((real[c] == im).flatten(1).all(1).nonzero()[0]) for im in init[2 * c:2 * c + 2]]
        assert len(set(hits)) == 2


def test_ssd_tokens_and_projections_to_the_smallest_width():
    cfg = HMDCConfig(model1="convnet:width=16", model2="vit_tiny:width=24,depth=6,heads=2")
    pair = fresh_pair(cfg, (3, 10, 32), 0, "cpu")
    assert pair.taps1 == ["block1", "block2", "block3", "block3"]      # the official ConvNet's L = 4
    assert len(pair.taps2) == 6 and pair.ssd.size == 4                  # 32 px: ConvNet block3 is 4x4
    assert [(p.in_features, p.out_features) for p in pair.ssd.proj1] == [(16, 16)] * 4
    assert [(p.in_features, p.out_features) for p in pair.ssd.proj2] == [(24, 16)] * 6
    f1, f2 = pair.features(torch.randn(2, 3, 32, 32))
    t2 = pair.ssd.tokens(f2, pair.ssd.proj2, 4)
    assert pair.ssd.tokens(f1, pair.ssd.proj1, 4).shape == (2, 4, 17, 16)   # semantic + 4x4 spatial
    a, b = pair.ssd(f1, f2)
    assert a.shape == b.shape == (2, 4, 17, 16)
    assert torch.allclose(b, t2.mean(1, keepdim=True).expand_as(b) * 6 / 4, atol=1e-5)   # M = 0 at init


def tiny_real(classes: int = 10, n: int = 24, seed: int = 0) -> RealImages:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n)
    return RealImages(torch.randn(len(y), 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1) / classes, y, (0.5,), (0.5,))


def test_conv_layers_train_after_a_reset():
    real = tiny_real(3)
    traj = PairTrajectory(HMDCConfig(**TINY), (1, 3, 8), real.x, real.y, ALL_OPS[1:], seed=0, device="cpu")
    before = traj.models.net1.stages.block1[0].weight.detach().clone()
    traj.advance()                                        # step 1: trained on real data
    trained = traj.models.net1.stages.block1[0].weight.detach().clone()
    assert not torch.equal(before, trained)
    traj.advance()                                        # step 2: reset (reset_every=2), drawn afresh
    fresh = traj.models.net1.stages.block1[0].weight.detach().clone()
    assert not torch.equal(fresh, trained)
    held = {id(p) for group in traj.opt1.param_groups for p in group["params"]}
    assert held == {id(p) for p in traj.models.net1.parameters()}     # the official bug: it holds the old ones
    traj.advance()
    assert not torch.equal(traj.models.net1.stages.block1[0].weight, fresh)


def hmdc_cfg(digits: str, **hmdc):
    return from_dict({"data": {"dir": digits, "dsa_strategy": "color_crop_cutout_scale_rotate"},
                      "distill": {"method": "hmdc", "ipc": 1, "lr_img": 0.01, "hmdc": {**TINY, **hmdc}}})


@pytest.fixture(scope="module")
def built(digits):
    from raydd.distillation.plan import DataShape
    from raydd.distillation.worker import build_method
    cfg = hmdc_cfg(digits)
    init = (torch.zeros(10, 1, 8, 8), torch.arange(10))
    return cfg, lambda: build_method(cfg, init, 5, DataShape(1, 10, 8))   # Setup.real from the worker


def test_steps_run_change_the_images_and_resume_bit_for_bit(built, tmp_path):
    cfg, make = built
    a = make()
    assert isinstance(a, HMDCGroup) and a.images.shape == (10, 1, 8, 8)
    x0 = a.images.clone()
    stats = a.step(None)
    assert set(stats) >= {"loss", "L1", "L2", "L3"} and all(stats[k] > 0 for k in ("L1", "L2", "L3"))
    assert (a.shard.gbm > 1e-6).all()                                   # GBM sampled at step 0
    split = stats["seconds"]   # the per-step cost split: every phase ran and was timed
    assert set(split) == {"clustering", "augment", "matching", "image_grad", "models", "ssd"}
    assert all(v > 0 for v in split.values()), split
    save_tensors(tmp_path / "state.safetensors", a.state_dict())
    a.step(None)
    assert not torch.equal(a.images, x0)
    lo, hi = a.lo.flatten()[0], a.hi.flatten()[0]
    assert float(a.images.min()) >= float(lo) and float(a.images.max()) <= float(hi)
    b = make()
    saved = load_tensors(tmp_path / "state.safetensors")
    assert any(k.startswith("adam.") for k in saved)                  # the SSD's Adam moments travel
    b.load_state_dict(saved)
    again = b.state_dict()
    assert set(again) == set(saved) and all(torch.equal(again[k], v) for k, v in saved.items())
    b.step(None)
    assert b.round == a.round == 2
    assert torch.equal(b.images, a.images) and torch.equal(b.shard.momentum, a.shard.momentum)
    dec, lab = a.decoded()
    assert dec.shape == (40, 1, 8, 8) and torch.bincount(lab).tolist() == [4] * 10


def test_class_sharded_image_update_equals_the_joint_one(built):
    cfg, make = built
    group = make()
    half = init_packed(cfg.distill.hmdc, {c: group.real_by_class[c] for c in range(5, 10)}, 1, (1, 10, 8),
                       seed=5, device="cpu")
    assert torch.equal(half, group.shard.images[5:])  # a shard initialises its classes alone
    group.trajectory.advance()                         # version 1: trained pair, no selection cached
    upd = group.updater()
    pair, t = group.trajectory.models, 1
    joint = group.shard.select(range(10))
    upd(joint, pair, t, group.real_by_class)
    parts = [group.shard.select(range(0, 5)), group.shard.select(range(5, 10))]
    for p in parts:
        upd(p, pair, t, {c: group.real_by_class[c] for c in p.classes})
    merged = ClassShard.merge(parts)
    assert merged.classes == list(range(10))
    for f in ("images", "momentum", "gbm", "real_idx"):
        assert torch.equal(getattr(merged, f), getattr(joint, f)), f
    assert not torch.equal(joint.images, group.shard.images)


def test_config_section_is_validated(digits):
    with pytest.raises(ConfigError, match=r"distill\.hmdc\.factor"):
        hmdc_cfg(digits, factor=0)
    with pytest.raises(ConfigError, match=r"distill\.hmdc\.model2"):
        hmdc_cfg(digits, model2="vit_huge")
    with pytest.raises(ConfigError, match="hmdc"):
        HMDCGroup.create(hmdc_cfg(digits).distill, torch.zeros(10, 1, 8, 8), torch.arange(10), seed=0,
                         setup=Setup(arch="convnet", in_channels=1, num_classes=10, image_size=8,
                                     dsa_strategy=None, real=None))
    assert dataclasses.asdict(HMDCConfig())["reset_every"] == 100


@pytest.mark.parametrize("variant", [dict(gbm=False), dict(md=False), dict(match="layerwise", cutmix=False)])
def test_ablations_and_the_layerwise_distance_update_the_images(variant):
    from raydd.methods.hmdc import ImageUpdate
    cfg = HMDCConfig(**{**TINY, **variant})
    real = tiny_real(3)
    by_class = {c: real.x[real.y == c] for c in range(3)}
    pair = fresh_pair(cfg, (1, 3, 8), 0, "cpu")
    images = init_packed(cfg, by_class, 1, (1, 3, 8), seed=0, device="cpu")
    shard = ClassShard([0, 1, 2], images.clone(), torch.zeros_like(images), torch.full((3, 3), 1e-6),
                       torch.full((3, cfg.batch_real), -1, dtype=torch.long))
    upd = ImageUpdate(cfg, seed=0, ops=ALL_OPS[1:], lr=0.01, momentum=0.5, lo=torch.tensor(-9.0),
                      hi=torch.tensor(9.0), num_classes=3)
    stats = upd(shard, pair, 0, by_class)
    assert ("L3" in stats and stats["L3"] > 0) is cfg.md
    assert torch.isfinite(shard.images).all() and not torch.equal(shard.images, images)
    used = shard.gbm[:, :3 if cfg.md else 2]
    assert bool((used > 1e-6).all()) is cfg.gbm                        # accumulated only with GBM


def test_random_baseline_of_a_packed_synset_gets_its_storage_budget(tmp_path, digits):
    """4 decoded images per class from 1 stored one: the random subset gets 1 real image per class."""
    import json

    from raydd.config import EvalConfig, Resources
    from raydd.data import load_info, sample_per_class
    from raydd.evaluate.sources import prepare_sources
    from raydd.synset import Synset, load_synset, save_synset
    x, y = sample_per_class(load_info(digits), "train", 4, seed=0)
    syn_dir = save_synset(tmp_path / "syn", Synset(x, y, meta={"num_classes": 10}))
    args = (digits, EvalConfig(modes=["hard"]), [0], ["random"], None, "")
    rest = (Resources(cpus=1), "cpu", False, None, None)
    plain = prepare_sources(syn_dir, *args, tmp_path / "plain", *rest)
    assert plain.ipc == 4
    manifest = json.loads((syn_dir / "manifest.json").read_text())
    manifest.setdefault("counts", {})["packing"] = {"per_stored": 4, "stored_per_class": 1,
                                                    "images_per_class": 4, "factor": 2}
    (syn_dir / "manifest.json").write_text(json.dumps(manifest))
    packed = prepare_sources(syn_dir, *args, tmp_path / "packed", *rest)
    assert packed.ipc == 1
    assert load_synset(packed.sources["random"]["synset"].format(seed=0)).labels.numel() == 10
    assert any("storage budget" in n for n in packed.notes)
