"""Curves of every stage: a small scalar writer for teachers and distillation, Tune's own logger
callbacks for evaluation, and the schedule of the distillation's grid snapshots.

:class:`Curves` writes one wide CSV per run of a stage (``RUN/curves/teachers/teacher-NNN/``,
``RUN/curves/distill/group-GGG/``: ``curves.csv``, one row per step) and, with
``tracking.tensorboard``, TensorBoard event files beside it, so ``tensorboard --logdir RUN`` shows
teachers, groups and the evaluation trials (Tune writes those under RUN/eval/tune) side by side.
MLflow and W&B are optional packages: asking for one that is not installed is a one-line
:class:`ConfigError` when the config is validated, before any compute.

A resumed group continues its curves from its checkpoint: rows after it are dropped from the CSV
(they are recomputed) and TensorBoard is told to purge them (``purge_step``).
"""
from __future__ import annotations

import csv
import importlib.util
import io
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import ConfigError
from .io import write_text

CSV_FILE = "curves.csv"
CURVES_DIR = "curves"
SNAPSHOTS_PER_RUN = 5          # tracking.snapshot_every: null = about this many over the rounds
TEACHER_EVAL_POINTS = 10       # a teacher's test accuracy is measured at about this many epochs
_PACKAGES = {"mlflow": ("mlflow", "an MLflow tracking URI"), "wandb": ("wandb", "a W&B project")}


def curves_dir(run_dir: str | os.PathLike, stage: str, name: str) -> Path:
    """RUN/curves/STAGE/NAME: one TensorBoard run per teacher or group."""
    return Path(run_dir) / CURVES_DIR / stage / name


def require_backends(tracking: Any, key: str = "tracking") -> None:
    """Refuse ``tracking.mlflow`` / ``tracking.wandb`` when their package cannot be imported."""
    for name, (package, what) in _PACKAGES.items():
        value = getattr(tracking, name, None)
        if value is not None and importlib.util.find_spec(package) is None:
            raise ConfigError(f"{key}.{name}: {value!r} needs the {package} package, which is not installed; "
                              f"pip install {package}, or set {key}.{name}: null")
    if getattr(tracking, "tensorboard", False) and not any(
            importlib.util.find_spec(m) is not None for m in ("tensorboardX", "tensorboard")):
        raise ConfigError(f"{key}.tensorboard: true needs tensorboardX (pip install tensorboardX) or "
                          f"tensorboard; install one, or set {key}.tensorboard: false")


def _summary_writer() -> Any:
    """tensorboardX's SummaryWriter (Ray Tune's dependency), else torch's; None when neither imports."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
    return SummaryWriter


def _scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a stats dict, nested dicts as ``a/b``, booleans as 0/1; text is left out."""
    out: dict[str, float] = {}
    for k, v in values.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_scalars(v, name + "/"))
        elif isinstance(v, (bool, int, float)) or (hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1):
            out[name] = float(v.item() if hasattr(v, "item") else v)
    return out


class Curves:
    """Scalars by step: ``DIR/curves.csv`` (columns ``step``, ``wall_time`` and one per scalar) and,
    when asked for, TensorBoard events in DIR, an MLflow run and a W&B run.

    ``start``: the step the stage resumes from; rows after it are dropped (a fresh start, 0, also
    deletes earlier event files). Values logged for the same step are merged into one row, which is
    written once the next step begins (or at :meth:`close`).
    """

    def __init__(self, directory: str | os.PathLike, *, tracking: Any = None, start: int = 0,
                 name: str | None = None, group: str | None = None, params: Mapping[str, Any] | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / CSV_FILE
        self.name = name or self.dir.name
        self.fields: list[str] = []
        self.row: dict[str, float] = {}
        self.step: int | None = None
        self.time = time.time()
        self._keep(start, fresh=start <= 0)
        self.tb = self.mlflow = self.wandb = None
        if getattr(tracking, "tensorboard", False):
            self._open_tensorboard(purge=start + 1 if start > 0 else None)
        if getattr(tracking, "mlflow", None):
            self._open_mlflow(tracking.mlflow, group or self.dir.parent.name, params)
        if getattr(tracking, "wandb", None):
            import wandb
            self.wandb = wandb.init(project=tracking.wandb, group=group or self.dir.parent.name, name=self.name,
                                    config=dict(params or {}), dir=str(self.dir), reinit=True)

    # -------------------------------------------------------------- CSV
    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        if not self.path.exists():
            return [], []
        with self.path.open(newline="") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)

    def _rewrite(self, fields: list[str], rows: list[dict[str, Any]]) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        write_text(self.path, buf.getvalue())
        self.fields = fields

    def _keep(self, start: int, fresh: bool) -> None:
        """Rows up to ``start`` only: those after it will be logged again."""
        fields, rows = self._read()
        if fresh:
            for old in self.dir.glob("events.out.tfevents.*"):
                old.unlink()
            fields, rows = [], []
        self._rewrite(fields or ["step", "wall_time"], [r for r in rows if _step(r) <= start])

    def _write_row(self) -> None:
        if self.step is None or not self.row:
            return
        new = [k for k in self.row if k not in self.fields]
        if new:  # a scalar first seen now: the header grows, earlier rows read empty there
            _, rows = self._read()
            self._rewrite(self.fields + sorted(new), rows)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore", lineterminator="\n").writerow(
                {"step": self.step, "wall_time": f"{self.time:.3f}", **{k: _fmt(v) for k, v in self.row.items()}})
        self.row = {}

    # -------------------------------------------------------------- backends
    def _open_tensorboard(self, purge: int | None) -> None:
        """``purge``: TensorBoard drops the earlier files' events from this step on."""
        writer = _summary_writer()
        if writer is None:  # validated configs never get here
            raise ConfigError("tracking.tensorboard: true needs tensorboardX or tensorboard installed")
        # a file of its own per writer: the default name (seconds, host) repeats within one second
        self.tb = writer(str(self.dir), purge_step=purge, flush_secs=10,
                         filename_suffix=f".{os.getpid()}.{time.monotonic_ns()}")

    def _open_mlflow(self, uri: str, experiment: str, params: Mapping[str, Any] | None) -> None:
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
        run = client.create_run(exp_id, run_name=self.name)
        for k, v in (params or {}).items():
            client.log_param(run.info.run_id, k, v)
        self.mlflow = (client, run.info.run_id)

    # -------------------------------------------------------------- API
    def log(self, step: int, values: Mapping[str, Any]) -> None:
        """The numeric entries of ``values`` (nested dicts flattened) at ``step``."""
        scalars = {k: v for k, v in _scalars(values).items() if k not in ("step", "wall_time")}
        if self.step is not None and step != self.step:
            self._write_row()
        if not self.row:
            self.time = time.time()   # the step's first value
        self.step = int(step)
        self.row.update(scalars)
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, global_step=self.step)
        if self.mlflow is not None:
            client, run_id = self.mlflow
            for k, v in scalars.items():
                if math.isfinite(v):
                    client.log_metric(run_id, k.replace("/", "."), v, step=self.step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=self.step)

    def rewind(self, step: int) -> None:
        """Back to ``step`` (a rollback to a checkpoint): later rows are dropped, TensorBoard purges them."""
        self.row, self.step = {}, None
        self._keep(step, fresh=False)
        if self.tb is not None:
            self.tb.close()
            self._open_tensorboard(purge=step + 1)

    def flush(self) -> None:
        self._write_row()
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        self.flush()
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.mlflow is not None:
            client, run_id = self.mlflow
            client.set_terminated(run_id)
            self.mlflow = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def __enter__(self) -> "Curves":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _step(row: Mapping[str, str]) -> int:
    try:
        return int(float(row.get("step") or 0))
    except ValueError:
        return 0


