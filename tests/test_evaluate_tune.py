"""raydd.sweep as a Ray Tune sweep: searched values, an ASHA scheduler on the held-out validation
split, user callbacks, the ResultGrid and DataFrame, resume, and the caller's environment."""
import csv
import json
import os

import pytest

pytestmark = pytest.mark.ray

ray = pytest.importorskip("ray")

from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler  # noqa: E402

from raydd.config import from_dict  # noqa: E402
from raydd.errors import ConfigError, RayddError  # noqa: E402
from raydd.evaluate import sweep  # noqa: E402
from raydd.synset import Synset, load_synset, save_synset  # noqa: E402


@pytest.fixture(scope="module")
def syn(tmp_path_factory, digits):
    from raydd.data import load_info, sample_per_class
    root = tmp_path_factory.mktemp("tune")
    x, y = sample_per_class(load_info(digits), "train", 2, seed=5)
    save_synset(root / "synset", Synset(x, y, meta={"num_classes": 10}))
    return root


def _cfg(digits, **evaluate):
    return from_dict({"data": {"dir": digits, "dsa_strategy": "color_crop_cutout"},
                      "evaluate": {"report_every": 1, "val_size": 50, **evaluate}})


class Seen(tune.Callback):
    """A user callback: every result the driver sees, by trial id."""
    def __init__(self):
        self.results = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.results.setdefault(trial.trial_id, []).append(dict(result))


@pytest.mark.slow
def test_searched_lr_with_asha_callback_dataframe_and_rerun(syn, digits, ray_local):
    seen = Seen()
    kwargs = dict(seeds=1, modes=["hard"], param_space={"lr": tune.loguniform(1e-3, 1e-1), "epochs": 2},
                  num_samples=2, resources={"cpu": 1}, config=_cfg(digits), out_dir=syn / "out",
                  baselines=[], progress=False)
    env = dict(os.environ)
    res = sweep(syn / "synset", ["mlp"], callbacks=[seen],
                scheduler=ASHAScheduler(metric="val_acc", mode="max", grace_period=1, max_t=2), **kwargs)
    assert dict(os.environ) == env  # nothing set for Tune (RAY_AIR_NEW_OUTPUT, …) stays behind
    # one bracket (distilled/hard mlp) × 2 drawn lrs: one Tune experiment, its ResultGrid
    assert len(res.trials) == 2 and len(res.result_grid) == 2 and res.result_grid.errors == []
    lrs = {t["params"]["lr"] for t in res.trials}
    assert len(lrs) == 2 and all(1e-3 <= lr <= 1e-1 for lr in lrs)
    assert sorted(r.config["trial"] for r in res.result_grid) == sorted(t["label"] for t in res.trials)
    assert all(t["lr"] == t["params"]["lr"] for t in res.trials)  # the drawn lr is the one trained with

    df = res.dataframe()
    assert {"config/lr", "val_acc", "test_acc", "status"} <= set(df.columns)
    assert sorted(df["config/lr"]) == sorted(t["params"]["lr"] for t in res.trials)
    ok = df[df.status == "ok"]
    assert len(ok) >= 1 and ok.test_acc.between(0, 1).all() and ok.val_acc.between(0, 1).all()
    assert set(df.status) <= {"ok", "stopped"} and df[df.status == "stopped"].val_acc.notna().all()

    # the callback saw every trial's intermediate reports with the validation accuracy, and the
    # finished trials' last report folds in the test accuracy
    assert len(seen.results) == 2
    for rs in seen.results.values():
        assert all("val_acc" in r for r in rs)
    finals = [rs[-1] for rs in seen.results.values() if rs[-1].get("phase") == "done"]
    assert len(finals) == len(ok) and all("test_acc" in r and "val_acc" in r for r in finals)

    # journal and curves record the drawn values and every report
    journal = [json.loads(line) for line in (syn / "out" / "trials.jsonl").read_text().splitlines()]
    assert sorted(r["params"]["lr"] for r in journal) == sorted(df["config/lr"])
    for t in res.trials:
        rows = list(csv.DictReader((syn / "out" / t["curve"]).open()))
        assert rows and all(r["val_acc"] for r in rows)
        assert int(rows[-1]["epoch"]) == (2 if t["status"] == "ok" else t["stopped_at"])

    # the same sweep again: nothing runs, nothing fails, the same values are drawn
    again = sweep(syn / "synset", ["mlp"], scheduler=ASHAScheduler(metric="val_acc", mode="max", grace_period=1,
                                                                   max_t=2), **kwargs)
    assert again.experiment is None and again.result_grid is None
    assert [t["key"] for t in again.trials] == [t["key"] for t in res.trials]
    assert [t["started_at"] for t in again.trials] == [t["started_at"] for t in res.trials]
    assert dict(os.environ) == env

    # the validation split the sweep held out: 50 training images, class-balanced
    val = json.loads((syn / "out" / "val" / "manifest.json").read_text())
    assert len(set(val["samples"])) == 50 and val["seed"] == 0
    assert load_synset(syn / "out" / "val").labels.bincount().tolist() == [5] * 10


