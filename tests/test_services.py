"""Model services: in-process VJP, and the Ray actor (gradients, coalescing, naming, restart)."""
from __future__ import annotations

import copy
import functools
import sys
import threading
import time

import numpy as np
import pytest
import ray
import torch
import torch.nn.functional as F
from torch import nn

import raydd.models
from raydd.methods.apm import image_loss_and_grad, train_student
from raydd.config import Resources
from raydd.errors import RayddError
from raydd.io import load_tensors, save_tensors
from raydd.services import LocalService, RayService, load_models, start_service

torch.set_num_threads(1)


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(256, 3))


def teachers_from(path: str, count: int) -> list[nn.Module]:
    """Runs inside the actor's __init__: weights come from disk, so a restart reloads them."""
    tensors = load_tensors(path)
    nets = []
    for i in range(count):
        net = tiny_net()
        net.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{i}.")})
        nets.append(net)
    return nets


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    torch.manual_seed(0)
    tensors = {f"{i}.{k}": v for i in range(2) for k, v in tiny_net().state_dict().items()}
    path = tmp_path_factory.mktemp("teachers") / "teachers.safetensors"
    save_tensors(path, tensors)
    return str(path)


@pytest.fixture(scope="module")
def local_teachers(teacher_file):
    return teachers_from(teacher_file, 2)


