"""Progress output: Ray's start lines, the distillation ETA clock, the loss explained once, and the
evaluation's epoch lines and architecture-weighted ETA. No Ray is started here (fakes stand in)."""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from raydd.config import RayConfig, from_dict
from raydd.distillation import LiveView, runner
from raydd.evaluate import tune_run
from raydd.evaluate.tune_run import trial_fraction, trial_lines, weighted_eta


class Clock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# ---------------------------------------------------------------------------- Ray start lines

@pytest.fixture
def fake_ray(monkeypatch):
    import ray

    from raydd import raycluster
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": False}])
    monkeypatch.setattr(raycluster, "_record_local_ray", lambda: None)
    monkeypatch.setattr(raycluster, "private_token", lambda: None)
    monkeypatch.setattr(raycluster, "_probe", lambda address: None)
    return raycluster, calls


def test_local_ray_start_says_what_it_starts_and_when_it_is_up(fake_ray, capsys):
    raycluster, calls = fake_ray
    raycluster.init_ray(RayConfig(num_cpus=2))
    err = capsys.readouterr().err.splitlines()
    assert calls and err[0] == "[ray] starting a local Ray (2 CPUs) …"
    assert err[1].startswith("[ray] local Ray up: 1 node, 2 CPUs, 1 GPU (") and err[1].endswith(" s)")
    assert len(err) == 2


def test_joining_a_cluster_says_where_and_quiet_init_says_nothing(fake_ray, capsys):
    raycluster, _ = fake_ray
    raycluster.init_ray(RayConfig(address="10.0.0.1:6379"))
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "[ray] connecting to the Ray cluster at 10.0.0.1:6379 …"
    assert err[1].startswith("[ray] connected to Ray at 10.0.0.1:6379: 1 node, 2 CPUs")
    raycluster.init_ray(RayConfig(num_cpus=1), progress=False)
    assert capsys.readouterr().err == ""


def test_teacher_rate_counts_from_the_first_finished_epoch(monkeypatch, capsys):
    from raydd.teachers import _Progress
    clock = Clock(0.0)
    monkeypatch.setattr(time, "time", clock)
    bar = _Progress(True, [0, 1], 10, every=0.0)
    clock.t = 100.0                  # Ray's start and the tasks' data loading took 100 s
    bar.update({0: 1})
    clock.t = 110.0
    bar.update({0: 1, 1: 10})        # then 10 epochs in 10 s
    last = capsys.readouterr().err.strip().splitlines()[-1]
    # from the bar's creation it would be 6.0 epochs/min and an ETA of 90 s
    assert last.startswith("[teachers] 0/2 done, 11/20 epochs, 60.0 epochs/min, ETA 9s"), last


# ---------------------------------------------------------------------------- distillation

def _plans(n: int, rounds: int):
    return [SimpleNamespace(index=i, rounds=rounds, final_path=Path("/nonexistent/final"),
                            read_progress=lambda: {"round": 0}) for i in range(n)]


def test_eta_clock_starts_at_the_first_finished_round(monkeypatch, capsys):
    clock = Clock(0.0)
    monkeypatch.setattr(time, "monotonic", clock)
    view = LiveView(_plans(1, 100), True)
    base = {"group": 0, "rounds": 100, "pid": 1, "host": "h", "node": None}
    clock.t = 5.0
    view.handle({**base, "kind": "start", "round": 0, "start": 1})
    clock.t = 100.0              # Ray, the service and the worker's set-up took 100 s
    view.handle({**base, "kind": "round", "round": 1, "loss": -1.0, "rate": 0.0})
    clock.t = 110.0              # then 10 rounds in 10 s
    view.handle({**base, "kind": "round", "round": 11, "loss": -2.0, "rate": 1.0})
    view.refresh(force=True)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    # a clock from the view's creation would say 0.10 rounds/s and an ETA of 15 minutes
    assert "[distill] 11/100 rounds (11%) 1.00 rounds/s ETA 0:01:29" in last, last


def _write_teachers(run: Path, digits: str, n: int = 2) -> None:
    """Untrained teacher files in RUN/teachers (no Ray): enough for the loop's output."""
    import torch

    from raydd.data import load_info
    from raydd.models import build
    from raydd.teacher_index import TEACHERS_DIR, save_teacher, write_index
    out = run / TEACHERS_DIR
    out.mkdir(parents=True)
    info = load_info(digits)
    records = {}
    for i in range(n):
        torch.manual_seed(i)
        net = build("convnet:width=8", info.in_channels, info.num_classes, info.image_size)
        want = {"spec": net.spec, "seed": i, "num_classes": info.num_classes, "in_channels": info.in_channels,
                "image_size": info.image_size, "shape": list(info.shape)}
        records[i] = save_teacher(out, i, net.state_dict(), 0.1, 0.0, 0.0, want)
    write_index(out, {"source": info.source, "classes": info.classes, "shape": list(info.shape)}, records)


def test_loss_is_explained_exactly_once_at_the_start(digits, tmp_path, capfd):
    cfg = from_dict({"data": {"source": "digits", "dir": digits, "dsa_strategy": "color_crop_cutout_scale_rotate"},
                     "device": "cpu", "teachers": {"arch": "convnet:width=8", "count": 2},
                     "distill": {"ipc": 2, "groups": 2, "rounds": 3, "student_epochs": 2, "checkpoints": 2,
                                 "checkpoint_every": 1, "student_batch": 64}})
    run = tmp_path / "run"
    _write_teachers(run, digits)
    capfd.readouterr()
    runner.run_distill(cfg, run, progress=True, backend="local")
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "loss (APM, Eq. 4)" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("[distill] loss (APM, Eq. 4) = 0.1·CE(teacher, label) − Σ over K=2")
    assert "negative by design" in lines[0] and "disagreement" in lines[0]
    assert err.index("loss (APM") < err.index("[distill] 6/6 rounds")   # before the rounds, not after


