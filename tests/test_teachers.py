import json
import os
import sys
from pathlib import Path

import pytest
import torch

from raydd.config import RayConfig, from_dict
from raydd.data.zca import ensure_zca
from raydd.errors import ConfigError, RayddError
from raydd.teachers import Recipe, load_teachers, train_one_teacher, train_teachers

pytestmark = pytest.mark.ray

TEACHER = {"arch": "convnet:width=8", "count": 2, "epochs": 2, "lr": 0.05, "batch_size": 128,
           "resources": {"cpus": 1}}


@pytest.fixture(scope="module")
def fault_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


def crash_on_marker(fault_dir):
    """A worker setup hook: while FAULT_DIR/teacher-NNN.crash exists, the task for teacher NNN
    deletes it and kills its own worker process, so that the retry path runs for real."""
    def hook():
        import raydd.teachers as teachers
        task = teachers._teacher_task

        def crashing(index, *args, **kwargs):
            try:
                (Path(fault_dir) / f"teacher-{index:03d}.crash").unlink()
            except FileNotFoundError:
                return task(index, *args, **kwargs)
            os._exit(1)
        teachers._teacher_task = crashing
    return hook


@pytest.fixture(scope="module")
def ray_local(fault_dir):
    import ray

    from raydd.raycluster import init_ray
    # The hook runs in every worker before its first task; this module is not importable there.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             runtime_env={"worker_process_setup_hook": crash_on_marker(str(fault_dir))})
    init_ray(RayConfig(num_cpus=2))  # joins the running instance: a no-op
    yield
    ray.shutdown()


def config(digits, **teachers):
    return from_dict({"data": {"source": "digits", "dir": digits, "dsa_strategy": "color_crop_cutout_scale_rotate"},
                      "device": "cpu", "teachers": {**TEACHER, **teachers}})


def mtimes(run):
    return {p.name: p.stat().st_mtime_ns for p in (run / "teachers").glob("*.safetensors")}


def test_train_one_teacher_plain_torch(digits):
    from raydd.data import load_info
    info = load_info(digits)
    recipe = Recipe(epochs=4, lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=32, dsa=None, zca=False)
    state, acc = train_one_teacher("convnet:width=8", info, 7, recipe)
    again, acc2 = train_one_teacher("convnet:width=8", info, 7, recipe)
    assert acc > 0.5 and acc == acc2  # far above chance (0.1), and reproducible from the seed
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)


def test_bf16_recipe_trains_under_autocast_and_only_it_is_recorded(digits):
    from raydd.data import load_info
    info = load_info(digits)
    fp32, bf16 = (Recipe.from_config(config(digits, precision=p)) for p in ("fp32", "bf16"))
    # fp32 records as teachers of before did (they stay reusable); bf16 is part of the recipe
    assert "precision" not in fp32.record() and bf16.record() == {**fp32.record(), "precision": "bf16"}
    assert Recipe(**bf16.record()) == bf16 and Recipe(**fp32.record()) == fp32
    small = dict(epochs=3, batch_size=32, dsa=None)
    s32, a32 = train_one_teacher("convnet:width=8", info, 7, Recipe(**{**fp32.record(), **small}))
    s16, a16 = train_one_teacher("convnet:width=8", info, 7, Recipe(**{**bf16.record(), **small}))
    assert all(v.dtype == torch.float32 for v in s16.values())       # fp32 weights kept
    assert any(not torch.equal(s32[k], s16[k]) for k in s32)         # it did train in bf16
    assert a16 > 0.5 and abs(a16 - a32) < 0.1


