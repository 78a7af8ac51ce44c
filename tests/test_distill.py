"""Distillation orchestration on tiny digits: groups, aggregation, faults, resume, bad inputs.

One local Ray (2 CPUs) for the module; the two-node ``Cluster`` test replaces it and runs last.
"""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import pytest
import torch

from raydd.config import from_dict, load_config
from raydd.distillation import (GROUP_SEED_STRIDE, MAX_ROLLBACKS, DataShape, distill_group, initial_images,
                                plan_groups, run_distill, service_name, soft_labels, split_ipc)
from raydd.errors import ConfigError, RayddError
from raydd.io import load_tensors, read_json, sha256_file, write_json
from raydd.methods import Services
from raydd.services import LocalService
from raydd.synset import load_synset

DATA = {"source": "digits", "dsa_strategy": "color_crop_cutout_scale_rotate"}
TEACHERS = {"arch": "convnet:width=8", "count": 2, "epochs": 2, "lr": 0.05, "batch_size": 128,
            "resources": {"cpus": 1}}
# ipc 3 over 2 groups: an uneven split (2 + 1 per class).
DISTILL = {"ipc": 3, "groups": 2, "rounds": 6, "student_epochs": 4, "checkpoints": 2, "checkpoint_every": 2,
           "lr_net": 0.05, "student_batch": 64, "resources": {"cpus": 0.5},
           "service": {"resources": {"cpus": 0.5}}}


def config(digits, **distill):
    return from_dict({"data": {**DATA, "dir": digits}, "device": "cpu", "teachers": TEACHERS,
                      "distill": {**DISTILL, **distill}})


@pytest.fixture(scope="module")
def teachers(digits, ray_local, tmp_path_factory):
    """A run directory holding only a trained teacher pool; tests copy it."""
    from raydd.teachers import train_teachers
    run = tmp_path_factory.mktemp("teachers-run")
    train_teachers(config(digits), run, progress=False)
    return run


def new_run(tmp_path, teachers, name="run"):
    run = tmp_path / name
    shutil.copytree(teachers / "teachers", run / "teachers")
    return run


def progress_of(run, g):
    return read_json(run / "distill" / f"group-{g:03d}" / "progress.json")


@pytest.fixture(scope="module")
def local_run(digits, teachers, tmp_path_factory):
    """One uninterrupted in-process run: the reference the other runs are compared with."""
    cfg = config(digits)
    run = new_run(tmp_path_factory.mktemp("local"), teachers)
    return cfg, run, run_distill(cfg, run, progress=False, backend="local")


# ---------------------------------------------------------------------------- planning

def test_split_and_plans(digits, tmp_path):
    assert split_ipc(5, 2) == [3, 2] and split_ipc(4, 4) == [1, 1, 1, 1] and split_ipc(7, 3) == [3, 2, 2]
    with pytest.raises(RayddError, match="groups"):
        split_ipc(1, 2)
    cfg = config(digits, ipc=5, groups=2)
    plans = plan_groups(cfg, tmp_path)
    assert [(p.ipc, p.offset, p.seed) for p in plans] == [(3, 0, 0), (2, 3, 1)]
    cfg.seed = 4
    assert [p.seed for p in plan_groups(cfg, tmp_path)] == [4 * GROUP_SEED_STRIDE, 4 * GROUP_SEED_STRIDE + 1]


def test_initial_images_are_disjoint_real_images(digits, tmp_path):
    from raydd.data import load_info
    cfg = config(digits, ipc=3, groups=2)
    info = load_info(digits)
    inits = initial_images(cfg, info, plan_groups(cfg, tmp_path))
    (x0, y0), (x1, y1) = inits[0], inits[1]
    assert y0.tolist() == [c for c in range(10) for _ in range(2)] and y1.tolist() == list(range(10))
    flat = torch.cat([x0, x1]).flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(len(flat)) * 1e9).min() > 0  # no image starts two groups


# ---------------------------------------------------------------------------- in-process runs