@pytest.mark.slow
def test_asha_stops_the_worse_trial_and_a_rerun_keeps_it_stopped(syn, digits, ray_local):
    """One trial at a time (2 CPUs each), same init: lr 1e-7 learns nothing and falls below lr 0.2
    at ASHA's first rung; it is recorded as stopped, listed in the table, and not run again."""
    kwargs = dict(seeds=1, modes=["hard"], param_space={"lr": tune.grid_search([0.2, 1e-7]), "epochs": 6},
                  resources={"cpu": 2}, config=_cfg(digits, report_every=2), out_dir=syn / "stop",
                  baselines=[], progress=False)
    res = sweep(syn / "synset", ["mlp"], scheduler=ASHAScheduler(metric="val_acc", mode="max", grace_period=1,
                                                                 reduction_factor=2, max_t=3), **kwargs)
    by_lr = {t["lr"]: t for t in res.trials}
    assert by_lr[0.2]["status"] == "ok" and by_lr[1e-7]["status"] == "stopped"
    assert by_lr[1e-7]["stopped_at"] == 2 and by_lr[1e-7]["stopped_by"] == "AsyncHyperBandScheduler"
    good = list(csv.DictReader((syn / "stop" / by_lr[0.2]["curve"]).open()))
    assert by_lr[1e-7]["val_acc"] < float(good[0]["val_acc"])   # below the rung's cutoff at epoch 2
    assert "1 trials stopped early by the scheduler" in res.table and "lr1e-07" in res.table
    doc = json.loads(res.results_json.read_text())
    assert doc["complete"] and [t["status"] for t in doc["trials"]] == ["ok", "stopped"]

    again = sweep(syn / "synset", ["mlp"], scheduler=lambda: ASHAScheduler(metric="val_acc", mode="max",
                                                                           grace_period=1, max_t=3), **kwargs)
    assert again.experiment is None and [t["status"] for t in again.trials] == ["ok", "stopped"]


def test_bad_spaces_are_refused_before_any_compute(syn, digits, tmp_path):
    kwargs = dict(seeds=1, modes=["hard"], data=digits, out_dir=tmp_path / "bad", baselines=[], progress=False)
    with pytest.raises(ConfigError, match=r"param_space: unknown setting 'lrr'"):
        sweep(syn / "synset", ["mlp"], param_space={"lrr": tune.uniform(0, 1)}, **kwargs)
    with pytest.raises(ConfigError, match=r"param_space\['epochs'\]: 2.5 is invalid; expected an integer"):
        sweep(syn / "synset", ["mlp"], param_space={"epochs": tune.grid_search([2, 2.5])}, **kwargs)
    with pytest.raises(ConfigError, match=r"num_samples: 3 would repeat identical trials"):
        sweep(syn / "synset", ["mlp"], param_space={"epochs": 2}, num_samples=3, **kwargs)
    with pytest.raises(ConfigError, match=r"evaluate.val_size: 0 with a scheduler"):
        sweep(syn / "synset", ["mlp"], config=_cfg(digits, val_size=0), scheduler=ASHAScheduler(), **kwargs)
    assert not (tmp_path / "bad").exists()


def test_the_validation_split_is_disjoint_from_baselines_and_test(digits, tmp_path):
    """Random baselines draw around it, the whole-data baseline trains without it, and it is
    drawn from training shards only."""
    from raydd.data import load_info
    from raydd.evaluate.baselines import random_subset, real_train
    from raydd.evaluate.holdout import ensure_val
    info = load_info(digits)
    val = ensure_val(tmp_path, info, "fp", 30, seed=0, progress=False)
    assert ensure_val(tmp_path, info, "fp", 30, seed=0, progress=False) == val   # fixed by the run seed
    assert ensure_val(tmp_path / "other", info, "fp", 30, seed=1, progress=False)["samples"] != val["samples"]
    train_shards = {s["name"] for s in info.shards["train"]}
    assert {s.split("/")[0] for s in val["samples"]} <= train_shards
    assert not train_shards & {s["name"] for s in info.shards["test"]}
    for seed in range(3):   # 30 of each class's ~143 training images held out: plain draws would hit them
        random_subset(tmp_path / f"r{seed}", info, "fp", 20, seed, None, None, None, None, None, False, val)
        drawn = json.loads((tmp_path / f"r{seed}" / "manifest.json").read_text())["samples"]
        assert len(set(drawn)) == 200 and not set(drawn) & set(val["samples"])
    x, _ = real_train(info, lambda v: v, 256, 0)
    xh, yh = real_train(info, lambda v: v, 256, 0, val)
    assert xh.shape[0] == x.shape[0] - 300 and yh.shape[0] == xh.shape[0]
    vx = load_synset(tmp_path / "val").images
    held = x[val["positions"]]
    assert (held - vx).abs().max() == 0   # positions name exactly the stored validation images


