"""Reports and the sweep's input checks (no Ray started here)."""
import csv
import json

import pytest
import torch

from raydd.errors import ConfigError, DataError, RayddError
from raydd.evaluate import report, sweep
from raydd.synset import Synset, save_synset


def _trial(source, arch, mode, seed, acc, lr=0.01, status="ok"):
    return {"label": f"{source}/{mode} {arch} s{seed}", "source": source, "arch": arch, "mode": mode,
            "seed": seed, "lr": lr, "status": status, "test_acc": acc, "key": f"k{source}{arch}{mode}{seed}{lr}"}


def test_aggregate_and_table():
    trials = [_trial("distilled", "convnet", "soft", 0, 0.80), _trial("distilled", "convnet", "soft", 1, 0.84),
              _trial("random", "convnet", "soft", 0, 0.50), _trial("random", "convnet", "soft", 1, 0.60),
              _trial("random", "convnet", "hard", 0, 0.40),
              _trial("distilled", "mlp", "soft", 0, 0.70), _trial("distilled", "mlp", "soft", 1, 0.1, status="error")]
    agg = report.aggregate(trials)
    cell = {(r["source"], r["arch"], r["mode"]): r for r in agg}
    assert cell[("distilled", "convnet", "soft")]["mean"] == pytest.approx(0.82)
    assert cell[("distilled", "convnet", "soft")]["std"] == pytest.approx(0.02)  # population std
    assert cell[("distilled", "mlp", "soft")]["n"] == 1  # the errored trial is not averaged
    cols = [("distilled", "soft"), ("random", "soft"), ("random", "hard")]
    table = report.table_markdown(agg, ["convnet", "mlp"], cols, notes=["a note"])
    lines = table.splitlines()
    assert lines[0] == "| architecture | soft | random · soft | random · hard |"
    assert lines[2] == "| convnet | 82.00 ± 2.00 (2) | 55.00 ± 5.00 (2) | 40.00 ± 0.00 (1) |"
    assert lines[3] == "| mlp | 70.00 ± 0.00 (1) | — | — |"
    assert lines[-1] == "- a note"


def test_lr_search_picks_the_best_lr_per_cell():
    trials = [_trial("distilled", "mlp", "hard", s, a, lr=lr)
              for lr, accs in ((0.01, (0.5, 0.6)), (0.1, (0.7, 0.8))) for s, a in enumerate(accs)]
    agg = report.aggregate(trials)
    assert [r["lr"] for r in agg if r["best"]] == [0.1]
    table = report.table_markdown(agg, ["mlp"], [("distilled", "hard")], lr_search=True)
    assert "| mlp | 75.00 ± 5.00 (2) @ lr 0.1 |" in table


