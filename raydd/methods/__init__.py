"""Distillation methods in plain PyTorch, one module per paper, chosen by ``distill.method``."""
from . import apm  # noqa: F401  (registers "apm")
from .base import (LOSS_TERMS, METHODS, Method, NonFiniteImages, Service, Services, Setup, method_class,
                   register_loss_term, register_method)

__all__ = ["LOSS_TERMS", "METHODS", "Method", "NonFiniteImages", "Service", "Services", "Setup",
           "method_class", "register_loss_term", "register_method"]
