"""The config schema: one dataclass per section, each validating its own values.

Every check raises :class:`ConfigError` with one line naming the dotted key; architecture
specs are checked against the model registry, so a typo fails before any compute.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from ..errors import ConfigError, brief
from .hmdc import HMDCConfig


@dataclass
class Resources:
    """Ray resources of one task or actor; ``gpus`` may be fractional to share a GPU."""
    cpus: float = 1.0
    gpus: float = 0.0

    def copies_in(self, total: dict[str, float]) -> int:
        """How many tasks of these resources fit at once in ``total`` (``ray.cluster_resources()``)."""
        fit = math.floor(total.get("CPU", 0) / self.cpus + 1e-9)
        if self.gpus > 0:
            fit = min(fit, math.floor(total.get("GPU", 0) / self.gpus + 1e-9))
        return fit

    def validate(self, key: str) -> None:
        _check(self.cpus > 0, f"{key}.cpus", self.cpus, "a positive number of CPUs")
        _check(self.gpus >= 0, f"{key}.gpus", self.gpus, "a non-negative number of GPUs")


@dataclass
class DataConfig:
    source: Literal["digits", "fashion-mnist", "cifar10", "cifar100", "tiny-imagenet", "imagefolder"] = "digits"
    src: Optional[str] = None          # raw input for `data prepare`; None = the source's default
    dir: str = "data/digits"           # shard directory or URL prefix (http(s)://, file://, pipe:)
    image_size: Optional[int] = None   # resize on prepare (imagefolder); None = native
    shard_size: int = 10000            # samples per shard
    verify: bool = True                # check shard sha256 against dataset.json while reading
    on_corrupt: Literal["fail", "skip"] = "fail"
    zca: bool = False                  # ZCA whitening (CIFAR), fitted on the training split
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"

    def validate(self, key: str) -> None:
        _check(self.shard_size >= 1, f"{key}.shard_size", self.shard_size, "an integer >= 1")
        _check(self.image_size is None or 4 <= self.image_size <= 512, f"{key}.image_size",
               self.image_size, "null or an integer in [4, 512]")
        from ..augment import validate_strategy
        validate_strategy(self.dsa_strategy, f"{key}.dsa_strategy")


@dataclass
class RayConfig:
    address: Optional[str] = None      # None: start a local Ray; "auto": join the running cluster
    num_cpus: Optional[int] = None     # for a local Ray only
    num_gpus: Optional[int] = None

    def validate(self, key: str) -> None:
        # a malformed address is refused here: Ray would retry it until the connect deadline
        _check(self.address is None or bool(RAY_ADDRESS.fullmatch(self.address)), f"{key}.address", self.address,
               "null (a local Ray), 'auto', or HOST:PORT of a running head node, e.g. 10.0.0.1:6379 "
               "(ray://HOST:PORT for Ray Client)")
        _check(self.num_cpus is None or self.num_cpus >= 1, f"{key}.num_cpus", self.num_cpus, "null or an integer >= 1")
        _check(self.num_gpus is None or self.num_gpus >= 0, f"{key}.num_gpus", self.num_gpus, "null or an integer >= 0")


@dataclass
class TeachersConfig:
    arch: str = "convnet"
    count: int = 4
    epochs: int = 10
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    dsa: bool = True
    precision: Literal["fp32", "bf16"] = "fp32"   # bf16: forwards under autocast, fp32 weights and optimiser
    max_retries: int = 2
    resources: Resources = field(default_factory=Resources)

    def validate(self, key: str) -> None:
        _positive(self, key, "count", "epochs", "batch_size", "lr")
        _check(self.max_retries >= -1, f"{key}.max_retries", self.max_retries, "an integer >= 0, or -1 for no limit")
        _sgd(self, key, "momentum", "weight_decay")
        self.resources.validate(f"{key}.resources")


@dataclass
class PoolConfig:
    """Student model pool (paper 002): main architecture with probability ``p_main``."""
    p_main: float = 1.0
    activations: list[str] = field(default_factory=lambda: ["relu", "sigmoid", "leakyrelu", "swish"])
    norms: list[str] = field(default_factory=lambda: ["instance", "batch", "layer", "group"])
    pools: list[str] = field(default_factory=lambda: ["avg", "max"])

    def validate(self, key: str) -> None:
        _check(0.0 <= self.p_main <= 1.0, f"{key}.p_main", self.p_main, "a probability in [0, 1]")


@dataclass
class ServiceConfig:
    """The Ray actor that hosts frozen teachers for all group workers."""
    name: Optional[str] = None         # None: derived from the run; set to share across runs
    max_batch: int = 1024              # coalesce concurrent requests up to this many images
    max_restarts: int = 3
    resources: Resources = field(default_factory=lambda: Resources(cpus=1.0, gpus=0.0))
    replicas: int = 1                  # copies of the service; group i uses copy i mod replicas

    def validate(self, key: str) -> None:
        _positive(self, key, "max_batch", "replicas")
        _check(self.max_restarts >= -1, f"{key}.max_restarts", self.max_restarts, "an integer >= 0, or -1 for no limit")
        self.resources.validate(f"{key}.resources")


@dataclass
class DistillConfig:
    method: str = "apm"                # a method registered in raydd.methods
    ipc: int = 10
    groups: int = 1
    rounds: int = 2500
    arch: Optional[str] = None         # student main architecture; None = teachers.arch
    student_epochs: int = 250          # E
    checkpoints: int = 5               # K
    refresh_every: int = 3             # a fresh student every this many rounds
    lr_net: float = 0.02               # eta
    student_batch: int = 256           # inner batch of student training
    lr_img: float = 1.0                # gamma
    momentum_img: float = 0.5
    lr_img_decay: float = 0.3          # multiply lr_img by this ...
    lr_img_decay_at: float = 0.5       # ... after this fraction of the rounds
    batch_size: Optional[int] = None   # B, images updated per round; None = the whole group
    segment: Optional[int] = None      # images per gradient segment; None = the whole mini-batch
    alpha: float = 0.1
    distance: Literal["l1", "l2", "cosine"] = "l1"
    objective: Literal["linear", "log"] = "linear"
    init: Literal["real", "noise"] = "real"
    dsa: bool = True
    soft_labels: Literal["first", "mean"] = "first"
    # students train under bf16 autocast (fp32 weights and optimiser); the image gradient stays fp32
    precision: Literal["fp32", "bf16"] = "fp32"
    checkpoint_every: int = 50
    # GBM (paper 004) between L_dd and MetaDD's term; its normalised step makes lr_img a pixel move
    balance: Literal["none", "gbm"] = "none"
    balance_every: int = 10            # rounds between samples of GBM's accumulators
    max_retries: int = 3
    pool: PoolConfig = field(default_factory=PoolConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    resources: Resources = field(default_factory=Resources)
    hmdc: HMDCConfig = field(default_factory=HMDCConfig)   # distill.method: hmdc only
    metadd: MetaDDConfig = field(default_factory=lambda: MetaDDConfig())   # the MetaDD loss term

    def validate(self, key: str) -> None:
        _positive(self, key, "ipc", "groups", "rounds", "student_epochs", "checkpoints",
                  "refresh_every", "lr_net", "student_batch", "lr_img", "checkpoint_every", "balance_every")
        _check(self.balance == "none" or self.metadd.enabled, f"{key}.balance", self.balance,
               "none, or gbm beside distill.metadd.enabled: true (it balances L_dd against MetaDD's term)")
        _check(self.max_retries >= -1, f"{key}.max_retries", self.max_retries, "an integer >= 0, or -1 for no limit")
        _check(self.groups <= self.ipc, f"{key}.groups", self.groups,
               f"at most distill.ipc={self.ipc} (each group needs at least one image per class)")
        _check(self.checkpoints <= self.student_epochs, f"{key}.checkpoints", self.checkpoints,
               f"at most student_epochs={self.student_epochs}")
        for name in ("batch_size", "segment"):
            v = getattr(self, name)
            _check(v is None or v >= 1, f"{key}.{name}", v, "null or an integer >= 1")
        _check(0 < self.lr_img_decay <= 1, f"{key}.lr_img_decay", self.lr_img_decay, "a factor in (0, 1]")
        _check(0 <= self.lr_img_decay_at <= 1, f"{key}.lr_img_decay_at", self.lr_img_decay_at,
               "a fraction in [0, 1]")
        _check(self.alpha >= 0, f"{key}.alpha", self.alpha, "a non-negative weight")
        _sgd(self, key, "momentum_img")
        from ..methods import check_method
        check_method(self, key)
        self.pool.validate(f"{key}.pool")
        self.service.validate(f"{key}.service")
        self.resources.validate(f"{key}.resources")
        self.hmdc.validate(f"{key}.hmdc")
        self.metadd.validate(f"{key}.metadd")


@dataclass
class KDConfig:
    alpha: float = 0.5
    temperature: float = 4.0
    teacher_arch: str = "convnet"      # trained on the synset first (paper 002)

    def validate(self, key: str) -> None:
        _check(0 <= self.alpha <= 1, f"{key}.alpha", self.alpha, "a weight in [0, 1]")
        _positive(self, key, "temperature")


@dataclass
class ELFConfig:
    feature_arch: str = "convnet:width=512"
    feature_epochs: int = 100
    lambda_front: float = 1.0
    lambda_rear: float = 1.0
    distance: Literal["ce", "l1", "l2", "cosine"] = "ce"

    def validate(self, key: str) -> None:
        _positive(self, key, "feature_epochs")
        for name in ("lambda_front", "lambda_rear"):
            _check(getattr(self, name) >= 0, f"{key}.{name}", getattr(self, name), "a non-negative weight")


@dataclass
class ModeArchs:
    """A mode limited to some of ``evaluate.archs`` (unset: all of them), e.g. the whole matrix in
    ``soft`` but ``kd``/``elf`` on three architectures — one sweep, one table. Entries outside
    ``archs`` and modes not in ``modes`` are ignored, so ``--set evaluate.archs=[…]`` narrows a sweep
    without editing this; a mode left with no architecture is an error."""
    hard: Optional[list[str]] = None
    soft: Optional[list[str]] = None
    kd: Optional[list[str]] = None
    elf: Optional[list[str]] = None

    def validate(self, key: str, archs: list[str], modes: list[str]) -> None:
        for mode in EVAL_MODES:
            only = getattr(self, mode)
            if only is None:
                continue
            _check(len(only) >= 1, f"{key}.{mode}", only, "a non-empty list of architectures")
            if mode in modes:
                _check(any(self.allows(mode, a) for a in archs), f"{key}.{mode}", only,
                       f"at least one of evaluate.archs ({', '.join(archs)})")

    def allows(self, mode: str, arch: str) -> bool:
        only = getattr(self, mode)
        return only is None or _canonical(arch) in {_canonical(a) for a in only}


def _canonical(spec: str) -> str:
    """Specs compare by canonical form; an unknown one compares as written (it is refused elsewhere)."""
    from ..errors import RayddError
    from ..models import canonical_spec
    try:
        return canonical_spec(spec)
    except RayddError:
        return spec


@dataclass
class EvalConfig:
    archs: list[str] = field(default_factory=lambda: ["convnet"])
    modes: list[str] = field(default_factory=lambda: ["soft"])
    mode_archs: ModeArchs = field(default_factory=ModeArchs)
    seeds: int = 3
    epochs: int = 300
    full_epochs: Optional[int] = None  # whole-training-set baseline; None = epochs
    lr: float = 0.01
    # lr per arch spec instead of lr (entries outside archs ignored): AlexNet diverges at BN nets' rates
    arch_lr: dict[str, float] = field(default_factory=dict)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    dsa: bool = True
    ars: bool = False   # every distilled and random trial also with DSA flipped, for DD-Ranking's ARS
    soft_loss: Literal["l1", "kl"] = "l1"
    soft_temperature: float = 1.0
    # hard mode on a stored set: CutMix with λ ~ Beta(β, β) on every batch after DSA, CE to the
    # area-mixed labels, never for ViTs (HMDC's evaluation, β = 1); null: off
    hard_cutmix: Optional[float] = None
    lr_search: Optional[list[float]] = None
    baselines: list[Literal["random", "full"]] = field(default_factory=lambda: ["random"])
    storage_path: Optional[str] = None  # None: RUN/eval/tune; a shared path on clusters
    # validation images held out of the real training split (class-balanced, fixed by the run seed):
    # None = 500 (at most a tenth of the split) when a scheduler/search needs a metric, else none
    val_size: Optional[int] = None
    report_every: Optional[int] = None  # epochs between a trial's intermediate reports; None: epochs/10
    max_concurrent: Optional[int] = None   # trials at once; None: what fits a local Ray, no cap on a cluster
    stack: int = 1   # hard/soft trials of one arch, lr and mode trained N at once as one wide net (evaluate.stacked)
    precision: Literal["fp32", "bf16"] = "fp32"   # bf16: forwards under autocast, fp32 weights and optimiser
    kd: KDConfig = field(default_factory=KDConfig)
    elf: ELFConfig = field(default_factory=ELFConfig)
    resources: Resources = field(default_factory=Resources)

    def validate(self, key: str) -> None:
        _check(len(self.archs) >= 1, f"{key}.archs", self.archs, "a non-empty list of architectures")
        for m in self.modes:
            _check(m in EVAL_MODES, f"{key}.modes", m, f"one of {', '.join(EVAL_MODES)}")
        _check(len(self.modes) >= 1, f"{key}.modes", self.modes, "a non-empty list of modes")
        _positive(self, key, "seeds", "epochs", "lr", "batch_size", "soft_temperature")
        _check(self.hard_cutmix is None or self.hard_cutmix > 0, f"{key}.hard_cutmix", self.hard_cutmix,
               "null (off) or a positive Beta parameter, e.g. 1.0")
        _sgd(self, key, "momentum", "weight_decay")
        _check(self.full_epochs is None or self.full_epochs >= 1, f"{key}.full_epochs", self.full_epochs,
               "null or an integer >= 1")
        _check(all(lr > 0 for lr in self.lr_search or []), f"{key}.lr_search", self.lr_search,
               "a list of positive learning rates")
        for arch, lr in self.arch_lr.items():
            _check(lr > 0, f"{key}.arch_lr.{arch}", lr, "a positive learning rate")
        _check(not (self.arch_lr and self.lr_search), f"{key}.arch_lr", self.arch_lr,
               "no per-architecture lr beside an lr_search (the search picks each architecture's lr)")
        _check(self.val_size is None or self.val_size >= 0, f"{key}.val_size", self.val_size,
               "null or an integer >= 0 (0: no validation split)")
        _check(self.report_every is None or self.report_every >= 1, f"{key}.report_every", self.report_every,
               "null or an integer >= 1")
        _check(self.max_concurrent is None or self.max_concurrent >= 1, f"{key}.max_concurrent",
               self.max_concurrent, "null (as many as the cluster provides) or an integer >= 1")
        _check(isinstance(self.stack, int) and self.stack >= 1, f"{key}.stack", self.stack, "an integer >= 1")
        self.kd.validate(f"{key}.kd")
        self.elf.validate(f"{key}.elf")
        self.mode_archs.validate(f"{key}.mode_archs", self.archs, self.modes)
        self.resources.validate(f"{key}.resources")

    def lr_of(self, arch: str) -> Optional[float]:
        """``arch``'s entry in ``arch_lr`` (by canonical spec); None: the sweep's lr."""
        return {_canonical(a): lr for a, lr in self.arch_lr.items()}.get(_canonical(arch))


@dataclass
class TrackingConfig:
    """Where the curves of every stage go besides RUN/curves/**/curves.csv (always written).
    Not a section any stage's results depend on: a run directory never compares it."""
    tensorboard: bool = True           # TensorBoard event files beside the CSVs (tensorboardX)
    mlflow: Optional[str] = None       # an MLflow tracking URI; needs the mlflow package
    wandb: Optional[str] = None        # a W&B project; needs the wandb package
    snapshot_every: Optional[int] = None  # rounds between grid snapshots; None: about 5 per run, 0: none

    def validate(self, key: str) -> None:
        _check(self.snapshot_every is None or self.snapshot_every >= 0, f"{key}.snapshot_every",
               self.snapshot_every, "null or an integer >= 0 (0 = no snapshots)")
        for name in ("mlflow", "wandb"):
            v = getattr(self, name)
            _check(v is None or bool(v.strip()), f"{key}.{name}", v, "null or a non-empty string")
        from ..tracking import require_backends
        require_backends(self, key)