def test_write_reports_with_timing(tmp_path):
    # two trials overlap in time (started 100 and 105, 10 s each), the third started after both ended
    trials = [dict(_trial("distilled", "convnet", "soft", s, a), started_at=t0, seconds=10.0, experiment=ex)
              for s, a, t0, ex in ((0, 0.8, 100.0, "now"), (1, 0.9, 105.0, "now"), (2, 0.7, 120.0, "before"))]
    trials.append(_trial("distilled", "mlp", "soft", 0, 0.5))  # no timing recorded
    out = report.write_reports(tmp_path, trials, archs=["convnet", "mlp"], columns=[("distilled", "soft")],
                               config={"x": 1}, seconds=31.5, notes=[], extra={"experiment": "now"})
    doc = json.loads(out["results_json"].read_text())
    assert len(doc["trials"]) == 4 and doc["aggregate"][0]["mean"] == pytest.approx(0.8)
    rows = list(csv.DictReader(out["csv"].open()))
    assert [float(r["test_acc"]) for r in rows] == [0.8, 0.9, 0.7, 0.5]
    md = out["md"].read_text()
    assert "| architecture | soft | s/trial |" in md
    assert "| convnet | 80.00 ± 8.16 (3) | 10 |" in md and "| mlp | 50.00 ± 0.00 (1) | — |" in md
    assert "4 trials: 2 in this sweep's Tune experiment (32 s wall, at most 2 at once), 2 reused" in md
    assert report.max_concurrent(trials) == 2 and report.max_concurrent(trials[2:]) == 1
    assert out["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_reports_with_honest_scores(tmp_path):
    # full hard 0.90, synset hard 0.70 → HLR 0.20; soft: synset 0.80, random 0.75 → IOR 0.05,
    # α = −0.075, LRS 0.2382. The sweep ran with evaluate.dsa off, so the unmarked trials are the
    # no-aug side and the two dsa=True trials the aug side: gaps 0.05 (aug), 0.05 (no aug) → β = 0.05, ARS 0.2908
    trials = [_trial("full", "convnet", "hard", 0, 0.90), _trial("distilled", "convnet", "hard", 0, 0.70),
              _trial("distilled", "convnet", "soft", 0, 0.80), _trial("random", "convnet", "soft", 0, 0.75),
              dict(_trial("distilled", "convnet", "soft", 0, 0.85), dsa=True),
              dict(_trial("random", "convnet", "soft", 0, 0.80), dsa=True),
              _trial("distilled", "mlp", "soft", 0, 0.5)]
    cols = [("distilled", "hard"), ("distilled", "soft"), ("random", "soft"), ("full", "hard")]
    out = report.write_reports(tmp_path, trials, archs=["convnet", "mlp"], columns=cols,
                               config={"evaluate": {"dsa": False}}, seconds=1.0, notes=[])
    doc = json.loads(out["results_json"].read_text())
    assert set(doc["scores"]) == {"convnet"}  # nothing computable for mlp
    s = doc["scores"]["convnet"]
    assert s["hlr"]["value"] == pytest.approx(0.20)
    assert s["modes"]["soft"]["ior"] == pytest.approx(0.05)
    assert s["modes"]["soft"]["lrs"] == pytest.approx(0.238199, abs=1e-6)
    assert s["ars"]["soft"]["beta"] == pytest.approx(0.05)
    assert s["ars"]["soft"]["ars"] == pytest.approx(0.290755, abs=1e-6)
    md = out["md"].read_text()
    assert "## Honest scores (DD-Ranking)" in md
    assert "| architecture | HLR | IOR (mode) | LRS | ARS |" in md
    assert "| convnet | 20.00 | +5.00 (soft) | 23.82 | 29.08 |" in md
    assert "| mlp |" not in md.split("## Honest scores")[1]
    assert "(DD-Ranking, arXiv 2505.13300)." in md
    # the accuracy table keeps to the sweep's setting (no DSA): the dsa=True trials feed ARS only
    assert "| convnet | 70.00 ± 0.00 (1) | 80.00 ± 0.00 (1) | 75.00 ± 0.00 (1) | 90.00 ± 0.00 (1) |" in md
    assert len(doc["trials"]) == 7


def test_write_reports_without_scores(tmp_path):
    out = report.write_reports(tmp_path, [_trial("distilled", "mlp", "soft", 0, 0.5)], archs=["mlp"],
                               columns=[("distilled", "soft")], config={}, seconds=1.0, notes=[])
    assert json.loads(out["results_json"].read_text())["scores"] == {}
    assert "Honest scores" not in out["md"].read_text()


def test_plot_is_zoomed_to_the_data_with_reference_lines():
    trials = [_trial("distilled", "convnet", "soft", 0, 0.78), _trial("distilled", "convnet", "soft", 1, 0.82),
              _trial("random", "convnet", "soft", 0, 0.84), _trial("full", "convnet", "hard", 0, 0.90),
              _trial("distilled", "mlp", "soft", 0, 0.81)]
    cols = [("distilled", "soft"), ("random", "soft"), ("full", "hard")]
    teachers = [{"spec": "convnet", "test_acc": 0.95}, {"spec": "convnet", "test_acc": 0.97}]
    fig = report.plot_figure(report.aggregate(trials), ["convnet", "mlp"], cols, "t", teachers)
    ax = fig.axes[0]
    # data 78..96 (bars 80 ± 2, 84, 81; full 90; teachers 96): a margin either side, not 0-100
    assert ax.get_ylim() == (75.0, 100.0)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]   # bars first, then the reference lines
    assert labels == ["distilled · soft", "random · soft", "full data · hard", "teachers · convnet (2): 96.0"]
    assert [round(b.get_height(), 6) for b in ax.patches] == [80.0, 81.0, 84.0]   # full data is no bar
    assert any(line.get_ydata()[0] == pytest.approx(96.0) for line in ax.get_lines())
    bars_only = report.plot_figure(report.aggregate(trials[:3]), ["convnet"], cols[:2]).axes[0]
    assert bars_only.get_ylim() == (75.0, 85.0)   # 78..84, a margin of at least 1 point, on a 5-grid
    assert report.zoomed_limits([]) == (0.0, 100.0) and report.zoomed_limits([0.5, 99.5]) == (0.0, 100.0)


