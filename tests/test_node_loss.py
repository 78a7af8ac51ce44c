"""A worker node of a two-node Ray cluster is removed mid-distillation: its group is retried on the
head from its checkpoint, and the run completes with every group distilled and merged exactly once."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from raydd.config import from_dict
from raydd.io import read_json
from raydd.synset import MANIFEST, load_synset

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _config(digits):
    return from_dict({
        "data": {"source": "digits", "dir": digits, "dsa_strategy": "color_crop_cutout_scale_rotate"},
        "device": "cpu",
        "teachers": {"arch": "convnet:width=8", "count": 1, "epochs": 1, "batch_size": 128, "resources": {"cpus": 1}},
        "distill": {"ipc": 2, "groups": 2, "rounds": 10, "student_epochs": 2, "checkpoints": 1, "checkpoint_every": 2,
                    "student_batch": 64, "max_retries": 2, "resources": {"cpus": 0.5},
                    "service": {"resources": {"cpus": 0.5}}}})


def _progress(run, g):
    try:
        return read_json(run / "distill" / f"group-{g:03d}" / "progress.json")
    except Exception:   # not written yet
        return {}


def _one_teacher(cfg, run):
    """One teacher of one epoch, trained in this process (the cluster's time goes to distillation)."""
    from dataclasses import asdict

    from raydd.data import load_info
    from raydd.models import build
    from raydd.teacher_index import TEACHERS_DIR, save_teacher, write_index
    from raydd.teachers import Recipe, train_one_teacher
    info = load_info(cfg.data.dir)
    spec = build(cfg.teachers.arch, info.in_channels, info.num_classes, info.image_size).spec
    recipe = Recipe.from_config(cfg)
    want = {"spec": spec, "seed": 0, "epochs": 1, "recipe": asdict(recipe), "in_channels": info.in_channels,
            "num_classes": info.num_classes, "image_size": info.image_size, "shape": list(info.shape)}
    state, acc = train_one_teacher(spec, info, 0, recipe)
    out = run / TEACHERS_DIR
    rec = save_teacher(out, 0, state, acc, 0.0, 0.0, want)
    write_index(out, {"source": info.source, "classes": info.classes, "shape": list(info.shape)}, {0: rec})


def test_a_removed_worker_node_loses_no_group_and_duplicates_none(digits, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from raydd.distillation import run_distill
    ray.shutdown()
    # the head holds the driver and room for the lost group's retry; the worker node holds one group
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    worker = cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        head_id = ray.get_runtime_context().get_node_id()
        cfg, run = _config(digits), tmp_path / "run"
        _one_teacher(cfg, run)
        out: dict = {}

        def body():
            try:
                out["result"] = run_distill(cfg, run, progress=False)
            except BaseException as e:   # handed to the test
                out["error"] = e
        thread = threading.Thread(target=body, daemon=True)
        thread.start()

        deadline, lost = time.time() + 120, None
        while lost is None:
            assert thread.is_alive() and time.time() < deadline, out.get("error") or "no group reached round 2"
            for g in (0, 1):
                p = _progress(run, g)
                if p.get("node") == worker.node_id and p.get("round", 0) >= 2 and not p.get("done"):
                    lost = g
            time.sleep(0.05)
        cluster.remove_node(worker)        # its raylet, workers and whatever actors it hosted are gone
        thread.join(timeout=180)
        assert not thread.is_alive() and "error" not in out, out.get("error")

        syn = load_synset(out["result"].synset_dir)
        per_group = 2 * 10 // 2            # ipc 2 over 2 groups: 1 image per class each
        assert torch.bincount(syn.groups).tolist() == [per_group, per_group]   # each group merged once
        assert syn.images.shape[0] == 2 * 10 and torch.isfinite(syn.images).all()
        manifest = read_json(run / "synset" / MANIFEST)
        assert sorted(g["group"] for g in manifest["groups"]) == [0, 1]
        assert [g["completions"] for g in manifest["groups"]] == [1, 1]
        for g in (0, 1):
            assert _progress(run, g)["completions"] == 1                       # distilled to the end once
        starts = _progress(run, lost)["starts"]
        assert len(starts) == 2 and starts[1] >= 2 and starts[1] % 2 == 0       # resumed from a checkpoint
        assert _progress(run, lost)["node"] == head_id                          # on the surviving node
        assert _progress(run, 1 - lost)["starts"] == [0]                        # the other group was untouched
    finally:
        ray.shutdown()
        cluster.shutdown()