def test_local_run_writes_complete_synset(local_run, teachers):
    cfg, run, result = local_run
    syn = load_synset(result.synset_dir)
    assert result.synset_path == run / "synset" / "synset.safetensors" and result.grid_path.exists()
    assert syn.images.shape == (30, 1, 8, 8) and torch.isfinite(syn.images).all()
    assert torch.bincount(syn.labels).tolist() == [3] * 10
    assert torch.bincount(syn.groups).tolist() == [20, 10]          # uneven split: 2 + 1 per class
    assert syn.labels[:20].tolist() == sorted(syn.labels[:20].tolist())  # group order, class-sorted within
    from raydd.teachers import load_teachers
    models, records = load_teachers(run)
    with torch.no_grad():
        assert torch.allclose(syn.soft_labels, models[0](syn.images), atol=1e-5)  # 'first' teacher's logits
        mean, used = soft_labels(LocalService(models), syn.images, "mean", batch=7)
        assert used == [0, 1] and torch.allclose(mean, (models[0](syn.images) + models[1](syn.images)) / 2,
                                                 atol=1e-5)
    doc = syn.meta
    assert [(t["file"], t["sha256"]) for t in doc["teachers"]] == [(r["file"], r["sha256"]) for r in records]
    assert [g["seed"] for g in doc["groups"]] == [0, 1] and doc["counts"]["per_group"] == [20, 10]
    # every group's peak memory, from its progress record; the interpreter with torch alone is > 100 MB
    assert all(g["memory"]["rss_mb"] > 100 and g["memory"] == progress_of(run, g["group"])["memory"]
               for g in doc["groups"])
    assert doc["config"]["distill"]["ipc"] == 3 and doc["soft_labels"]["teachers"] == ["teacher-000.safetensors"]
    assert result.grid_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for g in (0, 1):
        p = progress_of(run, g)
        assert p["done"] and p["completions"] == 1 and p["starts"] == [0] and p["round"] == 6
    assert (run / "config.yaml").exists()
    # Same command again: nothing is recomputed or rewritten.
    before = {f: (run / "synset" / f).stat().st_mtime_ns for f in ("synset.safetensors", "manifest.json")}
    again = run_distill(cfg, run, progress=False, backend="local")
    assert again.seconds < 1.0 and again.groups == result.groups
    assert before == {f: (run / "synset" / f).stat().st_mtime_ns for f in before}


class FlakyService(LocalService):
    """Returns NaN image gradients on chosen ``input_grad`` calls."""

    def __init__(self, models, bad_calls):
        super().__init__(models)
        self.calls, self.bad_calls = 0, bad_calls

    def input_grad(self, x, grad_logits, model):
        self.calls += 1
        g = super().input_grad(x, grad_logits, model)
        return g * float("nan") if self.bad_calls(self.calls) else g


def _group_setup(digits, teachers, tmp_path):
    from raydd.data import load_info
    from raydd.teachers import load_teachers
    cfg = config(digits, ipc=2, groups=1)
    info = load_info(digits)
    plan = plan_groups(cfg, tmp_path)[0]
    init = initial_images(cfg, info, [plan])[0]
    return cfg, plan, init, load_teachers(teachers)[0], DataShape(1, 10, 8)


def test_nonfinite_images_roll_back_to_checkpoint(digits, teachers, tmp_path):
    cfg, plan, init, models, shape = _group_setup(digits, teachers, tmp_path)
    events = []
    out = distill_group(cfg, plan, init, Services(FlakyService(models, lambda n: n == 4)), shape,
                        report=events.append)
    p = read_json(plan.progress_path)
    # One call per round (segment = whole group): round 4 failed, back to the round-2 checkpoint.
    assert p["rollbacks"] == 1 and p["rollback_log"] == [{"failed": 4, "to": 2}]
    assert [e["round"] for e in events if e["kind"] == "rollback"] == [2]
    assert p["done"] and p["completions"] == 1 and torch.isfinite(out["images"]).all()
    assert torch.equal(load_tensors(plan.final_path)["images"], out["images"])


def test_persistent_nonfinite_images_fail_clearly(digits, teachers, tmp_path):
    cfg, plan, init, models, shape = _group_setup(digits, teachers, tmp_path)
    with pytest.raises(RayddError, match=f"non-finite {MAX_ROLLBACKS} times after its checkpoint at round 2"):
        distill_group(cfg, plan, init, Services(FlakyService(models, lambda n: n >= 3)), shape)
    state = load_tensors(plan.state_path)            # the last good checkpoint is kept
    assert int(state["round"]) == 2 and torch.isfinite(state["images"]).all()
    assert not plan.final_path.exists() and read_json(plan.progress_path)["rollbacks"] == MAX_ROLLBACKS - 1