def test_the_test_split_is_decoded_once_per_process_as_streaming_gives_it(digits, tmp_path, monkeypatch):
    import shutil

    import torch

    from raydd.data import batches, load_info
    from raydd.errors import DataError
    from raydd.evaluate import baselines
    shutil.copytree(digits, tmp_path / "d")
    info = load_info(str(tmp_path / "d"))
    monkeypatch.setattr(baselines, "TEST_BATCH", 100)
    streamed = list(batches(info, "test", 100))
    kept = list(baselines.real_test(info, None)())
    assert len(kept) == len(streamed) > 1
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(kept, streamed))
    for shard in info.shards["test"]:
        (tmp_path / "d" / shard["name"]).unlink()
    again = list(baselines.real_test(info, None)())    # a later trial in the process: no shard is read
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, kept))
    monkeypatch.setattr(baselines, "TEST_IN_MEMORY_BYTES", 0)   # too large to keep: streamed every pass
    with pytest.raises(DataError):
        list(baselines.real_test(info, None)())


def test_the_zca_is_loaded_once_per_process_and_whitens_the_kept_test_split(digits, tmp_path):
    import torch

    from raydd.data import batches, load_info
    from raydd.data.zca import ZCA
    from raydd.evaluate import baselines
    from raydd.io import save_tensors
    info = load_info(digits)
    zca = ZCA.fit(torch.randn(300, *info.shape, generator=torch.Generator().manual_seed(0)))
    path = tmp_path / "zca.safetensors"
    record = {"path": str(path), "sha256": save_tensors(path, zca.state_dict())}
    kept = list(baselines.real_test(info, record)())
    streamed = [(zca.transform(x), y) for x, y in batches(info, "test", baselines.TEST_BATCH)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(kept, streamed))
    path.write_bytes(b"broken")   # the process holds the checked copy: no second read
    assert baselines.whitener(record) is baselines.whitener(dict(record))
    with pytest.raises(RayddError, match="checksum"):   # another ZCA is read, and checked
        baselines.whitener({**record, "sha256": "0" * 64})


@pytest.mark.slow
def test_a_search_alg_study_resumes_by_count(syn, digits, ray_local):
    """With a search_alg the searcher picks the values; a rerun asks it only for the trials the
    (bracket, seed) study still lacks."""
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from raydd.evaluate.sources import digest
    kwargs = dict(seeds=1, modes=["hard"], param_space={"lr": tune.loguniform(1e-2, 3e-1), "epochs": 2},
                  resources={"cpu": 1}, config=_cfg(digits), out_dir=syn / "study", baselines=[], progress=False)
    res = sweep(syn / "synset", ["mlp"], num_samples=2, search_alg=BasicVariantGenerator(random_state=3), **kwargs)
    assert [t["status"] for t in res.trials] == ["ok", "ok"] and len({t["lr"] for t in res.trials}) == 2
    (study,) = {t["study"] for t in res.trials}
    for t in res.trials:   # identity = the study and the values the searcher chose
        assert t["params"]["lr"] == t["lr"] and t["key"] == digest([study, t["params"]])[:16]
    more = sweep(syn / "synset", ["mlp"], num_samples=3, search_alg=BasicVariantGenerator(random_state=4), **kwargs)
    assert len(more.trials) == 3 and len(more.result_grid) == 1   # one more trial, not three
    assert {t["key"] for t in res.trials} < {t["key"] for t in more.trials}


def test_trial_cap_fits_a_local_ray_and_leaves_a_joined_cluster_to_its_autoscaler():
    from raydd.config import Resources
    from raydd.errors import RayddError
    from raydd.evaluate.tune_run import trial_cap
    cpu2, gpu = Resources(cpus=2), Resources(cpus=1, gpus=0.5)
    assert trial_cap({"CPU": 7}, cpu2, None, joined=False) == (3, None)
    assert trial_cap({"CPU": 7}, cpu2, 2, joined=False) == (2, None)
    assert trial_cap({"CPU": 7}, cpu2, 9, joined=False) == (3, None)       # no more than fits
    assert trial_cap({"CPU": 16, "GPU": 2}, gpu, None, joined=False) == (4, None)
    with pytest.raises(RayddError, match=r"evaluate.resources \(1 CPU, 0.5 GPU per trial\) exceed .*0 GPU"):
        trial_cap({"CPU": 16}, gpu, None, joined=False)
    # a joined cluster: what it has now neither caps nor refuses; only max_concurrent caps
    assert trial_cap({"CPU": 7}, cpu2, None, joined=True) == (None, None)
    assert trial_cap({"CPU": 7}, cpu2, 12, joined=True) == (12, None)
    cap, note = trial_cap({"CPU": 16}, gpu, None, joined=True)
    assert cap is None and "16 CPU, 0 GPU now" in note and "autoscaler" in note and "\n" not in note


def test_a_local_ray_is_not_a_joined_cluster():
    from raydd.evaluate.tune_run import joined_cluster
    started = not ray.is_initialized()   # earlier tests may leave their own local instance running
    if started:
        ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        assert joined_cluster() is False
    finally:
        if started:
            ray.shutdown()
