"""raydd rank: the rank statistics against hand computations, one tiny sweep on digits, the CLI's refusals."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from raydd.errors import ConfigError, RayddError
from raydd.evaluate import rank as rk

MODES = {"synset": "hard", "random": "hard", "full": "hard"}


def _acc(table):
    """{candidate: (synset, random, full)} -> the accuracy mapping summarize() takes."""
    return {c: {s: {"mean": m, "std": 0.0, "n": 1} for s, m in zip(rk.SOURCES, v)} for c, v in table.items()}


# --------------------------------------------------------------------------- (a) statistics

def test_perfect_and_reversed_order():
    full = [0.5, 0.6, 0.7, 0.8, 0.9]
    same = rk.correlations([0.1, 0.2, 0.3, 0.4, 0.5], full, resamples=500)
    rev = rk.correlations([0.5, 0.4, 0.3, 0.2, 0.1], full, resamples=500)
    for name in ("spearman", "kendall"):
        assert same[name]["value"] == pytest.approx(1.0) and same[name]["ci"] == pytest.approx([1.0, 1.0])
        assert rev[name]["value"] == pytest.approx(-1.0) and rev[name]["ci"] == pytest.approx([-1.0, -1.0])


def test_known_small_examples_by_hand():
    # one swap of neighbours twice: sum d^2 = 4, rho = 1 - 6*4/(5*24) = 0.8; 8 concordant, 2 discordant pairs
    c = rk.correlations([2, 1, 4, 3, 5], [1, 2, 3, 4, 5], resamples=500)
    assert c["spearman"]["value"] == pytest.approx(0.8) and c["kendall"]["value"] == pytest.approx(0.6)
    # a tie in the proxy: tau-b = 5 / sqrt(6 * 5); rho = Pearson of ranks (1.5, 1.5, 3, 4) = 4.5 / sqrt(5 * 4.5)
    t = rk.correlations([1, 1, 2, 3], [1, 2, 3, 4], resamples=500)
    assert t["kendall"]["value"] == pytest.approx(5 / math.sqrt(30))
    assert t["spearman"]["value"] == pytest.approx(4.5 / math.sqrt(22.5))
    assert rk.ranks([0.3, 0.9, 0.3, 0.5]) == [3, 1, 3, 2]   # 1 = best, ties share the better rank


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
def test_vectorised_bootstrap_statistics_match_scipy_with_ties():
    from scipy import stats
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 4, (60, 6)).astype(float), rng.integers(0, 4, (60, 6)).astype(float)
    x[0], y[1] = 2.0, 0.5   # a resample of candidates with one accuracy has no order
    sr, kr = rk.spearman_rows(x, y), rk.kendall_rows(x, y)
    for i in range(len(x)):
        for got, want in ((sr[i], stats.spearmanr(x[i], y[i]).statistic),
                          (kr[i], stats.kendalltau(x[i], y[i]).statistic)):
            assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)
    assert np.isnan(sr[:2]).all() and np.isnan(kr[:2]).all() and np.isfinite(sr[2:]).all()


def test_ci_contains_the_estimate_and_is_deterministic():
    proxy, full = [0.31, 0.42, 0.28, 0.55, 0.47, 0.39], [0.80, 0.85, 0.78, 0.91, 0.84, 0.86]
    a = rk.correlations(proxy, full)
    assert a == rk.correlations(proxy, full)          # fixed seed: the same intervals every time
    for name in ("spearman", "kendall"):
        lo, hi = a[name]["ci"]
        assert -1 <= lo <= a[name]["value"] <= hi <= 1 and lo < hi
        assert 1900 < a[name]["valid"] <= rk.RESAMPLES
    assert not np.array_equal(rk.bootstrap_indices(6, seed=0), rk.bootstrap_indices(6, seed=1))  # seeded


def test_summary_table_and_plot():
    doc = rk.summarize(_acc({"a": (0.5, 0.4, 0.9), "b": (0.6, 0.3, 0.95), "c": (0.4, 0.5, 0.8)}), ["a", "b", "c"],
                       modes=MODES, resamples=300)
    assert doc["correlation"]["synset"]["spearman"]["value"] == pytest.approx(1.0)
    assert doc["correlation"]["random"]["spearman"]["value"] == pytest.approx(-1.0)   # c > a > b: reversed
    assert doc["ranks"]["full"] == {"a": 2, "b": 1, "c": 3}
    table = rk.table_markdown(doc)
    rows = [ln.split(" |")[0] for ln in table.splitlines() if ln.startswith("| ") and " ± " in ln]
    assert rows == ["| b", "| a", "| c"]              # in full-data order
    assert "| synset · hard | 1.00 [1.00, 1.00] | 1.00 [1.00, 1.00] |" in table
    assert "| a | 90.00 ± 0.00 (1) #2 | 50.00 ± 0.00 (1) #2 | 40.00 ± 0.00 (1) #2 |" in table
    assert rk.plot_png(doc)[:4] == b"\x89PNG"
    with pytest.raises(RayddError, match=r"no accuracy for c \(full\)"):
        acc = _acc({"a": (0.5, 0.4, 0.9), "b": (0.6, 0.3, 0.95), "c": (0.4, 0.5, 0.8)})
        del acc["c"]["full"]
        rk.summarize(acc, ["a", "b", "c"], modes=MODES)


def test_candidate_checks():
    assert rk.check_candidates(["convnet:width=8", "convnet:depth=2", "mlp"]) == ["convnet:width=8",
                                                                                  "convnet:depth=2", "mlp"]
    with pytest.raises(ConfigError, match=r"2 given \(convnet, mlp\); expected at least 3"):
        rk.check_candidates(["convnet", "mlp"])
    with pytest.raises(ConfigError, match=r"candidate 'resnet9000' is unknown"):
        rk.check_candidates(["convnet", "mlp", "resnet9000"])
    with pytest.raises(ConfigError, match=r"'convnet:width=128' is the same model as 'convnet'"):
        rk.check_candidates(["convnet", "mlp", "convnet:width=128"])


# --------------------------------------------------------------------------- (b) one tiny sweep

CANDIDATES = ["convnet:width=8", "convnet:width=4,depth=1", "mlp"]


@pytest.mark.ray
def test_rank_end_to_end_on_digits(tmp_path, digits, ray_local):
    pytest.importorskip("ray")
    import raydd
    from raydd.config import from_dict
    from raydd.data import load_info, sample_per_class
    from raydd.synset import Synset, save_synset

    run = tmp_path / "run"
    x, y = sample_per_class(load_info(digits), "train", 2, seed=5)
    save_synset(run / "synset", Synset(x, y, meta={"num_classes": 10}))
    cfg = from_dict({"name": "tiny", "data": {"dir": digits, "dsa_strategy": "color_crop_cutout"},
                     "evaluate": {"modes": ["hard"], "seeds": 1, "epochs": 2, "full_epochs": 1, "lr": 0.05,
                                  "resources": {"cpus": 1}}})
    res = raydd.rank(cfg, CANDIDATES, out=run, progress=False)

    doc = json.loads(res.json.read_text())
    assert res.json.parent.parent == run / "eval" / "reports" and res.json.parent.name == doc["report"]
    assert res.md.read_text().count("| convnet:width=8 |") == 1 and res.plot.read_bytes()[:4] == b"\x89PNG"
    assert doc["candidates"] == CANDIDATES and doc["modes"] == {"synset": "hard", "random": "hard", "full": "hard"}
    # every candidate on every source, each the mean of its (one) trial in this evaluation's results.json
    trials = json.loads((res.json.parent / "results.json").read_text())["trials"]
    test_acc = {(t["source"], t["arch"]): t["test_acc"] for t in trials if t["mode"] == "hard"}
    for c in CANDIDATES:
        for s in rk.SOURCES:
            a = doc["accuracy"][c][s]
            assert a["n"] == 1 and a["mean"] == pytest.approx(test_acc[rk.SOURCE_OF[s], c])
    for p in rk.PROXIES:
        proxy = [doc["accuracy"][c][p]["mean"] for c in CANDIDATES]
        full = [doc["accuracy"][c]["full"]["mean"] for c in CANDIDATES]
        for name, fn in (("spearman", rk.spearman), ("kendall", rk.kendall)):
            c = doc["correlation"][p][name]
            assert set(c) == {"value", "p", "ci", "valid"}
            want = fn(proxy, full)[0]
            assert (math.isnan(want) and math.isnan(c["value"])) or c["value"] == pytest.approx(want)
    assert doc["bootstrap"] == {"resamples": 2000, "seed": 0, "level": 0.95, "method": "percentile",
                                "over": "candidates"}
    assert res.table in res.md.read_text()
    # a rerun trains nothing: every trial is reused from the evaluation directory
    again = raydd.rank(cfg, CANDIDATES, out=run, progress=False)
    assert again.sweep.experiment is None and again.doc["accuracy"] == doc["accuracy"]


# --------------------------------------------------------------------------- (c) CLI refusals

def _raydd(*args):
    return subprocess.run([sys.executable, "-m", "raydd", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("candidates, fragment", [
    (["convnet", "mlp"], "candidates: 2 given (convnet, mlp); expected at least 3"),
    (["convnet", "mlp", "resnet9000"], "candidate 'resnet9000' is unknown"),
    (["convnet", "mlp", "resnet18"], "no synset in"),
])
def test_cli_refuses_bad_input_before_any_work(tmp_path, candidates, fragment):
    out = tmp_path / "run"
    proc = _raydd("rank", "configs/digits.yaml", "--candidates", *candidates, "--out", str(out))
    err = proc.stderr.strip()
    assert proc.returncode == 2 and err.startswith("raydd: error:") and "\n" not in err, err
    assert fragment in err
    assert not out.exists()   # nothing written, nothing trained
