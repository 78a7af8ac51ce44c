"""Evaluation sweeps through Ray Tune on tiny digits: aggregate vs trials, resume, the notebook API."""
import json
import re
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.ray

ray = pytest.importorskip("ray")

from raydd.config import from_dict  # noqa: E402
from raydd.errors import RayddError  # noqa: E402
from raydd.evaluate import run_evaluation, sweep  # noqa: E402
from raydd.synset import Synset, save_synset  # noqa: E402

ARCHS = ["convnet:width=8", "mlp"]


def fail_while_armed(spec_file):
    """A worker setup hook: while SPEC_FILE holds ``SUBSTRING@MARKER``, trials whose label contains
    SUBSTRING raise until the file MARKER exists (a crashed sweep)."""
    def hook():
        import importlib
        sweep_module = importlib.import_module("raydd.evaluate.sweep")
        trainable = sweep_module.eval_trainable

        def failing(config):
            spec = Path(spec_file)
            if spec.exists():
                needle, _, marker = spec.read_text().partition("@")
                if needle in config["trial"] and not Path(marker).exists():
                    raise RuntimeError(f"trial {config['trial']} fails until {marker} exists")
            return trainable(config)
        sweep_module.eval_trainable = failing
    return hook


@pytest.fixture(scope="module")
def fail_spec(tmp_path_factory):
    return tmp_path_factory.mktemp("hook") / "fail"


@pytest.fixture(scope="module")
def ray_local(fail_spec):
    # The hook runs in every worker before its first trial; this module is not importable there.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": fail_while_armed(str(fail_spec))})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_local):
    """Digits shards, one tiny teacher, and a 'synset' that is a real subset with that teacher's logits."""
    from raydd.data import load_info, prepare, sample_per_class
    from raydd.teachers import load_teachers, train_teachers

    root = tmp_path_factory.mktemp("eval")
    prepare("digits", root / "digits")
    cfg = _cfg(root)
    train_teachers(cfg, root / "run", progress=False)
    x, y = sample_per_class(load_info(root / "digits"), "train", 2, seed=123)
    teacher = load_teachers(root / "run")[0][0]
    with torch.no_grad():
        soft = teacher(x)
    save_synset(root / "run" / "synset", Synset(x, y, soft_labels=soft, meta={"num_classes": 10}))
    return root, cfg


def _cfg(root, **evaluate):
    ev = {"archs": ARCHS, "modes": ["soft"], "seeds": 2, "epochs": 3, "lr": 0.05, "resources": {"cpus": 1}}
    ev.update(evaluate)
    return from_dict({"name": "tiny", "data": {"dir": str(root / "digits"), "dsa_strategy": "color_crop_cutout"},
                      "teachers": {"arch": "convnet:width=8", "count": 1, "epochs": 1, "resources": {"cpus": 1}},
                      "evaluate": ev})


@pytest.fixture
def fail_trials(fail_spec):
    """``fail_trials(SUBSTRING, MARKER)``: those trials crash until MARKER exists (for one test)."""
    yield lambda needle, marker: fail_spec.write_text(f"{needle}@{marker}")
    fail_spec.unlink(missing_ok=True)