def test_each_evaluation_keeps_its_own_report_and_the_index_lists_all(tmp_path):
    out = tmp_path / "eval"
    (tmp_path / "teachers").mkdir()
    (tmp_path / "teachers" / "teachers.json").write_text(json.dumps(
        {"teachers": [{"spec": "convnet", "test_acc": 0.9}]}))
    first = [_trial("distilled", "convnet", "soft", s, a) for s, a in ((0, 0.8), (1, 0.7))]
    second = [_trial("distilled", "mlp", "hard", 0, 0.6, lr=0.1)]
    a = report.write_reports(out, first, archs=["convnet"], columns=[("distilled", "soft")],
                             config={"evaluate": {"epochs": 10, "lr": 0.01}}, seconds=1.0, notes=[],
                             extra={"seeds": [0, 1], "lrs": [0.01], "ipc": 2, "synset": "S1"})
    b = report.write_reports(out, second, archs=["mlp"], columns=[("distilled", "hard")],
                             config={"evaluate": {"epochs": 20, "lr": 0.1}}, seconds=1.0, notes=[],
                             extra={"seeds": [0], "lrs": [0.1], "ipc": 2, "synset": "S1"})
    assert a["report_dir"] != b["report_dir"] and a["report_dir"].parent == out / "reports"
    md_a, md_b = (r["report_dir"] / "results.md" for r in (a, b))
    assert "| convnet | 75.00 ± 5.00 (2) |" in md_a.read_text() and "mlp" not in md_a.read_text()
    assert "| mlp | 60.00 ± 0.00 (1) |" in md_b.read_text()
    assert (a["report_dir"] / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert (a["report_dir"] / "plot.png").read_bytes() != (b["report_dir"] / "plot.png").read_bytes()
    assert "| mlp | 60.00" in (out / "results.md").read_text()       # the latest, where it always was
    assert json.loads((out / "results.json").read_text())["report"] == b["report_dir"].name
    index = (out / "index.md").read_text().splitlines()
    rows = [line for line in index if line.startswith("| [")]
    assert len(rows) == 2 and rows[0].startswith(f"| [{b['report_dir'].name}](reports/{b['report_dir'].name}/")
    assert "| S1 | 2 | mlp | hard | 0 | 20 | 0.1 |" in rows[0]
    assert "| S1 | 2 | convnet | soft | 0, 1 | 10 | 0.01 |" in rows[1] and "| 2/2 |" in rows[1]
    # the first evaluation again (a rerun): its own report is updated, not a third one added
    again = report.write_reports(out, first, archs=["convnet"], columns=[("distilled", "soft")],
                                 config={"evaluate": {"epochs": 10, "lr": 0.01}}, seconds=1.0, notes=[])
    assert again["report_dir"] == a["report_dir"]
    assert sorted(p.name for p in (out / "reports").iterdir() if p.is_dir()) == sorted(
        [a["report_dir"].name, b["report_dir"].name])
    rows = [line for line in (out / "index.md").read_text().splitlines() if line.startswith("| [")]
    assert len(rows) == 2 and rows[0].startswith(f"| [{a['report_dir'].name}]")


# ------------------------------------------------------------------ bad inputs, before any compute

def _synset(tmp_path, shape=(1, 8, 8), classes=10, soft=True):
    n = 2 * classes
    y = torch.arange(classes).repeat_interleave(2)
    syn = Synset(torch.randn(n, *shape), y, soft_labels=torch.randn(n, classes) if soft else None,
                 meta={"num_classes": classes})
    return save_synset(tmp_path / "synset", syn)


def _sweep(syn, digits, tmp_path, **kw):
    args = dict(archs=["mlp"], seeds=1, modes=["hard"], data=str(digits), out_dir=tmp_path / "out",
                baselines=[], progress=False)
    args.update(kw)
    return sweep(syn, **args)


def test_synset_of_another_shape_or_class_count(digits, tmp_path):
    with pytest.raises(DataError, match=r"holds 3×8×8 images but the data .* is 1×8×8"):
        _sweep(_synset(tmp_path, shape=(3, 8, 8)), digits, tmp_path)
    with pytest.raises(DataError, match=r"has 5 classes but the data .* has 10"):
        _sweep(_synset(tmp_path, classes=5), digits, tmp_path)


def test_unknown_mode_and_bad_seeds(digits, tmp_path):
    syn = _synset(tmp_path)
    with pytest.raises(ConfigError, match="mode 'fuzzy' is unknown"):
        _sweep(syn, digits, tmp_path, modes=["fuzzy"])
    with pytest.raises(ConfigError, match=r"seeds: 0 is invalid; expected an integer >= 1"):
        _sweep(syn, digits, tmp_path, seeds=0)
    with pytest.raises(ConfigError, match="seeds"):
        _sweep(syn, digits, tmp_path, seeds=[])
    with pytest.raises(ConfigError, match=r"param_space\['epochs'\]: \[1, 2\] is a list; expected one value"):
        _sweep(syn, digits, tmp_path, param_space={"epochs": [1, 2]})
    with pytest.raises(ConfigError, match="unknown setting 'epoch'"):
        _sweep(syn, digits, tmp_path, param_space={"epoch": 3})


def test_soft_mode_without_soft_labels(digits, tmp_path):
    with pytest.raises(RayddError, match="mode 'soft' needs soft labels"):
        _sweep(_synset(tmp_path, soft=False), digits, tmp_path, modes=["soft"])


def test_storage_path_that_cannot_be_written(digits, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(RayddError, match=r"storage_path .*a-file/tune' cannot be written"):
        _sweep(_synset(tmp_path), digits, tmp_path, storage_path=str(blocker / "tune"))


def test_compare_synsets_splits_seen_unseen_and_reads_the_cost(tmp_path, capsys):
    """tools/compare_synsets.py on two hand-made reports: cells, the noise mark, the part means, the cost."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("compare_synsets",
                                                  Path(__file__).resolve().parents[1] / "tools" / "compare_synsets.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    accs = {("plain", "convnet"): (0.80, 0.82), ("plain", "lenet"): (0.60, 0.62), ("plain", "mlp"): (0.70, 0.72),
            ("meta", "convnet"): (0.79, 0.81), ("meta", "lenet"): (0.70, 0.72), ("meta", "mlp"): (0.75, 0.77),
            ("random", "convnet"): (0.70, 0.72), ("random", "lenet"): (0.68, 0.70), ("random", "mlp"): (0.76, 0.78)}
    paths = []
    for name, metadd in (("plain", False), ("meta", True)):
        syn = tmp_path / name / "synset"
        syn.mkdir(parents=True)
        groups = [{"group": g, "rounds": 10, "seconds": {"student": 10.0, "image": 5.0,
                                                         **({"auxiliaries": 5.0} if metadd else {})},
                   "memory": {"rss_mb": 800.0 + g}} for g in range(2)]
        config = {"teachers": {"arch": "convnet"}, "data": {"source": "digits"},
                  "distill": {"metadd": {"enabled": metadd}}, "auxiliaries": {"archs": ["lenet"]}}
        (syn / "manifest.json").write_text(json.dumps({"groups": groups, "config": config}))
        trials = [_trial(src, a, "soft", s, accs[(src if src == "random" else name, a)][s])
                  for src in ("distilled", "random") for a in ("convnet", "lenet", "mlp") for s in (0, 1)]
        doc = {"aggregate": report.aggregate(trials), "archs": ["convnet", "lenet", "mlp"], "synset": str(syn)}
        paths.append(f"{name}={tmp_path / name / 'results.json'}")
        (tmp_path / name / "results.json").write_text(json.dumps(doc))
    assert tool.main(paths) == 0
    out = capsys.readouterr().out
    assert "| lenet | seen (auxiliaries of meta) | 61.00 ± 1.00 | 71.00 ± 1.00 | 69.00 ± 1.00 |" in out
    assert "| convnet | distilled with | 81.00 ± 1.00 | 80.00 ± 1.00 | 71.00 ± 1.00 |" in out
    assert "| mlp | unseen | 71.00 ± 1.00 | 76.00 ± 1.00 ~ | 77.00 ± 1.00 |" in out   # 1 point < 1 + 1
    assert "| **unseen mean** | | 71.00 (1) | 76.00 (1) | 77.00 (1) |" in out
    assert "2 groups × 10 rounds; 4.00 s of group compute per round (student 2.00, image 1.00, auxiliaries 1.00); " \
           "auxiliaries 25% of it; peak RSS per group worker 800, 801 MB" in out
