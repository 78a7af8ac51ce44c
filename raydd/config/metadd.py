"""``distill.metadd`` (the MetaDD term's weights, paper 000) and the top-level ``auxiliaries``
section (the frozen nets it uses: which, how trained, how hosted). Kept out of schema.py, which
stays under the house's module size; imported at its end because it reuses its classes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from .schema import ConfigError, ServiceConfig, _check, _positive

# The paper's auxiliaries are ResNet34, MobileNetV2, GoogLeNet and ViT-B-16. Full-size ones where a
# GPU is expected; on the CPU-sized datasets small members of four families instead: LeNet (5x5
# convs, max-pool, no norm) for the deeper CNN, a shallow batch-norm/swish/max-pool ConvNet for the
# MobileNet/VGG class, and a two-block ViT (seen-architecture stand-ins that train in minutes).
DEFAULT_AUXILIARIES = {
    "digits": ["lenet", "convnet:act=swish,depth=2,norm=batch,pool=max,width=8",
               "vit_apm:depth=2,head_dim=16,heads=2,mlp=64,width=32"],
    "fashion-mnist": ["lenet", "convnet:act=swish,depth=2,norm=batch,pool=max,width=16",
                      "vit_apm:depth=2,head_dim=32,heads=2,mlp=128,width=64"],
}
PAPER_AUXILIARIES = ["resnet34", "mobilenetv2", "vgg11_bn", "vit_tiny"]


@dataclass
class MetaDDConfig:
    """Weights of L_ai's CE and KL, of the CAM variance and of L_pos (paper: all 1), L_pos's sign
    (``maximize``: the negated positive CAM mass, as the text says; ``minimize``: Eq. 9 as printed)
    and the size all CAMs are resized to."""
    enabled: bool = False
    ce: float = 1.0
    kl: float = 1.0
    var: float = 1.0
    pos: float = 1.0
    pos_sign: Literal["maximize", "minimize"] = "maximize"
    cam_size: int = 8

    def validate(self, key: str) -> None:
        for name in ("ce", "kl", "var", "pos"):
            _check(getattr(self, name) >= 0, f"{key}.{name}", getattr(self, name), "a weight >= 0")
        _check(self.cam_size >= 2, f"{key}.cam_size", self.cam_size, "an integer >= 2")


@dataclass
class AuxiliariesConfig:
    """The auxiliary pool: one net per spec, trained on the real training split with the teachers'
    recipe (``epochs`` may differ) and hosted by ``shards`` service actors (nets dealt round robin;
    fractional ``service.resources.gpus`` let them share a GPU)."""
    archs: list[str] = field(default_factory=list)   # empty: the dataset's defaults (above)
    epochs: Optional[int] = None                       # None: teachers.epochs
    shards: int = 1
    service: ServiceConfig = field(default_factory=ServiceConfig)

    def validate(self, key: str) -> None:
        _positive(self, key, "shards")
        _check(self.epochs is None or self.epochs >= 1, f"{key}.epochs", self.epochs, "null or an integer >= 1")
        _check(len(set(self.archs)) == len(self.archs), f"{key}.archs", self.archs, "specs without repeats")
        self.service.validate(f"{key}.service")

    def specs(self, source: str) -> list[str]:
        """The configured specs, else the dataset's defaults."""
        return list(self.archs) or list(DEFAULT_AUXILIARIES.get(source, PAPER_AUXILIARIES))


__all__ = ["AuxiliariesConfig", "MetaDDConfig", "DEFAULT_AUXILIARIES", "PAPER_AUXILIARIES", "ConfigError"]