def test_loss_explanation_follows_the_objective_and_the_method():
    cfg = from_dict({"distill": {"objective": "log", "distance": "l2", "alpha": 0.5}})
    assert "0.5·CE(teacher, label) − Σ over K=5 student checkpoints of log d_l2(student_k, teacher)" \
        in runner.loss_explanation(cfg)
    hmdc = from_dict({"distill": {"method": "hmdc"}})
    assert runner.loss_explanation(hmdc).startswith("loss (HMDC) = L1 + L2 + L3")
    assert "negative" not in runner.loss_explanation(hmdc)


# ---------------------------------------------------------------------------- evaluation

def test_weighted_eta_counts_slow_architectures_more():
    finished = [("mlp", 10.0), ("resnet18", 100.0)]      # 110 s of trials in 110 s of wall time
    assert weighted_eta(110.0, finished, [("resnet18", 0.0)]) == pytest.approx(100.0)
    assert weighted_eta(110.0, finished, [("mlp", 0.0)]) == pytest.approx(10.0)
    # an architecture with no finished trial falls back to the mean of all (55 s)
    assert weighted_eta(110.0, finished, [("vgg11", 0.0)]) == pytest.approx(55.0)
    # half of a running ResNet trial is done work and half is left: 110 s / 160 work-s × 50 work-s
    assert weighted_eta(110.0, finished, [("resnet18", 0.5)]) == pytest.approx(110 * 50 / 160)
    # two trials at a time: 110 s of trials in 55 s of wall time halves the ETA
    assert weighted_eta(55.0, finished, [("resnet18", 0.0)]) == pytest.approx(50.0)
    assert weighted_eta(10.0, [], [("mlp", 0.0)]) is None
    assert weighted_eta(110.0, finished, []) == 0.0


def test_trial_fraction_counts_both_phases_of_kd():
    assert trial_fraction("soft", {"phase": "train", "epoch": 40, "total_epochs": 100}) == 0.4
    assert trial_fraction("kd", {"phase": "teacher", "epoch": 50, "total_epochs": 100}) == 0.25
    assert trial_fraction("kd", {"phase": "train", "epoch": 50, "total_epochs": 100}) == 0.75
    assert trial_fraction("soft", {"phase": "train", "epoch": 4}) == 0.0


def test_long_trials_show_their_epoch_and_the_eta_weighs_architectures(monkeypatch, capsys):
    clock = Clock(1000.0)
    monkeypatch.setattr(time, "time", clock)
    plan = {"synset/soft resnet18 s0": {"label": "synset/soft resnet18 s0", "arch": "resnet18", "mode": "soft"},
            "synset/soft mlp s0": {"label": "synset/soft mlp s0", "arch": "mlp", "mode": "soft"},
            "synset/soft mlp s1": {"label": "synset/soft mlp s1", "arch": "mlp", "mode": "soft"}}
    lines = trial_lines(plan, ["resnet18", "mlp", "mlp"])
    trial = lambda label, last=None: SimpleNamespace(trial_id=label, config={"trial": label},  # noqa: E731
                                                     last_result=last or {}, error_file=None)
    resnet, mlp0 = trial("synset/soft resnet18 s0"), trial("synset/soft mlp s0")
    lines.on_trial_start(0, [], resnet)
    lines.on_trial_start(0, [], mlp0)
    clock.t = 1010.0
    lines.on_trial_result(0, [], resnet, {"phase": "train", "epoch": 10, "total_epochs": 100})
    assert capsys.readouterr().out == ""                 # a short stretch prints nothing
    clock.t = 1040.0
    lines.on_trial_result(0, [], resnet, {"phase": "train", "epoch": 40, "total_epochs": 100})
    out = capsys.readouterr().out.strip()
    assert out == "[evaluate] synset/soft resnet18 s0: epoch 40/100 (40s in; sweep ETA ?)", out
    clock.t = 1045.0
    lines.on_trial_result(0, [], resnet, {"phase": "train", "epoch": 50, "total_epochs": 100})
    assert capsys.readouterr().out == ""                 # at most one line per trial every 30 s
    clock.t = 1050.0
    lines.on_trial_complete(0, [], trial("synset/soft mlp s0", {"test_acc": 0.5, "seconds": 5,
                                                                 "time_total_s": 5.0}))
    out = capsys.readouterr().out.strip()
    # work done: the MLP's 5 s + half the ResNet (expected 5 s, the only mean yet) = 7.5 s in 50 s of
    # wall time; work left: the other half + one MLP = 7.5 s, so 50 s
    assert out.startswith("[evaluate] 1/3 trials (50s, ETA 50s) · synset/soft mlp s0: 50.00% in 5s"), out
    clock.t = 1100.0
    lines.on_trial_complete(0, [], trial("synset/soft resnet18 s0", {"test_acc": 0.6, "seconds": 95,
                                                                      "time_total_s": 100.0}))
    capsys.readouterr()
    # the last MLP is expected to take the MLPs' 5 s, not the 52.5 s mean of all trials
    assert lines.eta() == pytest.approx(100.0 * 5 / 105)
    assert tune_run.EPOCH_LINE_EVERY_S == 30.0