def test_sweep_reports_and_resumes_without_rerunning_finished_trials(run, fail_trials, capsys):
    root, cfg = run
    marker = root / "let-it-pass"
    fail_trials("random/hard mlp s1", marker)  # this trial crashes
    with pytest.raises(RayddError, match=r"1 of 12 evaluation trials did not finish .*random/hard mlp s1.*rerun"):
        run_evaluation(cfg, root / "run", progress=True)
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[evaluate] ") and "trials (" in l]
    assert len(lines) == 12 and lines[-1].startswith("[evaluate] 12/12 trials")  # one line per trial
    assert sum("random/hard mlp s1: FAILED: " in l for l in lines) == 1
    assert sum(l.endswith("s") and "%" in l for l in lines) == 11
    first = json.loads((root / "run" / "eval" / "results.json").read_text())
    done_before = {t["label"]: t["started_at"] for t in first["trials"] if t["status"] == "ok"}
    assert len(done_before) == 11 and not first["complete"]

    marker.write_text("")  # the crash is fixed: rerun the same command
    res = run_evaluation(cfg, root / "run", progress=False)
    doc = json.loads(res.results_json.read_text())
    assert doc["complete"] and res.trials == 12 and doc["experiment"] != first["experiment"]  # only the 1
    by_label = {t["label"]: t for t in doc["trials"]}
    assert all(by_label[label]["started_at"] == started for label, started in done_before.items())
    assert all(t["status"] == "ok" for t in doc["trials"])

    # the grid: 2 archs × 2 seeds × (distilled soft, random soft, random hard)
    assert {(t["source"], t["mode"]) for t in doc["trials"]} == {("distilled", "soft"), ("random", "soft"),
                                                                ("random", "hard")}
    assert {(t["arch"], t["seed"]) for t in doc["trials"]} == {(a, s) for a in ARCHS for s in (0, 1)}
    # the aggregate and the table agree with the trials
    for row in doc["aggregate"]:
        accs = [t["test_acc"] for t in doc["trials"]
                if (t["source"], t["arch"], t["mode"]) == (row["source"], row["arch"], row["mode"])]
        mean = sum(accs) / len(accs)
        std = (sum((a - mean) ** 2 for a in accs) / len(accs)) ** 0.5
        assert row["n"] == 2 and row["mean"] == pytest.approx(mean) and row["std"] == pytest.approx(std)
        cell = f"{100 * mean:.2f} ± {100 * std:.2f} (2)"
        line = next(ln for ln in res.table.splitlines() if ln.startswith(f"| {row['arch']} |"))
        assert cell in line
    assert res.table.splitlines()[0] == "| architecture | soft | random · soft | random · hard | s/trial |"
    # only the failed trial ran again; the 11 finished before are reported as reused
    assert re.search(r"12 trials: 1 in this sweep's Tune experiment \(\d+ s wall, at most 1 at once\), "
                     r"11 reused", res.md.read_text())
    assert res.table in res.md.read_text()
    assert res.csv.read_text().count("\n") == 13 and res.plot.stat().st_size > 1000

    # a third run finds everything done and runs nothing
    again = run_evaluation(cfg, root / "run", progress=False)
    assert json.loads(again.results_json.read_text())["experiment"] is None and again.table == res.table
    # a narrower grid reports only itself but keeps the rest on file: the full grid again runs nothing
    narrow = run_evaluation(_cfg(root, archs=["mlp"]), root / "run", progress=False)
    doc = json.loads(narrow.results_json.read_text())
    assert narrow.trials == 6 and len(doc["other_trials"]) == 6 and "convnet" not in narrow.table
    full = run_evaluation(cfg, root / "run", progress=False)
    assert json.loads(full.results_json.read_text())["experiment"] is None and full.table == res.table


def test_notebook_sweep_with_elf_and_lr_search(run):
    root, _ = run
    syn = Synset(*_subset(root), meta={"num_classes": 10})
    res = sweep(syn, ["convnet:width=8", "mlp"], seeds=1, modes=("elf", "hard"), mode_archs={"hard": ["mlp"]},
                param_space={"lr": [0.02, 0.05], "epochs": 2, "elf.feature_arch": "convnet:width=16",
                             "elf.feature_epochs": 1},
                resources={"cpu": 1}, data=str(root / "digits"), out_dir=root / "nb", baselines=[],
                progress=False)
    got = {(t["arch"], t["mode"], t["lr"]) for t in res.trials}  # hard only for mlp, elf only where it fits
    assert got == {("convnet:width=8", "elf", 0.02), ("convnet:width=8", "elf", 0.05),
                   ("mlp", "hard", 0.02), ("mlp", "hard", 0.05)}
    assert all(t["status"] == "ok" for t in res.trials)
    assert any("elf not evaluated for mlp" in n and "no front/rear split" in n for n in res.notes)
    elf = [t for t in res.trials if t["mode"] == "elf"]
    assert all("projection 8<->16" in t["elf_adapted"] for t in elf)  # width 8 net vs width 16 features
    assert (root / "nb" / "elf_feature_model.safetensors").exists()
    assert "@ lr" in res.table and "| mlp | — | " in res.table
    line = next(ln for ln in res.table.splitlines() if ln.startswith("| convnet:width=8 |"))
    assert re.fullmatch(r"\| convnet:width=8 \| [\d.]+ ± [\d.]+ \(1\) @ lr [\d.]+ \| — \| \d+ \|", line)  # no hard


def test_elf_checks_only_the_architectures_mode_archs_gives_it(run):
    root, _ = run
    kwargs = dict(seeds=1, modes=("elf",), data=str(root / "digits"), out_dir=root / "elfonly", baselines=[],
                  param_space={"epochs": 1, "elf.feature_arch": "convnet:width=8", "elf.feature_epochs": 1},
                  progress=False)
    res = sweep(root / "run" / "synset", ARCHS, mode_archs={"elf": ["convnet:width=8"]}, **kwargs)
    assert [(t["arch"], t["status"]) for t in res.trials] == [("convnet:width=8", "ok")]
    assert not any("mlp" in n for n in res.notes)  # mlp never runs elf: no refusal to report
    with pytest.raises(RayddError, match=r"mode 'elf' fits none of the architectures mlp; .*front/rear split"):
        sweep(root / "run" / "synset", ARCHS, mode_archs={"elf": ["mlp"]}, **kwargs)


def test_a_changed_grid_after_a_failure_runs_only_its_new_trials(run):
    root, _ = run
    cfg = _cfg(root, epochs=2, modes=["hard"], arch_lr={"mlp": 1e30})  # mlp diverges in its second epoch
    kwargs = dict(seeds=1, modes=["hard"], data=str(root / "digits"), out_dir=root / "archlr", baselines=[],
                  progress=False, config=cfg)
    with pytest.raises(RayddError, match=r"1 of 2 evaluation trials did not finish .*mlp.*diverged.*"
                                         r"\(evaluate.arch_lr.mlp sets its lr alone\)"):
        sweep(root / "run" / "synset", ARCHS, **kwargs)
    first = {t["arch"]: t for t in json.loads((root / "archlr" / "results.json").read_text())["trials"]}
    assert first["convnet:width=8"]["status"] == "ok" and first["mlp"]["status"] != "ok"

    cfg.evaluate.arch_lr = {"mlp": 0.02}  # a new trial for mlp; the failed experiment is not restored
    res = sweep(root / "run" / "synset", ARCHS, **kwargs)
    again = {t["arch"]: t for t in res.trials}
    assert again["convnet:width=8"]["started_at"] == first["convnet:width=8"]["started_at"]  # reused
    assert again["mlp"]["status"] == "ok" and again["mlp"]["lr"] == 0.02
    assert again["convnet:width=8"]["lr"] == 0.05 and res.experiment != first["mlp"]["experiment"]
    assert "- lr 0.05, except mlp 0.02 (evaluate.arch_lr)" in res.table
    assert re.search(r"2 trials: 1 in this sweep's Tune experiment .*, 1 reused", res.md.read_text())


def _subset(root):
    from raydd.data import load_info, sample_per_class
    return sample_per_class(load_info(root / "digits"), "train", 1, seed=7)


def test_honest_scores_from_a_sweep_with_full_baseline_and_ars(run):
    """HLR needs the full-data hard baseline and the synset in hard mode; ARS the DSA-flipped trials."""
    root, cfg = run
    cfg = _cfg(root, archs=["mlp"], modes=["hard", "soft"], seeds=1, epochs=2, baselines=["random", "full"],
               full_epochs=1, ars=True)
    import shutil
    shutil.copytree(root / "run" / "teachers", root / "scores" / "teachers")   # they label the random subset
    res = run_evaluation(cfg, root / "scores", synset_dir=root / "run" / "synset", progress=False)
    doc = json.loads(res.results_json.read_text())
    flipped = [t for t in doc["trials"] if t.get("dsa") is False]
    # every distilled and random trial once more without DSA; never the full baseline
    assert sorted((t["source"], t["mode"]) for t in flipped) == [("distilled", "hard"), ("distilled", "soft"),
                                                                  ("random", "hard"), ("random", "soft")]
    assert all(t["label"].endswith(" noaug") for t in flipped) and len(doc["trials"]) == 9
    acc = {(t["source"], t["mode"], t.get("dsa", True)): t["test_acc"] for t in doc["trials"]}
    s = doc["scores"]["mlp"]
    assert s["hlr"]["value"] == pytest.approx(acc["full", "hard", True] - acc["distilled", "hard", True])
    assert s["modes"]["soft"]["ior"] == pytest.approx(acc["distilled", "soft", True] - acc["random", "soft", True])
    gap = lambda d: acc["distilled", "soft", d] - acc["random", "soft", d]  # noqa: E731
    assert s["ars"]["soft"]["beta"] == pytest.approx(0.5 * gap(True) + 0.5 * gap(False))
    assert "## Honest scores (DD-Ranking)" in res.md.read_text()
    # the flipped trials stay out of the accuracy table: one trial per cell
    assert all(row["n"] == 1 for row in doc["aggregate"])


def test_stacked_trials_match_lone_ones_and_share_their_keys(run, capsys):
    root, _ = run
    lone_dir, stacked_dir = root / "lone", root / "stacked"
    for d in (lone_dir, stacked_dir):
        d.mkdir()
        (d / "teachers").symlink_to(root / "run" / "teachers")
    kw = dict(synset_dir=root / "run" / "synset")
    lone = run_evaluation(_cfg(root, archs=["convnet:width=8", "vit_tiny"]), lone_dir, progress=False, **kw)
    stacked = run_evaluation(_cfg(root, archs=["convnet:width=8", "vit_tiny"], stack=4), stacked_dir, **kw)
    out = capsys.readouterr().out
    # convnet: one pack of 4 soft trials (distilled and random, 2 seeds) and one of 2 random · hard;
    # the ViT trains alone, said once
    assert "12 trials to run (0 reused) in 8 runs, 6 of them stacked up to 4 at a time" in out
    assert "trained alone (not stackable): vit_tiny" in stacked.md.read_text()
    a = {t["label"]: t for t in json.loads(lone.results_json.read_text())["trials"]}
    b = {t["label"]: t for t in json.loads(stacked.results_json.read_text())["trials"]}
    assert a.keys() == b.keys() and all(t["status"] == "ok" for t in b.values())
    for label, t in b.items():
        assert t["key"] == a[label]["key"]
        if label.split()[1] == "convnet:width=8":
            assert t["stacked"] in (2, 4) and t["stacked_with"].startswith(f"stack of {t['stacked']}: ")
            assert abs(t["test_acc"] - a[label]["test_acc"]) <= 0.01   # up to rounding: a borderline image
            assert t["train_loss_last"] == pytest.approx(a[label]["train_loss_last"], rel=1e-3)
        else:
            assert "stacked" not in t
    journal = [json.loads(line) for line in (stacked_dir / "eval" / "trials.jsonl").read_text().splitlines()]
    assert sorted(r["label"] for r in journal) == sorted(b)    # every member journalled on its own
    # same keys: the lone grid finds everything done in the stacked run's directory
    again = run_evaluation(_cfg(root, archs=["convnet:width=8", "vit_tiny"]), stacked_dir, progress=False, **kw)
    assert json.loads(again.results_json.read_text())["experiment"] is None
