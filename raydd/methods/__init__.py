"""Distillation methods in plain PyTorch, one module per paper, chosen by ``distill.method``."""
from . import apm  # noqa: F401  (registers "apm")
from . import metadd  # noqa: F401  (registers the loss term "metadd")
from . import hmdc  # noqa: F401  (registers "hmdc")
from .base import (LOSS_TERMS, METHODS, Method, NonFiniteImages, RealImages, Service, Services, Setup,
                   check_method, method_class, register_loss_term, register_method)

__all__ = ["LOSS_TERMS", "METHODS", "Method", "NonFiniteImages", "RealImages", "Service", "Services", "Setup",
           "check_method", "method_class", "register_loss_term", "register_method"]