EVAL_MODES = ("hard", "soft", "kd", "elf")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RAY_ADDRESS = re.compile(r"auto|local|(?:[a-z][a-z0-9+.-]*://)?(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])"
                         r":(?:6553[0-5]|655[0-2]\d|65[0-4]\d\d|6[0-4]\d{3}|[1-5]\d{4}|[1-9]\d{0,3})")
SEED_MAX = 2**32 - 1   # numpy's seed range; torch's is wider


@dataclass
class Config:
    name: str = "digits"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    auxiliaries: AuxiliariesConfig = field(default_factory=lambda: AuxiliariesConfig())   # MetaDD's nets

    def validate(self, key: str = "") -> None:
        _check(isinstance(self.name, str) and bool(RUN_NAME.fullmatch(self.name)), "name", self.name,
               "letters, digits, '.', '_' or '-', starting with a letter or digit (it names runs/NAME)")
        _check(0 <= self.seed <= SEED_MAX, "seed", self.seed, f"an integer in [0, {SEED_MAX}]")
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            if dataclasses.is_dataclass(sub) and hasattr(sub, "validate"):
                sub.validate(f.name)
        self._validate_archs()

    def _validate_archs(self) -> None:
        """Unknown architectures or options are config errors, found before any compute."""
        from ..errors import RayddError
        from ..models import canonical_spec
        specs = [("teachers.arch", self.teachers.arch), ("distill.arch", self.distill.arch),
                 ("evaluate.kd.teacher_arch", self.evaluate.kd.teacher_arch),
                 ("evaluate.elf.feature_arch", self.evaluate.elf.feature_arch)]
        specs += [(f"evaluate.archs[{i}]", a) for i, a in enumerate(self.evaluate.archs)]
        specs += [(f"evaluate.mode_archs.{m}[{i}]", a) for m in EVAL_MODES
                  for i, a in enumerate(getattr(self.evaluate.mode_archs, m) or [])]
        specs += [(f"evaluate.arch_lr.{a}", a) for a in self.evaluate.arch_lr]
        specs += [(f"auxiliaries.archs[{i}]", a) for i, a in enumerate(self.auxiliaries.archs)]
        for key, spec in specs:
            if spec is None:
                continue
            try:
                canonical_spec(spec)
            except RayddError as e:
                raise ConfigError(f"{key}: {e}") from None
        from ..models.layers import ACT_ALIASES, ACTS, NORM_ALIASES, NORMS, POOL_ALIASES, POOLS
        pool = self.distill.pool
        for name, values, known, aliases in (("activations", pool.activations, ACTS, ACT_ALIASES),
                                             ("norms", pool.norms, NORMS, NORM_ALIASES),
                                             ("pools", pool.pools, POOLS, POOL_ALIASES)):
            for i, v in enumerate(values):
                _check(v in known or v in aliases, f"distill.pool.{name}[{i}]", v,
                       f"one of {', '.join(sorted(known))}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {brief(value)} is invalid; expected {expected}")


def _sgd(obj: Any, key: str, *names: str) -> None:
    """Momentum in [0, 1), weight decay >= 0."""
    for n in names:
        v = getattr(obj, n)
        if "momentum" in n:
            _check(0 <= v < 1, f"{key}.{n}", v, "a momentum in [0, 1)")
        else:
            _check(v >= 0, f"{key}.{n}", v, "a non-negative weight decay")


def _positive(obj: Any, key: str, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        _check(v > 0, f"{key}.{n}", v, "a positive number")


from .metadd import AuxiliariesConfig, MetaDDConfig  # noqa: E402  (it reuses the classes above)
