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
from typing import Callable, Protocol

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


@dataclass(frozen=True)
class Setup:
    """What a method needs to know of the run besides its own config section."""
    arch: str                     # the main network architecture (distill.arch, else teachers.arch)
    in_channels: int
    num_classes: int
    image_size: int
    dsa_strategy: str | None      # augmentation of the method's inner training; None = none


class NonFiniteImages(RayddError):
    """The image update went NaN/inf; the worker rolls the group back to its last checkpoint."""


class Method(abc.ABC):
    """One group of synthetic images being distilled; ``round`` counts the rounds done."""

    round: int

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