def test_interrupted_run_resumes_without_redoing_groups(local_run, teachers, tmp_path, capfd):
    cfg, _, reference = local_run
    run = new_run(tmp_path, teachers)

    def interrupt(msg):
        if msg["group"] == 1 and msg["kind"] == "checkpoint":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_distill(cfg, run, progress=interrupt, backend="local")
    assert progress_of(run, 0)["done"] and not progress_of(run, 1)["done"]
    assert not (run / "synset").exists()
    final0 = run / "distill" / "group-000" / "final.safetensors"
    stamp = final0.stat().st_mtime_ns
    result = run_distill(cfg, run, progress=True, backend="local")
    assert progress_of(run, 0)["starts"] == [0] and final0.stat().st_mtime_ns == stamp   # not redone
    assert progress_of(run, 1)["starts"] == [0, 2] and progress_of(run, 1)["completions"] == 1
    # Resuming is exact: the same synset as the uninterrupted run.
    assert torch.allclose(load_synset(result.synset_dir).images, load_synset(reference.synset_dir).images,
                          atol=1e-5)
    err = capfd.readouterr().err
    assert "[distill] 12/12 rounds" in err and "g1 done" in err


# ---------------------------------------------------------------------------- bad inputs

def test_refuses_bad_inputs_before_any_work(digits, teachers, local_run, tmp_path):
    with pytest.raises(ConfigError, match="distill.groups: 3 is invalid"):
        load_config(None, ["distill.ipc=2", "distill.groups=3"])
    cfg = config(digits)
    cfg.distill.groups = 4                        # edited after validation
    with pytest.raises(ConfigError, match="distill.groups"):
        run_distill(cfg, tmp_path / "x", backend="local")
    assert not (tmp_path / "x").exists()

    run = new_run(tmp_path, teachers, "corrupt")
    f = run / "teachers" / "teacher-001.safetensors"
    f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1]))
    with pytest.raises(RayddError, match="teacher-001.safetensors fails its checksum"):
        run_distill(config(digits), run, progress=False, backend="local")
    assert not (run / "distill" / "group-000").exists() and not (run / "synset").exists()

    run = new_run(tmp_path, teachers, "classes")
    index = read_json(run / "teachers" / "teachers.json")
    index["teachers"][0]["num_classes"] = 5
    write_json(run / "teachers" / "teachers.json", index)
    with pytest.raises(RayddError, match="for 5 classes .* with 10 classes"):
        run_distill(config(digits), run, progress=False, backend="local")

    run = new_run(tmp_path, teachers, "arch")
    wide = from_dict({"data": {**DATA, "dir": digits}, "teachers": {**TEACHERS, "arch": "convnet:width=16"},
                      "distill": DISTILL})
    with pytest.raises(RayddError, match="'convnet:width=8' but teachers.arch is 'convnet:width=16'"):
        run_distill(wide, run, progress=False, backend="local")

    # An out directory holding another config's run: one line naming the differing keys.
    _, done_run, _ = local_run
    sha = sha256_file(done_run / "synset" / "synset.safetensors")
    other = config(digits, ipc=4, lr_img=2.0)
    with pytest.raises(RayddError) as e:
        run_distill(other, done_run, progress=False, backend="local")
    assert "distill.ipc (3 → 4)" in str(e.value) and "distill.lr_img (1.0 → 2.0)" in str(e.value)
    assert "\n" not in str(e.value)
    assert sha256_file(done_run / "synset" / "synset.safetensors") == sha


# ---------------------------------------------------------------------------- Ray

