"""MetaDD runs end to end on tiny digits: bad auxiliaries refused before any work, and a killed
auxiliary service restarts while the run completes with the pool recorded in the manifest."""
from __future__ import annotations

import csv

import pytest
import ray

from raydd.cli import main
from raydd.config import from_dict
from raydd.io import read_json

VIT = "vit_apm:depth=1,head_dim=8,heads=2,mlp=16,width=16"


def config(digits):
    return from_dict({
        "data": {"source": "digits", "dir": digits, "dsa_strategy": "color_crop_cutout_scale_rotate"},
        "device": "cpu",
        "teachers": {"arch": "convnet:width=8", "count": 2, "epochs": 2, "lr": 0.05, "batch_size": 256,
                     "resources": {"cpus": 1}},
        # a named service outlives the run, so the test can see that it was restarted
        "auxiliaries": {"archs": ["lenet", VIT], "epochs": 1,
                        "service": {"name": "raydd-test-metadd-aux", "resources": {"cpus": 0.25}}},
        "distill": {"ipc": 2, "groups": 2, "rounds": 6, "student_epochs": 2, "checkpoints": 1,
                    "checkpoint_every": 2, "lr_net": 0.05, "student_batch": 64, "resources": {"cpus": 0.5},
                    "service": {"resources": {"cpus": 0.25}},
                    "metadd": {"enabled": True, "cam_size": 4}}})


def test_bad_auxiliary_refused_before_any_work(digits, tmp_path, capsys):
    code = main(["run", "configs/digits_metadd.yaml", "--set", f"data.dir={digits}",
                 "--set", "auxiliaries.archs=[lenet, mlp]", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("raydd: error: auxiliaries.archs[1]: ") and "no spatial feature map" in err
    assert not (tmp_path / "run" / "teachers").exists()


@pytest.mark.ray
@pytest.mark.slow   # trains 2 teachers and 2 auxiliaries, then distils 2 groups: ~1-2 min on 2 cores
def test_killed_auxiliary_service_restarts_and_the_run_completes(digits, tmp_path, ray_local):
    from raydd.auxiliaries import train_auxiliaries
    from raydd.distillation import run_distill
    from raydd.distillation.auxiliaries import shard_name
    from raydd.teachers import train_teachers

    cfg, run = config(digits), tmp_path / "run"
    train_teachers(cfg, run, progress=False)
    pool = train_auxiliaries(cfg, run, progress=False)
    killed: dict = {}

    def progress(msg):   # kill the auxiliary actor once the first group has started
        if msg["kind"] == "start" and not killed:
            actor = ray.get_actor(shard_name(cfg, run, 0), namespace="raydd")
            killed["pid"] = ray.get(actor.stats.remote())["pid"]
            ray.kill(actor, no_restart=False)
        elif msg["kind"] == "checkpoint" and killed and "after" not in killed:
            # the run kills its services when it ends: ask the restarted one while it serves
            actor = ray.get_actor(shard_name(cfg, run, 0), namespace="raydd")
            killed["after"] = ray.get(actor.stats.remote())

    result = run_distill(cfg, run, progress=progress, backend="ray")
    stats = killed.get("after")
    assert stats and stats["pid"] != killed["pid"] and stats["requests"] > 0   # the restarted one served
    manifest = read_json(result.manifest_path)
    assert [a["spec"] for a in manifest["auxiliaries"]] == ["lenet", VIT]
    assert [a["sha256"] for a in manifest["auxiliaries"]] == [r["sha256"] for r in pool]
    for g in range(2):
        with open(run / "curves" / "distill" / f"group-{g:03d}" / "curves.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 6
        assert {"metadd/var", "metadd/ce", "metadd/kl", "metadd/pos", "metadd/grad_norm",
                "grad_norm_dd", "loss_all"} <= set(rows[0])
        assert all(float(r["metadd/var"]) > 0 for r in rows)