def _fmt(v: float) -> str:
    return repr(float(v)) if not float(v).is_integer() or abs(v) >= 1e15 else str(int(v))


def read_curves(directory: str | os.PathLike) -> list[dict[str, float]]:
    """``curves.csv`` of DIR as rows of floats (empty cells left out)."""
    with (Path(directory) / CSV_FILE).open(newline="") as f:
        return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]


# ------------------------------------------------------------------ stage helpers

def epoch_logger(curves: Curves, measure: Callable[[], float], epochs: int,
                 then: Callable[[int, float], None] | None = None) -> Callable[[int, float], None]:
    """A ``train_classifier`` progress callback: training loss every epoch, test accuracy
    (``measure()``) at about ``TEACHER_EVAL_POINTS`` epochs; the last epoch's accuracy is left to the
    caller, who measures it anyway. ``then`` is the progress callback it wraps."""
    every = max(1, math.ceil(epochs / TEACHER_EVAL_POINTS))

    def progress(epoch: int, loss: float) -> None:
        values = {"train_loss": loss}
        if epoch % every == 0 and epoch < epochs:
            values["test_acc"] = measure()
        curves.log(epoch, values)
        if then is not None:
            then(epoch, loss)
    return progress


def snapshot_every(tracking: Any, rounds: int) -> int:
    """Rounds between grid snapshots: ``tracking.snapshot_every``, or about ``SNAPSHOTS_PER_RUN``
    over the run; 0: none."""
    every = getattr(tracking, "snapshot_every", None)
    if every is None:
        every = max(1, math.ceil(rounds / SNAPSHOTS_PER_RUN))
    return int(every)


def snapshot_due(round_: int, rounds: int, every: int) -> bool:
    """The initial images, every ``every`` rounds and the last round."""
    return every > 0 and (round_ % every == 0 or round_ == rounds)


# ------------------------------------------------------------------ evaluation (Ray Tune)

def tune_callbacks(tracking: Any) -> list[Any]:
    """Ray Tune's own logger callbacks for ``tracking``: CSV and JSON always, TensorBoard (TBX) when
    ``tracking.tensorboard``, MLflow and W&B when configured. Tune adds CSV/JSON/TBX by itself unless
    ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1``; ``tensorboard: false`` sets that variable, so the
    callbacks returned here are then all there is."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    require_backends(tracking)
    callbacks: list[Any] = [CSVLoggerCallback(), JsonLoggerCallback()]
    if getattr(tracking, "tensorboard", True):
        from ray.tune.logger import TBXLoggerCallback
        callbacks.append(TBXLoggerCallback())
    else:
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    if getattr(tracking, "mlflow", None):
        from ray.air.integrations.mlflow import MLflowLoggerCallback
        callbacks.append(MLflowLoggerCallback(tracking_uri=tracking.mlflow, experiment_name="raydd-evaluate"))
    if getattr(tracking, "wandb", None):
        from ray.air.integrations.wandb import WandbLoggerCallback
        callbacks.append(WandbLoggerCallback(project=tracking.wandb, group="evaluate"))
    return callbacks