def _poll(fn, timeout=120.0):
    """fn() until it returns something truthy; files are polled, not progress messages, which
    reach the driver in batches up to a second late (a tiny group may be done by then)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if value := fn():
                return value
        except (RayddError, FileNotFoundError):   # not written yet
            pass
        time.sleep(0.01)
    raise AssertionError(f"condition not met in {timeout}s")


def _in_thread(fn):
    out = {}

    def body():
        try:
            out["result"] = fn()
        except BaseException as e:  # handed to the test thread
            out["error"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, out


@pytest.mark.ray
def test_ray_run_survives_killed_worker_and_service(local_run, teachers, tmp_path):
    import ray
    cfg = config(local_run[0].data.dir, rounds=30, checkpoint_every=3)
    run = new_run(tmp_path, teachers)
    messages: list[dict] = []
    thread, out = _in_thread(lambda: run_distill(cfg, run, progress=messages.append))

    first = _poll(lambda: (p := progress_of(run, 0))["round"] >= 3 and not p["done"] and p)
    os.kill(first["pid"], signal.SIGKILL)
    resumed = _poll(lambda: len((p := progress_of(run, 0))["starts"]) == 2 and p)
    ray.kill(ray.get_actor(service_name(cfg, run), namespace="raydd"), no_restart=False)
    killed_mid_run = not (progress_of(run, 0)["done"] and progress_of(run, 1)["done"])
    thread.join(timeout=240)
    assert not thread.is_alive() and "error" not in out, out.get("error")
    assert killed_mid_run

    syn = load_synset(out["result"].synset_dir)
    assert syn.images.shape == (30, 1, 8, 8) and torch.bincount(syn.groups).tolist() == [20, 10]
    p0, p1 = progress_of(run, 0), progress_of(run, 1)
    assert p0["completions"] == 1 and p1["completions"] == 1           # every group distilled once
    start = resumed["starts"][1]
    assert p0["starts"] == [0, start] and start >= 3 and start % 3 == 0   # resumed from a checkpoint
    assert resumed["pid"] != first["pid"]
    assert p1["starts"] == [0]           # service calls were retried across its restart: no work lost
    # The live view heard of the restart.
    assert {"group": 0, "kind": "start", "round": start, "start": 2}.items() <= \
        next(m for m in messages if m["kind"] == "start" and m["pid"] == resumed["pid"]).items()


@pytest.mark.ray
def test_ray_group_failure_is_one_clear_error(local_run, teachers, tmp_path):
    cfg = config(local_run[0].data.dir, lr_img=1e30)      # images blow up in the first rounds
    run = new_run(tmp_path, teachers)
    with pytest.raises(RayddError, match=f"non-finite {MAX_ROLLBACKS} times after its checkpoint at round 0") as e:
        run_distill(cfg, run, progress=False)
    assert "\n" not in str(e.value) and not (run / "synset").exists()
    assert progress_of(run, 0)["starts"] == [0]          # a user error is not retried


@pytest.mark.ray
def test_groups_are_spread_over_service_replicas(local_run, teachers, tmp_path):
    cfg = config(local_run[0].data.dir, service={"replicas": 2, "resources": {"cpus": 0.5}})
    run = new_run(tmp_path, teachers)
    result = run_distill(cfg, run, progress=False)
    served = read_json(run / "distill" / "service.json")["replicas"]
    # Group i asks copy i mod 2: two processes, each served one group's rounds, batching reported.
    assert len(served) == 2 and served[0]["pid"] != served[1]["pid"]
    assert all(s["requests"] >= 2 * DISTILL["rounds"] and s["batches"] >= 1 for s in served), served
    assert all(s["queue_ms_mean"] >= 0 and 0 < s["busy"] <= 1 for s in served), served
    assert all(g["memory"]["rss_mb"] > 100 for g in load_synset(result.synset_dir).meta["groups"])   # Ray workers'
    assert torch.allclose(load_synset(result.synset_dir).images, load_synset(local_run[2].synset_dir).images,
                          atol=1e-5)


@pytest.mark.ray
def test_two_node_cluster(local_run, teachers, tmp_path):
    import ray
    from ray.cluster_utils import Cluster
    ray.shutdown()                                     # leave the module's local Ray for a real cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        cfg = config(local_run[0].data.dir)
        run = new_run(tmp_path, teachers)
        result = run_distill(cfg, run, progress=False)
        syn = load_synset(result.synset_dir)
        assert torch.bincount(syn.groups).tolist() == [20, 10] and torch.isfinite(syn.images).all()
        nodes = {progress_of(run, g)["node"] for g in (0, 1)}
        assert len(nodes) == 2                         # SPREAD put one group on each node
        # Same seeds, same result as in-process: distribution changes nothing.
        assert torch.allclose(syn.images, load_synset(local_run[2].synset_dir).images, atol=1e-5)
    finally:
        ray.shutdown()
        cluster.shutdown()