def batch(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(3, (n,), generator=g)


def test_local_service_matches_autograd(local_teachers):
    svc = LocalService(local_teachers)
    x, _ = batch()
    g = torch.randn(12, 3)
    assert svc.num_models == 2
    assert all(not p.requires_grad for m in svc.models for p in m.parameters())
    xx = x.clone().requires_grad_(True)
    out = local_teachers[1](xx)
    (ref,) = torch.autograd.grad((out * g).sum(), xx)
    assert torch.allclose(svc.input_grad(x, g, 1), ref, atol=1e-7)
    assert torch.allclose(svc.logits(x, 1), out.detach())
    assert torch.allclose(svc.features(x, "logits", 0), local_teachers[0](x))
    with pytest.raises(RayddError, match="out of range"):
        svc.logits(x, 2)


def test_load_models_from_records(monkeypatch, tmp_path):
    torch.manual_seed(1)
    net = tiny_net()
    sha = save_tensors(tmp_path / "t.safetensors", net.state_dict())
    built = []

    def build(spec, in_channels, num_classes, image_size):
        built.append((spec, in_channels, num_classes, image_size))
        return tiny_net()

    monkeypatch.setattr(raydd.models, "build", build, raising=False)
    path = str(tmp_path / "t.safetensors")
    nets = load_models([("tiny", 1, 3, 8, path, sha),
                        {"spec": "tiny", "in_channels": 1, "num_classes": 3, "image_size": 8, "path": path}])
    assert built == [("tiny", 1, 3, 8)] * 2
    x, _ = batch(4)
    for n in nets:
        assert torch.equal(n(x), net(x))
    with pytest.raises(RayddError, match="checksum"):
        load_models([("tiny", 1, 3, 8, path, "0" * 64)])


def test_load_models_from_a_teachers_directory(tmp_path):
    from raydd.io import write_json
    from raydd.models import build

    torch.manual_seed(0)
    net = build("convnet:width=8", 1, 3, 8)
    sha = save_tensors(tmp_path / "teachers" / "teacher-000.safetensors", net.state_dict())
    write_json(tmp_path / "teachers" / "teachers.json", {"teachers": [
        {"index": 0, "file": "teacher-000.safetensors", "spec": net.spec, "shape": [1, 8, 8],
         "num_classes": 3, "sha256": sha}]})
    x, _ = batch(4)
    for where in (tmp_path, tmp_path / "teachers"):  # RUN or RUN/teachers
        (loaded,) = load_models(str(where))
        assert torch.allclose(loaded.eval()(x), net.eval()(x))
    svc = LocalService(load_models(tmp_path))
    assert svc.features(x, "embedding", 0).shape == (4, 8)


# ------------------------------------------------------------------------------------------ Ray

@pytest.fixture(scope="module")
def ray_service(teacher_file):
    """One service actor for the module (each actor is a process start on a busy machine); the
    20 ms coalescing window makes the batching test deterministic."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # This test module is not importable in Ray workers: ship its functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield start(teacher_file)
    ray.shutdown()


def start(teacher_file):
    return start_service(functools.partial(teachers_from, teacher_file, 2), name="raydd-test-service",
                         resources=Resources(cpus=0.5), max_batch=64, max_restarts=2, device="cpu",
                         window_s=0.02)


@pytest.mark.ray
def test_ray_service_gives_the_end_to_end_gradient(ray_service, local_teachers):
    svc = RayService(ray_service)
    assert svc.num_models == 2
    u, y = batch(10)
    torch.manual_seed(2)
    student = tiny_net()
    ckpts = train_student(student, u, local_teachers[1](u).detach(), epochs=4, checkpoints=2,
                          lr=0.05, batch=5)
    loss, grad = image_loss_and_grad(u, y, student, ckpts, svc, 1, distance="l1", objective="linear",
                                     alpha=0.1, segment=4)
    # Plain autograd: teacher and student checkpoints in one graph.
    uu = u.clone().requires_grad_(True)
    t = local_teachers[1](uu)
    ref = 0.1 * F.cross_entropy(t, y)
    for state in ckpts:
        net = copy.deepcopy(student)
        net.load_state_dict(state)
        ref = ref - (net.eval()(uu) - t).abs().mean()
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(grad, uu.grad, rtol=1e-4, atol=1e-7)
    assert torch.allclose(svc.features(u, "logits", 0), local_teachers[0](u).detach(), atol=1e-6)


@pytest.mark.ray
def test_concurrent_requests_are_coalesced(ray_service, local_teachers):
    svc = RayService(ray_service)
    before = svc.stats()
    x, _ = batch(40)
    results = {}

    def caller(c):  # each caller sends its requests at once, then waits for all of them
        refs = [svc.handle.logits.remote(x[c * 10 + i:c * 10 + i + 1].numpy(), c % 2) for i in range(10)]
        results[c] = [torch.from_numpy(np.array(ray.get(r))) for r in refs]

    threads = [threading.Thread(target=caller, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in range(4):
        expect = local_teachers[c % 2](x[c * 10:c * 10 + 10]).detach()
        assert torch.allclose(torch.cat(results[c]), expect, atol=1e-6)
    after = svc.stats()
    assert after["requests"] - before["requests"] == 40 and after["images"] - before["images"] == 40
    assert after["batches"] - before["batches"] < 40
    # How batching keeps up: requests per batch, the measured wait before a batch, a busy fraction.
    assert after["requests_per_batch"] == pytest.approx(after["requests"] / after["batches"])
    assert after["queue_ms_mean"] > 0 and after["queue_ms_p95"] > 0 and 0 < after["busy"] <= 1
    assert after["memory"]["rss_mb"] > 100   # the actor's own peak RSS, with torch and its teachers loaded


@pytest.mark.ray
def test_named_service_is_shared_and_survives_a_restart(ray_service, teacher_file, local_teachers):
    first = RayService(ray_service)
    x, _ = batch(6)
    before = first.logits(x, 0)
    served = first.stats()["requests"]
    second = start(teacher_file)  # same name: the running actor, not a new one
    assert second._actor_id == ray_service._actor_id
    assert RayService(second).stats()["requests"] == served

    pid = first.stats()["pid"]
    ray.kill(ray_service, no_restart=False)
    deadline = time.time() + 60
    while first.stats()["pid"] == pid:  # calls are retried while it restarts
        assert time.time() < deadline, "the service did not restart"
        time.sleep(0.2)
    after = first.logits(x, 0)
    assert first.stats()["requests"] == 1  # a fresh process ran __init__ again
    assert torch.equal(after, before)
    assert torch.allclose(after, local_teachers[0](x).detach(), atol=1e-6)