def test_pool_written_reused_grown_and_loaded(digits, ray_local, tmp_path, capsys):
    from raydd.data import batches, load_info
    from raydd.train import accuracy
    run = tmp_path / "run"
    records = train_teachers(config(digits), run)
    assert [r["index"] for r in records] == [0, 1]
    assert "teacher-000 done: test accuracy" in capsys.readouterr().err
    doc = json.loads((run / "teachers" / "teachers.json").read_text())
    assert doc["teachers"] == records and doc["dataset"]["shape"] == [1, 8, 8]
    r0 = records[0]
    assert r0["spec"].startswith("convnet") and r0["seed"] == 0 and records[1]["seed"] == 1
    assert r0["epochs"] == 2 and r0["num_classes"] == 10 and r0["in_channels"] == 1 and r0["image_size"] == 8
    assert len(r0["sha256"]) == 64 and 0.0 <= r0["test_acc"] <= 1.0
    assert r0["recipe"]["dsa"] == "color_crop_cutout_scale_rotate"
    before = mtimes(run)
    assert set(before) == {"teacher-000.safetensors", "teacher-001.safetensors"}

    # Re-run: nothing retrained. One more teacher: only that one is trained.
    assert train_teachers(config(digits), run) == records
    assert mtimes(run) == before
    grown = train_teachers(config(digits, count=3), run)
    assert grown[:2] == records and grown[2]["seed"] == 2
    assert {k: v for k, v in mtimes(run).items() if k in before} == before

    # A record whose recipe differs from the config (here: epochs) is trained again.
    doc = json.loads((run / "teachers" / "teachers.json").read_text())
    doc["teachers"][1]["epochs"] = 99
    (run / "teachers" / "teachers.json").write_text(json.dumps(doc))
    grown = train_teachers(config(digits, count=3), run)
    changed = {k for k, v in mtimes(run).items() if before.get(k) != v}
    assert "teacher-001.safetensors" in changed and "teacher-000.safetensors" not in changed
    assert grown[1]["epochs"] == 2

    models, loaded = load_teachers(run, expect_classes=10, expect_shape=(1, 8, 8))
    assert loaded == grown and len(models) == 3 and not models[0].training
    info = load_info(digits)
    for model, rec in zip(models, loaded):
        assert accuracy(model, batches(info, "test", 1024), "cpu") == pytest.approx(rec["test_acc"])


def test_index_records_provenance_and_older_indexes_still_load(digits, ray_local, tmp_path):
    import datetime
    import importlib.metadata

    import raydd
    run, index = tmp_path / "run", tmp_path / "run" / "teachers" / "teachers.json"
    start = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    records = train_teachers(config(digits, count=1, epochs=1), run, progress=False)
    doc = json.loads(index.read_text())
    prov = doc["provenance"]
    assert prov["versions"]["torch"] == torch.__version__ and prov["versions"]["raydd"] == raydd.__version__
    assert prov["versions"]["ray"] == importlib.metadata.version("ray")
    assert "git" in prov and prov["created"] == prov["updated"]
    created = datetime.datetime.fromisoformat(records[0]["created"])
    assert start <= created <= datetime.datetime.now(datetime.timezone.utc)
    assert datetime.datetime.fromisoformat(prov["created"]) >= created

    # Recorded versions are not part of what makes a teacher reusable: a re-run under other
    # versions reuses it and keeps the index's provenance and the record's time.
    doc["provenance"]["versions"]["torch"] = "0.0.1"
    index.write_text(json.dumps(doc))
    before = mtimes(run)
    assert train_teachers(config(digits, count=1, epochs=1), run, progress=False) == records
    assert mtimes(run) == before and json.loads(index.read_text())["provenance"] == doc["provenance"]

    # An index written before provenance was recorded: reused, loaded, and grown with new records.
    del doc["provenance"], doc["teachers"][0]["created"]
    index.write_text(json.dumps(doc))
    assert train_teachers(config(digits, count=1, epochs=1), run, progress=False) == doc["teachers"]
    assert mtimes(run) == before and "provenance" not in json.loads(index.read_text())
    assert load_teachers(run)[1] == doc["teachers"]
    grown = train_teachers(config(digits, count=2, epochs=1), run, progress=False)
    assert mtimes(run)["teacher-000.safetensors"] == before["teacher-000.safetensors"]
    assert "created" not in grown[0] and "created" in grown[1]
    assert json.loads(index.read_text())["provenance"]["versions"]["torch"] == torch.__version__


