"""APM against explicit autograd references on tiny nets (1×8×8 images, 3 classes)."""
from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import raydd.models
from raydd.distillation.init import init_images
from raydd.methods import Services
from raydd.methods.apm import APMGroup, NonFiniteImages, checkpoint_epochs, image_loss_and_grad, train_student
from raydd.config import DistillConfig, PoolConfig
from raydd.errors import DataError
from raydd.io import load_tensors, save_tensors
from raydd.methods.pool import sample_student_spec
from raydd.services import LocalService

torch.set_num_threads(1)


def teacher_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(256, 3))


def student_net(spec: str = "tiny") -> nn.Module:
    # BatchNorm: eval-mode checkpoints must carry their running statistics.
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(),
                         nn.Flatten(), nn.Linear(256, 3))


def data(n: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(3, (n,), generator=g)


def service() -> LocalService:
    return LocalService([teacher_net(1), teacher_net(2)])


def trained_student(u, svc, teacher=1, epochs=4, k=2, double=False):
    torch.manual_seed(3)
    student = student_net().double() if double else student_net()
    ckpts = train_student(student, u, svc.logits(u, teacher), epochs=epochs, checkpoints=k, lr=0.05,
                          batch=8, generator=torch.Generator().manual_seed(0))
    return student, ckpts


def reference(u, y, student, ckpts, teacher, distance, objective, alpha):
    """Eq. 4 written out directly, teacher and students in one autograd graph."""
    u = u.clone().requires_grad_(True)
    t = teacher(u)
    loss = alpha * F.cross_entropy(t, y)
    for state in ckpts:
        net = copy.deepcopy(student)
        net.load_state_dict(state)
        s = net.eval()(u)
        if distance == "l1":
            d = (s - t).abs().mean(1)
        elif distance == "l2":
            d = ((s - t) ** 2).mean(1)
        else:
            d = 1 - (s * t).sum(1) / (s.norm(dim=1) * t.norm(dim=1))
        loss = loss + (-d.mean() if objective == "linear" else -torch.log(d).mean())
    loss.backward()
    return loss.item(), u.grad


@pytest.mark.parametrize("objective", ["linear", "log"])
@pytest.mark.parametrize("distance", ["l1", "l2", "cosine"])
def test_image_grad_matches_end_to_end_autograd(distance, objective):
    # float64: 1 − cos is small here, and float32 cancellation would blur the comparison.
    u, y = data()
    u = u.double()
    svc = LocalService([teacher_net(1).double(), teacher_net(2).double()])
    student, ckpts = trained_student(u, svc, double=True)
    loss, grad = image_loss_and_grad(u, y, student, ckpts, svc, 1, distance=distance,
                                     objective=objective, alpha=0.3, segment=None)
    ref_loss, ref_grad = reference(u, y, student, ckpts, svc.models[1], distance, objective, 0.3)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    assert torch.allclose(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert grad.abs().sum() > 0


def test_segments_give_the_same_gradient():
    u, y = data()
    svc = service()
    student, ckpts = trained_student(u, svc)
    results = [image_loss_and_grad(u, y, student, ckpts, svc, 0, distance="l1", objective="log",
                                   alpha=0.1, segment=s) for s in (1, 7, None)]
    for loss, grad in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-6)
        assert torch.allclose(grad, results[0][1], rtol=1e-5, atol=1e-8)


def test_teacher_runs_once_per_segment():
    u, y = data(20)
    calls = {"logits": 0, "input_grad": 0}
    svc = service()

    class Counting:
        num_models = svc.num_models

        def logits(self, x, model):
            calls["logits"] += 1
            return svc.logits(x, model)

        def input_grad(self, x, g, model):
            calls["input_grad"] += 1
            return svc.input_grad(x, g, model)

    student, ckpts = trained_student(u, svc, epochs=6, k=3)
    image_loss_and_grad(u, y, student, ckpts, Counting(), 0, segment=7)
    assert calls == {"logits": 3, "input_grad": 3}  # ceil(20/7) segments, K=3 checkpoints


class CountingStudent(nn.Module):
    """Counts its training forwards in a buffer, so every stored state says when it was taken."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
        self.register_buffer("forwards", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.forwards += 1
        return self.net(x)


@pytest.mark.parametrize("epochs,k,expected", [(10, 5, [2, 4, 6, 8, 10]), (10, 3, [3, 6, 9]),
                                               (10, 4, [2, 4, 6, 8]), (250, 5, [50, 100, 150, 200, 250])])
def test_checkpoint_epochs(epochs, k, expected):
    assert checkpoint_epochs(epochs, k) == expected


def test_checkpoints_taken_at_the_right_epochs():
    u, _ = data(12)
    targets = teacher_net(1)(u).detach()
    torch.manual_seed(5)
    student = CountingStudent()
    init = copy.deepcopy(student)
    ckpts = train_student(student, u, targets, epochs=10, checkpoints=5, lr=0.1, batch=64)
    # One inner batch per epoch, so the forward count is the epoch.
    assert [int(c["forwards"]) for c in ckpts] == [2, 4, 6, 8, 10]
    # Independent re-run of the recipe: SGD 0.9 / 5e-4, L1 to the targets, lr ×0.1 after E/2.
    opt = torch.optim.SGD(init.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for e in range(1, 11):
        opt.param_groups[0]["lr"] = 0.1 if e <= 5 else 0.01
        opt.zero_grad()
        F.l1_loss(init(u), targets).backward()
        opt.step()
        if e % 2 == 0:
            for name, value in init.state_dict().items():
                assert torch.allclose(ckpts[e // 2 - 1][name].float(), value.float(), atol=1e-6), (e, name)


def test_student_trains_on_augmented_images_against_unaugmented_targets():
    u, _ = data(10)
    svc = service()
    seen = []

    def dsa(x, generator=None):
        seen.append(x)
        return x + 100.0

    class Recording(LocalService):
        def logits(self, x, model):
            assert x.abs().max() < 50, "teacher targets must come from the un-augmented images"
            return super().logits(x, model)

    cfg = DistillConfig(ipc=1, rounds=2, student_epochs=3, checkpoints=1, student_batch=4, dsa=True)
    group = APMGroup(cfg, u, torch.zeros(10, dtype=torch.long), student_spec="tiny", in_channels=1,
                     num_classes=3, image_size=8, seed=0, dsa=dsa, build_model=student_net)
    group.step(Services(Recording(svc.models)))
    assert len(seen) == 3 * 3  # 3 epochs × ceil(10/4) inner batches


def make_group(cfg, seed=0, n=20, builds=None):
    u, y = data(n)

    def build(spec):
        if builds is not None:
            builds.append(spec)
        return student_net(spec)

    return APMGroup(cfg, u, y, student_spec="tiny", in_channels=1, num_classes=3, image_size=8,
                    seed=seed, build_model=build)


def small_cfg(**kw):
    base = dict(ipc=1, rounds=8, student_epochs=4, checkpoints=2, student_batch=8, refresh_every=3,
                lr_net=0.05, lr_img=0.5)
    return DistillConfig(**{**base, **kw})


def test_refresh_period_honoured():
    builds = []
    group = make_group(small_cfg(), builds=builds)
    svc = service()
    refreshed, ckpt_ids = [], []
    for _ in range(8):
        out = group.step(Services(svc))
        refreshed.append(out["refreshed"])
        ckpt_ids.append(id(group.checkpoints))
    assert [r for r, f in enumerate(refreshed) if f] == [0, 3, 6]
    assert len(builds) == 3
    assert len(set(ckpt_ids)) == 3 and ckpt_ids[0] == ckpt_ids[2] != ckpt_ids[3]
    assert set(out["seconds"]) == {"student", "image", "service"}
    assert all(v >= 0 for v in out["seconds"].values())


def test_image_step_is_sgd_with_momentum_and_decay():
    cfg = small_cfg(rounds=2, lr_img=0.5, momentum_img=0.5, lr_img_decay=0.3, lr_img_decay_at=0.5)
    group = make_group(cfg)
    svc = service()
    u0 = group.images.clone()
    group.step(Services(svc))
    _, g0 = image_loss_and_grad(u0, group.labels, group.student, group.checkpoints, svc, group.teacher,
                                distance=cfg.distance, objective=cfg.objective, alpha=cfg.alpha)
    assert torch.allclose(group.images, u0 - 0.5 * g0, atol=1e-6)
    u1 = group.images.clone()
    group.step(Services(svc))  # round 1 >= 0.5 * 2 rounds: decayed lr, same student
    _, g1 = image_loss_and_grad(u1, group.labels, group.student, group.checkpoints, svc, group.teacher,
                                distance=cfg.distance, objective=cfg.objective, alpha=cfg.alpha)
    assert torch.allclose(group.images, u1 - 0.15 * (0.5 * g0 + g1), atol=1e-6)


@pytest.mark.parametrize("batch_size", [None, 9])
def test_segment_size_does_not_change_the_update(batch_size):
    svc = service()
    finals = []
    for seg in (1, 7, None):
        group = make_group(small_cfg(segment=seg, batch_size=batch_size), seed=4)
        for _ in range(4):
            group.step(Services(svc))
        finals.append(group.images)
    assert not torch.equal(finals[0], make_group(small_cfg(), seed=4).images)
    for f in finals[1:]:
        assert torch.allclose(f, finals[0], rtol=1e-4, atol=1e-5)


def test_minibatch_momentum_coasts_like_torch_sgd():
    """As torch SGD over the whole image tensor (the official code): images outside the mini-batch
    get no gradient but keep moving on their momentum."""
    group = make_group(small_cfg(batch_size=5, lr_img=0.5, momentum_img=0.5, lr_img_decay_at=1.0))
    svc = service()
    u0 = group.images.clone()
    group.step(Services(svc))
    first = (group.images != u0).flatten(1).any(1)
    assert int(first.sum()) == 5                       # round 0: only its mini-batch has a gradient
    buf, u1 = group.momentum.clone(), group.images.clone()
    torch.testing.assert_close(u0 - u1, 0.5 * buf)
    group.step(Services(svc))
    drawn = (group.momentum != 0.5 * buf).flatten(1).any(1)   # round 1's mini-batch
    assert int(drawn.sum()) == 5
    coasting = first & ~drawn
    assert coasting.any()
    torch.testing.assert_close(u1[coasting] - group.images[coasting], 0.5 * 0.5 * buf[coasting])
    untouched = ~first & ~drawn
    assert torch.equal(group.images[untouched], u0[untouched])


def test_resume_from_state_dict_is_exact(tmp_path):
    svc = service()
    straight = make_group(small_cfg(batch_size=12), seed=7)
    for _ in range(6):
        straight.step(Services(svc))
    first = make_group(small_cfg(batch_size=12), seed=7)
    for _ in range(2):  # stop mid refresh period: the student of round 0 is still in use
        first.step(Services(svc))
    save_tensors(tmp_path / "group.safetensors", first.state_dict())
    resumed = make_group(small_cfg(batch_size=12), seed=99)  # wrong seed: the state must override it
    resumed.load_state_dict(load_tensors(tmp_path / "group.safetensors"))
    assert resumed.round == 2
    outs = [resumed.step(Services(svc)) for _ in range(4)]
    assert [o["refreshed"] for o in outs] == [False, True, False, False]
    assert torch.equal(resumed.images, straight.images)


def test_non_finite_gradient_raises_and_leaves_images():
    class Broken(LocalService):
        def logits(self, x, model):
            return super().logits(x, model) * float("nan")

    group = make_group(small_cfg())
    before = group.images.clone()
    with pytest.raises(NonFiniteImages):
        group.step(Services(Broken(service().models)))
    assert torch.equal(group.images, before)


def test_init_images_real_and_noise():
    x = torch.arange(30.0).view(30, 1, 1, 1).expand(30, 1, 8, 8).contiguous()
    y = torch.arange(30) % 3
    u, labels = init_images(x, y, 4, "real", torch.Generator().manual_seed(0))
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(u[:, 0, 0, 0].long() % 3, labels)  # every image comes from its own class
    assert len(set(u[:, 0, 0, 0].tolist())) == 12  # no repeats
    noise, labels = init_images(x, y, 2, "noise", torch.Generator().manual_seed(0))
    assert noise.shape == (6, 1, 8, 8) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(DataError, match="class 0 has 10"):
        init_images(x, y, 11, "real")


def fake_variant(spec, *, activation=None, norm=None, pool=None):
    return f"{spec}|{activation}|{norm}|{pool}"


@pytest.mark.parametrize("rng", [random.Random(0), torch.Generator().manual_seed(0)])
def test_pool_sampling_frequencies(monkeypatch, rng):
    monkeypatch.setattr(raydd.models, "variant", fake_variant, raising=False)
    cfg = PoolConfig(p_main=0.7)
    draws = [sample_student_spec("convnet", cfg, rng) for _ in range(10_000)]
    variants = [d.split("|") for d in draws if d != "convnet"]
    assert abs(1 - len(variants) / 10_000 - 0.7) < 0.02  # 4σ ≈ 0.018
    for pos, options in ((1, cfg.activations), (2, cfg.norms), (3, cfg.pools)):
        for opt in options:
            share = sum(v[pos] == opt for v in variants) / len(variants)
            assert abs(share - 1 / len(options)) < 0.04, (opt, share)
    assert {sample_student_spec("convnet", PoolConfig(p_main=1.0), rng) for _ in range(200)} == {"convnet"}


def test_group_with_the_model_zoo_dsa_and_pool():
    """The default builder, real DSA and every default pool variant of a ConvNet."""
    from raydd.augment import DSA
    from raydd.models import build

    cfg = small_cfg(rounds=4, refresh_every=1, segment=5, pool=PoolConfig(p_main=0.0))
    spec = "convnet:width=8"
    for act in cfg.pool.activations:  # every variant the pool can draw builds and runs
        for norm in cfg.pool.norms:
            for pool in cfg.pool.pools:
                net = build(raydd.models.variant(spec, activation=act, norm=norm, pool=pool), 1, 3, 8)
                assert net(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    torch.manual_seed(0)
    svc = LocalService([build(spec, 1, 3, 8) for _ in range(2)])
    u, y = data(12)
    group = APMGroup(cfg, u, y, student_spec=spec, in_channels=1, num_classes=3, image_size=8, seed=0,
                     dsa=DSA("color_crop_cutout_scale_rotate"))
    specs = [group.step(Services(svc))["student_spec"] for _ in range(4)]
    assert all(s != spec and s.startswith("convnet:") for s in specs)
    assert torch.isfinite(group.images).all() and not torch.equal(group.images, u)


def test_bf16_students_store_fp32_checkpoints_close_to_fp32_training():
    u, _ = data(12)
    svc = service()
    out = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(3)
        student = student_net()
        out[precision] = train_student(student, u, svc.logits(u, 1), epochs=6, checkpoints=2, lr=0.05, batch=8,
                                       generator=torch.Generator().manual_seed(0), precision=precision)
    for a, b in zip(out["fp32"], out["bf16"]):
        w32, w16 = a["1.weight"], b["1.weight"]   # the BatchNorm's affine weight
        assert w16.dtype == torch.float32 and b["0.weight"].dtype == torch.float32
        assert not torch.equal(a["0.weight"], b["0.weight"])          # bf16 arithmetic really ran
        assert torch.allclose(a["0.weight"], b["0.weight"], atol=0.05)  # and trains the same net
    cfg = DistillConfig(ipc=2, rounds=2, student_epochs=2, checkpoints=1, precision="bf16")
    g = APMGroup(cfg, *data(6), student_spec="tiny", in_channels=1, num_classes=3, image_size=8, seed=0,
                 build_model=lambda spec: student_net())
    stats = g.step(Services(svc))
    assert stats["refreshed"] and g.images.dtype == torch.float32 and torch.isfinite(g.images).all()
