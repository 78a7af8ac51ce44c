"""Curves of every stage: the CSV/TensorBoard writer, teachers' and groups' curves, resumed without
duplicate rows, grid snapshots, the tracking config and Tune's logger callbacks."""
from __future__ import annotations

import importlib.util
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch

from raydd.config import from_dict
from raydd.config.schema import TrackingConfig
from raydd.errors import ConfigError
from raydd.io import read_json
from raydd.methods import Services
from raydd.services import LocalService
from raydd.tracking import Curves, read_curves, tune_callbacks

DATA = {"source": "digits", "dsa_strategy": "color_crop_cutout_scale_rotate"}
TEACHERS = {"arch": "convnet:width=8", "count": 1, "epochs": 3, "lr": 0.05, "batch_size": 128,
            "resources": {"cpus": 1}}
DISTILL = {"ipc": 2, "groups": 1, "rounds": 6, "student_epochs": 2, "checkpoints": 1, "checkpoint_every": 2,
           "lr_net": 0.05, "student_batch": 64}


def config(digits, **tracking):
    return from_dict({"data": {**DATA, "dir": digits}, "device": "cpu", "teachers": TEACHERS,
                      "distill": DISTILL, "tracking": {"snapshot_every": 2, **tracking}})


def events(directory: Path) -> list:
    """Every event of DIR's TensorBoard files, in file order (TFRecord: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2
    out = []
    for f in sorted(directory.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns):
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event()
            ev.ParseFromString(data[i + 12:i + 12 + n])
            out.append(ev)
            i += 12 + n + 4
    return out


def scalars(evs) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for ev in evs:
        for v in ev.summary.value:
            out.setdefault(v.tag, {})[ev.step] = v.simple_value
    return out


# ---------------------------------------------------------------------------- the writer

def test_curves_write_csv_and_tensorboard_events(tmp_path):
    d = tmp_path / "c"
    with Curves(d, tracking=TrackingConfig()) as c:
        for step in (1, 2, 3):
            c.log(step, {"loss": 1.0 / step, "seconds": {"image": 0.25}, "refreshed": step == 1, "spec": "text"})
        c.log(3, {"test_acc": 0.5})                 # same step: one row
        c.log(4, {"loss": 0.125, "extra": 7})       # a new column: the header grows
    rows = read_curves(d)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [1.0, 0.5, pytest.approx(1 / 3), 0.125]
    assert rows[2]["test_acc"] == 0.5 and "test_acc" not in rows[0] and rows[3]["extra"] == 7
    assert rows[0]["seconds/image"] == 0.25 and rows[0]["refreshed"] == 1 and rows[1]["refreshed"] == 0
    assert "spec" not in (d / "curves.csv").read_text()  # text is not a curve
    tb = scalars(events(d))
    assert tb["loss"] == {1: 1.0, 2: 0.5, 3: pytest.approx(1 / 3), 4: 0.125}
    assert tb["test_acc"] == {3: 0.5} and tb["seconds/image"][2] == 0.25

    # resumed from step 2: rows 3 and 4 are dropped and logged again, TensorBoard purges them
    with Curves(d, tracking=TrackingConfig(), start=2) as c:
        c.log(3, {"loss": 9.0})
    assert [(r["step"], r["loss"]) for r in read_curves(d)] == [(1, 1.0), (2, 0.5), (3, 9.0)]
    evs = events(d)
    assert len(list(d.glob("events.out.tfevents.*"))) == 2
    assert any(ev.session_log.status == ev.session_log.START and ev.step == 3 for ev in evs)

    # a fresh start forgets everything; without tensorboard only the CSV is written
    with Curves(d, tracking=TrackingConfig(tensorboard=False)) as c:
        c.log(1, {"loss": 2.0})
    assert read_curves(d) == [{"step": 1, "wall_time": read_curves(d)[0]["wall_time"], "loss": 2.0}]
    assert not list(d.glob("events.out.tfevents.*"))


def test_tracking_config_and_tune_callbacks(digits, monkeypatch):
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    with pytest.raises(ConfigError, match=r"tracking.snapshot_every: -1 is invalid"):
        config(digits, snapshot_every=-1)
    with pytest.raises(ConfigError, match="tracking"):
        config(digits, tensorbord=True)
    for key, package in (("mlflow", "mlflow"), ("wandb", "wandb")):
        if importlib.util.find_spec(package) is None:
            with pytest.raises(ConfigError, match=rf"tracking.{key}: 'x' needs the {package} package"):
                config(digits, **{key: "x"})
        else:
            assert getattr(config(digits, **{key: "x"}).tracking, key) == "x"
    kinds = [type(c) for c in tune_callbacks(TrackingConfig())]
    assert kinds == [CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback]
    monkeypatch.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0")   # restored after the test
    kinds = [type(c) for c in tune_callbacks(TrackingConfig(tensorboard=False))]
    assert kinds == [CSVLoggerCallback, JsonLoggerCallback]
    import os
    assert os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == "1"   # Tune adds no TBX of its own
    from raydd.evaluate.tune_run import scoped_environ
    before = dict(os.environ)
    with scoped_environ():   # how run_evaluation calls it: the switch lasts for its sweep only
        tune_callbacks(TrackingConfig(tensorboard=False))
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    assert dict(os.environ) == before


# ---------------------------------------------------------------------------- teachers

@pytest.fixture(scope="module")
def teachers(digits, ray_local, tmp_path_factory):
    from raydd.teachers import train_teachers
    run = tmp_path_factory.mktemp("tracking-run")
    records = train_teachers(config(digits), run, progress=False)
    return run, records


@pytest.mark.ray
def test_teacher_curves(teachers):
    run, records = teachers
    d = run / "curves" / "teachers" / "teacher-000"
    rows = read_curves(d)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["train_loss"]) and r["train_loss"] > 0 for r in rows)
    assert all(0 <= r["test_acc"] <= 1 for r in rows)   # 3 epochs: measured after each
    assert rows[-1]["test_acc"] == pytest.approx(records[0]["test_acc"])
    assert scalars(events(d))["train_loss"][3] == pytest.approx(rows[-1]["train_loss"], rel=1e-6)


def test_measuring_a_teacher_changes_no_weight(digits, tmp_path):
    from raydd.data import load_info
    from raydd.teachers import Recipe, train_one_teacher
    recipe = Recipe(epochs=2, lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=128,
                    dsa="color_crop_cutout_scale_rotate", zca=False)
    info = load_info(digits)
    plain, acc = train_one_teacher("convnet:width=8", info, 3, recipe)
    with Curves(tmp_path / "t", tracking=TrackingConfig(tensorboard=False)) as c:
        tracked, acc2 = train_one_teacher("convnet:width=8", info, 3, recipe, curves=c)
    assert acc == acc2 and all(torch.equal(plain[k], tracked[k]) for k in plain)
    assert [r["step"] for r in read_curves(tmp_path / "t")] == [1, 2]


# ---------------------------------------------------------------------------- distillation

class InterruptedService(LocalService):
    """Interrupts the run (as a Ctrl-C would) on the ``at``-th ``input_grad`` call: one per round."""

    def __init__(self, models, at):
        super().__init__(models)
        self.calls, self.at = 0, at

    def input_grad(self, x, grad_logits, model):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return super().input_grad(x, grad_logits, model)


@pytest.mark.ray
def test_distill_curves_resume_without_duplicates_and_snapshots(digits, teachers, tmp_path):
    from raydd.data import load_info
    from raydd.distillation import DataShape, distill_group, initial_images, plan_groups, run_distill
    from raydd.teachers import load_teachers

    src, _ = teachers
    run = tmp_path / "run"
    shutil.copytree(src / "teachers", run / "teachers")
    cfg = config(digits)
    plan = plan_groups(cfg, run)[0]
    init = initial_images(cfg, load_info(digits), [plan])[0]
    models = load_teachers(run)[0]
    # round 4 is interrupted: the CSV then holds rounds 1-3, the checkpoint is at round 2
    with pytest.raises(KeyboardInterrupt):
        distill_group(cfg, plan, init, Services(InterruptedService(models, at=4)), DataShape(1, 10, 8))
    curves = run / "curves" / "distill" / "group-000"
    assert [r["step"] for r in read_curves(curves)] == [1, 2, 3]
    result = run_distill(cfg, run, progress=False, backend="local")   # resumes from round 2
    assert read_json(plan.progress_path)["starts"] == [0, 2]
    rows = read_curves(curves)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]             # no round twice
    terms = {"loss", "refreshed", "teacher", "seconds/student", "seconds/image", "seconds/service"}
    assert terms <= set(rows[0]) and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] == pytest.approx(read_json(plan.progress_path)["loss"])
    assert sorted(scalars(events(curves))["loss"]) == [1, 2, 3, 4, 5, 6]
    snaps = sorted(p.name for p in (plan.directory / "snapshots").glob("*.png"))
    assert snaps == [f"round-{r:06d}.png" for r in (0, 2, 4, 6)]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in (plan.directory / "snapshots").iterdir())
    assert result.grid_path.exists()
    from raydd.distillation.aggregate import grid_title
    assert grid_title(cfg, "digits") == "digits · IPC 2 · apm"   # the final grid's and every snapshot's title