def test_checksum_and_spec_are_verified(digits, ray_local, tmp_path):
    run = tmp_path / "run"
    train_teachers(config(digits), run)
    before = mtimes(run)
    path = run / "teachers" / "teacher-001.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RayddError, match=r"teacher-001\.safetensors fails its checksum"):
        load_teachers(run)
    with pytest.raises(RayddError) as e:
        load_teachers(run, expect_classes=10, expect_shape=(3, 32, 32))
    msg = str(e.value)
    assert msg.startswith("teacher-000 is convnet") and "10 classes at 1x8x8 but the data is 3x32x32" in msg
    with pytest.raises(RayddError, match="with 100 classes"):
        load_teachers(run, expect_classes=100)
    # A finished teacher that fails its checksum is an error naming it, never a silent retrain
    # (a synset distilled with the old one would sit beside baselines labelled by the new one).
    with pytest.raises(RayddError, match=r"teacher file .*teacher-001\.safetensors fails its sha256 in "
                                         r"teachers\.json .*to retrain on purpose, delete"):
        train_teachers(config(digits), run)
    assert mtimes(run)["teacher-000.safetensors"] == before["teacher-000.safetensors"]
    assert path.read_bytes() == bytes(data)          # nothing rewritten
    path.unlink()
    with pytest.raises(RayddError, match=r"teacher-001\.safetensors is missing"):
        train_teachers(config(digits), run)
    with pytest.raises(RayddError, match="no teachers in"):
        load_teachers(tmp_path / "elsewhere")


def test_a_crashed_task_is_retried(digits, ray_local, tmp_path, fault_dir):
    marker = fault_dir / "teacher-000.crash"
    marker.touch()
    cfg = config(digits, count=1)
    cfg.data.zca = True  # also carries the run's ZCA state to the task
    records = train_teachers(cfg, tmp_path / "run", progress=False)
    assert not marker.exists()  # the first attempt ran and killed its worker ...
    assert len(records) == 1 and (tmp_path / "run/teachers/teacher-000.safetensors").is_file()  # ... the retry finished
    assert records[0]["recipe"]["zca"] and (tmp_path / "run/zca.safetensors").is_file()
    # The task saw the run's ZCA: the same teacher trained in this process is bit-identical.
    from raydd.data import load_info
    state, _ = train_one_teacher(records[0]["spec"], load_info(digits), records[0]["seed"],
                                 Recipe(**records[0]["recipe"]), zca=ensure_zca(cfg, tmp_path / "run"))
    loaded = load_teachers(tmp_path / "run")[0][0].state_dict()
    assert all(torch.equal(state[k], loaded[k]) for k in state)

    marker.touch()
    with pytest.raises(RayddError, match=r"teacher-000 failed after 1 attempt\(s\)"):
        train_teachers(config(digits, count=1, max_retries=0), tmp_path / "run2", progress=False)
    doc = json.loads((tmp_path / "run2/teachers/teachers.json").read_text())
    assert doc["teachers"] == []


def test_cuda_without_gpu_resources_is_refused(digits, tmp_path):
    cfg = config(digits)
    cfg.device = "cuda"
    with pytest.raises(ConfigError, match="teachers.resources.gpus"):
        train_teachers(cfg, tmp_path / "run")


def test_run_zca_is_fitted_once_and_verified(digits, tmp_path):
    cfg = config(digits)
    cfg.data.zca = True
    zca = ensure_zca(cfg, tmp_path)
    assert zca.matrix.shape == (64, 64)
    mtime = (tmp_path / "zca.safetensors").stat().st_mtime_ns
    again = ensure_zca(cfg, tmp_path)
    torch.testing.assert_close(again.matrix, zca.matrix)
    assert (tmp_path / "zca.safetensors").stat().st_mtime_ns == mtime
    (tmp_path / "zca.safetensors").write_bytes(b"broken")
    with pytest.raises(RayddError, match="fails its checksum"):
        ensure_zca(cfg, tmp_path)
    cfg.data.zca = False
    assert ensure_zca(cfg, tmp_path) is None
