"""DD-Ranking's honest scores against hand computations."""
import math

import pytest

from raydd.evaluate import scores

E_INV = math.exp(-1)        # 0.367879
SPAN = math.e - E_INV       # 2.718282 − 0.367879 = 2.350402


def _t(source, mode, acc, seed=0, arch="convnet", **kw):
    return {"source": source, "arch": arch, "mode": mode, "seed": seed, "lr": 0.01, "status": "ok",
            "test_acc": acc, **kw}


def _base(arch="convnet"):
    return [_t("full", "hard", 0.90, arch=arch), _t("distilled", "hard", 0.70, arch=arch),
            _t("distilled", "soft", 0.80, arch=arch), _t("random", "soft", 0.75, arch=arch),
            _t("random", "hard", 0.60, arch=arch)]


def test_normalise_maps_the_gain_range_onto_0_1():
    assert scores.normalise(-1.0) == pytest.approx(0.0)
    assert scores.normalise(1.0) == pytest.approx(1.0)
    assert scores.normalise(0.0) == pytest.approx(1 / (math.e + 1))  # no gain over random: 0.2689


def test_lrs_by_hand():
    s = scores.compute_scores(_base())["convnet"]
    # HLR = 0.90 − 0.70 = 0.20
    assert s["hlr"]["value"] == pytest.approx(0.20)
    # soft: IOR = 0.80 − 0.75 = 0.05; α = 0.5·0.05 − 0.5·0.20 = −0.075
    # LRS = (e^−0.075 − e^−1)/(e − e^−1) = (0.927743 − 0.367879)/2.350402 = 0.238199
    soft = s["modes"]["soft"]
    assert soft["ior"] == pytest.approx(0.05)
    assert soft["alpha"] == pytest.approx(-0.075)
    assert soft["lrs"] == pytest.approx(0.238199, abs=1e-6)
    assert soft["lrs"] == pytest.approx((math.exp(-0.075) - E_INV) / SPAN)
    # hard: IOR = 0.70 − 0.60 = 0.10; α = 0.05 − 0.10 = −0.05
    # LRS = (0.951229 − 0.367879)/2.350402 = 0.248192
    hard = s["modes"]["hard"]
    assert hard["ior"] == pytest.approx(0.10) and hard["lrs"] == pytest.approx(0.248192, abs=1e-6)
    assert soft["inputs"]["random"]["mean"] == pytest.approx(0.75)
    assert "ars" not in s  # no trial without DSA


def test_missing_trials_give_no_score_rather_than_zero():
    no_full = [t for t in _base() if t["source"] != "full"]
    s = scores.compute_scores(no_full)["convnet"]
    assert "hlr" not in s
    assert s["modes"]["soft"]["ior"] == pytest.approx(0.05)
    assert "lrs" not in s["modes"]["soft"] and "alpha" not in s["modes"]["soft"]

    no_random_soft = [t for t in _base() if (t["source"], t["mode"]) != ("random", "soft")]
    s = scores.compute_scores(no_random_soft)["convnet"]
    assert set(s["modes"]) == {"hard"} and s["hlr"]["value"] == pytest.approx(0.20)

    errored = [dict(t, status="error") if t["source"] == "full" else t for t in _base()]
    assert "hlr" not in scores.compute_scores(errored)["convnet"]
    # only a synset trial: nothing computable, the architecture is left out
    assert scores.compute_scores([_t("distilled", "soft", 0.8)]) == {}
    assert scores.compute_scores([]) == {}
    assert scores.scores_markdown({}) == ""


def test_seed_means_come_first():
    trials = [_t("full", "hard", 0.88, seed=0), _t("full", "hard", 0.92, seed=1),
              _t("distilled", "hard", 0.65, seed=0), _t("distilled", "hard", 0.75, seed=1),
              _t("distilled", "soft", 0.78, seed=0), _t("distilled", "soft", 0.82, seed=1),
              _t("random", "soft", 0.60, seed=0), _t("random", "soft", 0.90, seed=1)]
    s = scores.compute_scores(trials)["convnet"]
    soft = s["modes"]["soft"]
    # seed means 0.90, 0.70, 0.80, 0.75: the scores of the single-seed hand computation
    assert s["hlr"]["value"] == pytest.approx(0.20) and soft["ior"] == pytest.approx(0.05)
    assert soft["lrs"] == pytest.approx(0.238199, abs=1e-6)
    assert soft["inputs"]["random"] == {"mean": pytest.approx(0.75), "std": pytest.approx(0.15), "n": 2,
                                        "lr": 0.01}
    # scoring each seed first would give seed 0: α = 0.5·0.18 − 0.5·0.23 = −0.025 (LRS 0.258437),
    # seed 1: α = 0.5·(−0.08) − 0.5·0.17 = −0.125 (LRS 0.218949), mean 0.238693 — not what is reported
    per_seed = (scores.normalise(-0.025) + scores.normalise(-0.125)) / 2
    assert per_seed == pytest.approx(0.238693, abs=1e-6)
    assert abs(per_seed - soft["lrs"]) > 4e-4


def test_best_lr_is_used_as_in_the_table():
    trials = _base() + [dict(_t("random", "soft", 0.78), lr=0.1)]
    assert scores.compute_scores(trials)["convnet"]["modes"]["soft"]["ior"] == pytest.approx(0.02)


def test_ars_by_hand():
    trials = [_t("distilled", "soft", 0.80), _t("random", "soft", 0.75),            # no dsa field: aug
              _t("distilled", "soft", 0.70, dsa=False), _t("random", "soft", 0.60, dsa=False)]
    s = scores.compute_scores(trials, default_dsa=True)["convnet"]
    # gaps 0.80 − 0.75 = 0.05 (aug) and 0.70 − 0.60 = 0.10 (no aug); β = 0.5·0.05 + 0.5·0.10 = 0.075
    # ARS = (e^0.075 − e^−1)/(e − e^−1) = (1.077884 − 0.367879)/2.350402 = 0.302078
    a = s["ars"]["soft"]
    assert a["gap_aug"] == pytest.approx(0.05) and a["gap_no_aug"] == pytest.approx(0.10)
    assert a["beta"] == pytest.approx(0.075) and a["ars"] == pytest.approx(0.302078, abs=1e-6)
    # IOR uses the sweep's setting (aug); with evaluate.dsa off the unmarked trials count as no-aug,
    # so both sets of trials are no-aug and ARS has no augmented side
    assert s["modes"]["soft"]["ior"] == pytest.approx(0.05)
    off = scores.compute_scores(trials, default_dsa=False)["convnet"]
    assert "ars" not in off and off["modes"]["soft"]["inputs"]["random"]["n"] == 2
    # ARS needs all four cells
    assert "ars" not in scores.compute_scores(trials[:3], default_dsa=True)["convnet"]


def test_markdown_rows():
    trials = _base() + [_t("distilled", "soft", 0.70, dsa=False), _t("random", "soft", 0.60, dsa=False),
                        _t("distilled", "soft", 0.5, arch="mlp")]
    md = scores.scores_markdown(scores.compute_scores(trials), ["convnet", "mlp"]).splitlines()
    assert md[0] == "| architecture | HLR | IOR (mode) | LRS | ARS |"
    # soft: ARS β = 0.5·0.05 + 0.5·0.10 = 0.075 → 30.21
    assert md[2:] == ["| convnet | 20.00 | +10.00 (hard) | 24.82 | — |",
                      "| convnet | 20.00 | +5.00 (soft) | 23.82 | 30.21 |"]
