"""What every distillation method implements, and the registry that ``distill.method`` reads.

A method holds one group of synthetic images and everything needed to continue distilling it
exactly; the orchestration (``raydd.distillation``) builds it by name, calls :meth:`Method.step`
once per round and checkpoints :meth:`Method.state_dict`, knowing nothing else of it. Plain
PyTorch: no Ray here, frozen networks are reached only through the :class:`Services` given to
``step``.

Adding a method is adding one module to this package whose class is decorated with
:func:`register_method`. A loss term that several methods may add to their image loss (one
config section per term) registers with :func:`register_loss_term` the same way.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from torch import Tensor

from ..config import DistillConfig
from ..errors import ConfigError, RayddError


class Service(Protocol):
    """Frozen networks hosted once for all workers (``raydd.services``: in-process or a Ray actor)."""
    num_models: int

    def logits(self, x: Tensor, model: int) -> Tensor: ...

    def input_grad(self, x: Tensor, grad_logits: Tensor, model: int) -> Tensor: ...


@dataclass(frozen=True)
class Services:
    """The services a method may use, one field per role (more roles become more fields)."""
    teachers: Service
    auxiliaries: Any = None   # frozen auxiliary nets (MetaDD: ``metadd.AuxService``); None = none


@dataclass(frozen=True)
class RealImages:
    """The real training split in memory, in the space the synthetic images live in."""
    x: Tensor                     # N×C×H×W, normalised
    y: Tensor                     # N, int64
    mean: tuple[float, ...]       # the per-channel normalisation, to map back to pixels in [0, 1]
    std: tuple[float, ...]


@dataclass(frozen=True)
class Setup:
    """What a method needs to know of the run besides its own config section."""
    arch: str                     # the main network architecture (distill.arch, else teachers.arch)
    in_channels: int
    num_classes: int
    image_size: int
    dsa_strategy: str | None      # augmentation of the method's inner training; None = none
    # Loads the real training split (methods that match real batches every step, e.g. HMDC); None
    # where the run offers none (data.zca on). Called once, by the method that needs it.
    real: Callable[[], RealImages] | None = None


class NonFiniteImages(RayddError):
    """The image update went NaN/inf; the worker rolls the group back to its last checkpoint."""


class Method(abc.ABC):
    """One group of synthetic images being distilled; ``round`` counts the rounds done."""

    round: int
    # The shared distill sections this method reads (``pool``, ``metadd``); the config refuses one
    # that is switched on for a method that would ignore it.
    uses: frozenset[str] = frozenset()

    @classmethod
    @abc.abstractmethod
    def create(cls, cfg: DistillConfig, images: Tensor, labels: Tensor, *, seed: int,
               setup: Setup) -> "Method":
        """A fresh group from its initial images; all its randomness derives from ``seed``."""

    @abc.abstractmethod
    def step(self, services: Services) -> dict:
        """One round; returns its stats (``loss``, optionally ``seconds`` per part).
        Raises :class:`NonFiniteImages` and leaves the images untouched if they would go non-finite."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only, enough for :meth:`load_state_dict` to continue bit for bit."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...

    @abc.abstractmethod
    def reseed(self, seed: int) -> None:
        """A fresh random stream after a rollback (replaying the same one would fail the same way)."""

    @property
    @abc.abstractmethod
    def images(self) -> Tensor: ...

    @property
    @abc.abstractmethod
    def labels(self) -> Tensor: ...

    def synset(self) -> tuple[Tensor, Tensor]:
        """The images (and labels) the finished group contributes to the synset; by default the
        stored ones. A method that stores its images packed (HMDC) returns them decoded."""
        return self.images, self.labels

    @classmethod
    def synset_per_stored(cls, cfg: DistillConfig) -> int:
        """Synset images per stored image (:meth:`synset` / :attr:`images`); the aggregator expects
        ipc × this per class."""
        return 1


METHODS: dict[str, type[Method]] = {}
LOSS_TERMS: dict[str, type] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: ``distill.method: NAME`` selects the class."""
    return _register(METHODS, name, "method")


def register_loss_term(name: str) -> Callable[[type], type]:
    """Class decorator for an add-on image-loss term: ``loss_and_grad(images, labels, services)
    -> (loss, ∂loss/∂images)``, added by a method to its own loss and gradient."""
    return _register(LOSS_TERMS, name, "loss term")


def _register(table: dict[str, type], name: str, what: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        if table.get(name, cls) is not cls:
            raise RayddError(f"{what} {name!r} is registered twice ({table[name].__name__}, {cls.__name__})")
        table[name] = cls
        return cls
    return add


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"distill.method: {name!r} is unknown; expected one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def check_method(cfg: DistillConfig, key: str) -> None:
    """A known method, and no shared section switched on that it would silently ignore."""
    uses = method_class(cfg.method).uses
    if cfg.pool.p_main != 1.0 and "pool" not in uses:
        raise ConfigError(f"{key}.pool.p_main: {cfg.pool.p_main} is invalid; expected 1: distill.method "
                          f"{cfg.method} has no student model pool")
    if cfg.metadd.enabled and "metadd" not in uses:
        raise ConfigError(f"{key}.metadd.enabled: true is invalid; expected false: distill.method "
                          f"{cfg.method} does not add MetaDD's term")
