"""Auxiliary services (MetaDD): row packing, sharding, and the Ray actor against the in-process one."""
from __future__ import annotations

import threading
import time

import pytest
import ray
import torch

from raydd.aux_services import (RayAuxiliaries, ShardedAuxiliaries, pack_outputs, start_aux_service,
                                unpack_outputs)
from raydd.config import Resources
from raydd.io import save_tensors
from raydd.methods import Services
from raydd.methods.metadd import LocalAuxiliaries, MetaDDOptions, MetaDDTerm
from raydd.models import build
from raydd.services import LocalService, load_models

torch.set_num_threads(1)

SPECS = ["convnet:width=8", "vit_apm:width=16,depth=2,heads=2,head_dim=8,mlp=16", "convnet:act=swish,width=6"]
CLASSES = 3
OPTS = MetaDDOptions(ce=0.5, kl=1.0, var=4.0, pos=1.0, cam_size=4)


def batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(CLASSES, (n,), generator=g)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """The auxiliaries as (spec, safetensors) records: what the actor loads in its __init__."""
    out = tmp_path_factory.mktemp("aux")
    torch.manual_seed(0)
    recs = []
    for i, spec in enumerate(SPECS):
        net = build(spec, 1, CLASSES, 8)
        sha = save_tensors(out / f"aux-{i}.safetensors", net.state_dict())
        recs.append(dict(spec=spec, in_channels=1, num_classes=CLASSES, image_size=8,
                         path=str(out / f"aux-{i}.safetensors"), sha256=sha))
    return recs


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(7)
    return LocalService([build("convnet:width=4", 1, CLASSES, 8)])


def term_result(aux, backbone, segment=None):
    term = MetaDDTerm(OPTS, segment=segment)
    x, y = batch()
    loss, grad = term.loss_and_grad(x, y, Services(teachers=backbone, auxiliaries=aux))
    return loss, grad, term.stats


def test_rows_round_trip():
    g = torch.Generator().manual_seed(0)
    outs = [{"ce": torch.randn(5, generator=g), "kl": torch.randn(5, generator=g),
             "cam": torch.randn(5, 3, 3, generator=g), "cam_norm": torch.rand(5, 3, 3, generator=g)}
            for _ in range(2)]
    rows = pack_outputs(outs, 3)
    assert rows.shape == (5, 2 * (2 + 18))
    back = unpack_outputs(rows, 2, 3)
    for a, b in zip(outs, back):
        for k in a:
            assert torch.equal(a[k], b[k])


def test_sharded_pool_still_couples_the_variance(records, backbone):
    nets = load_models(records)
    whole = term_result(LocalAuxiliaries(nets), backbone)
    sharded = ShardedAuxiliaries([LocalAuxiliaries(nets[:1]), LocalAuxiliaries(nets[1:])])
    assert sharded.num_models == 3
    split = term_result(sharded, backbone)
    assert split[0] == pytest.approx(whole[0], rel=1e-6) and split[2]["var"] > 0
    torch.testing.assert_close(split[1], whole[1], rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def actor(ray_local, records):
    return start_aux_service(records, name="raydd-test-aux", resources=Resources(cpus=0.5), max_batch=64,
                             max_restarts=2, device="cpu", window_s=0.02)


@pytest.mark.ray
def test_ray_actor_equals_in_process(actor, records, backbone):
    local = term_result(LocalAuxiliaries(load_models(records)), backbone, segment=4)
    svc = RayAuxiliaries(actor)
    assert svc.num_models == 3 and [s.split(":")[0] for s in svc.specs] == ["convnet", "vit_apm", "convnet"]
    remote = term_result(svc, backbone, segment=4)
    assert remote[0] == pytest.approx(local[0], rel=1e-5)
    torch.testing.assert_close(remote[1], local[1], rtol=1e-4, atol=1e-7)
    # one shard in the actor, one in this process: both called before either is awaited
    nets = load_models(records)
    mixed = ShardedAuxiliaries([svc, LocalAuxiliaries(nets)])
    x, y = batch()
    t = backbone.logits(x, 0)
    outs = mixed.cams(x, y, t, [0, 4, 2], 4)
    ref = LocalAuxiliaries(nets).cams(x, y, t, [0, 1, 2], 4)
    for a, b in zip(outs, ref):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.ray
def test_concurrent_requests_are_coalesced(actor, records, backbone):
    svc = RayAuxiliaries(actor)
    before = svc.stats()
    x, y = batch(8)
    t = backbone.logits(x, 0)
    results = {}

    def caller(c):   # each sends its single-image requests at once, then waits for them
        waits = [svc.submit_cams(x[i:i + 1], y[i:i + 1], t[i:i + 1], [c % 3], 4) for i in range(c, 8, 2)]
        results[c] = [w()[0]["cam_norm"] for w in waits]

    threads = [threading.Thread(target=caller, args=(c,)) for c in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    local = LocalAuxiliaries(load_models(records))
    for c in range(2):
        expect = local.cams(x[c::2], y[c::2], t[c::2], [c % 3], 4)[0]["cam_norm"]
        torch.testing.assert_close(torch.cat(results[c]), expect, rtol=1e-5, atol=1e-6)
    after = svc.stats()
    assert after["requests"] - before["requests"] == 8
    assert after["batches"] - before["batches"] < 8


@pytest.mark.ray
def test_killed_actor_restarts_and_answers_the_same(actor, backbone):
    svc = RayAuxiliaries(actor)
    before = term_result(svc, backbone)
    pid = svc.stats()["pid"]
    ray.kill(actor, no_restart=False)
    deadline = time.time() + 60
    while svc.stats()["pid"] == pid:   # calls are retried while it restarts
        assert time.time() < deadline, "the auxiliary service did not restart"
        time.sleep(0.2)
    after = term_result(svc, backbone)
    assert after[0] == before[0]
    assert torch.equal(after[1], before[1])
