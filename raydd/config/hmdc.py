"""``distill.hmdc``: HMDC (paper 004) as its official code runs it, the defaults from the table of
../shared/references/hmdc-official.md (CIFAR-10, IPC 10). The image optimiser is the general
``distill.lr_img`` / ``distill.momentum_img`` (HMDC: 5e-3 / 0.5) and the number of image steps is
``distill.rounds`` (HMDC: iteration 100 × o_iter 100 = 10,000). Kept out of schema.py, which
stays under the house's module size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class HMDCConfig:
    model1: str = "convnet"            # the CNN (official ConvNet: width 128, instance norm, avg pool)
    model2: str = "vit_tiny"           # the ViT: random init, patch fitted to the image (no 224 px)
    lr_model1: float = 0.01            # SGD, no momentum or weight decay
    lr_model2: float = 0.001
    lr_ssd: float = 0.01               # Adam: the MD projections and the layer-matching matrix
    factor: int = 2                    # multi-formation: factor² sub-images per stored image
    init: Literal["kmeans", "random"] = "kmeans"   # k-means on an untrained model1, or random real
    reset_every: int = 100             # o_iter: image steps per outer iteration (fresh models, SSD, GBM)
    model_steps: int = 17              # real-data steps of both models after each image step
    ssd_steps: int = 17                # ... then of the projections and the matching matrix
    batch_real: int = 128              # k (real representatives per class) and the model batch
    batch_syn: int = 128               # unpacked synthetic images per class and step, at most
    select_every: int = 10             # k-means real batch refresh, alternating model1 / model2
    kmeans_iters: int = 100            # Lloyd iterations at most
    gbm: bool = True                   # gradient balance (weights and per-channel L∞ normalisation)
    gbm_every: int = 10                # accumulator sampling period
    md: bool = True                    # mutual distillation (model loss and the third image target)
    ssd_size: Optional[int] = None     # spatial grid side; None: the smallest tapped map (CIFAR: 4)
    match: Literal["sse", "layerwise"] = "sse"     # sum of squared differences (code) or DC's distance
    cutmix: bool = True
    cutmix_beta: float = 1.0
    # Class shards on Ray (raydd.distillation.hmdc_ray): 1 = the single-process group; N > 1 = a pair
    # actor and N image workers over a partition of the classes (the same synset, bit for bit).
    shards: int = 1

    def validate(self, key: str) -> None:
        from ..errors import RayddError
        from ..models import canonical_spec
        from .schema import ConfigError, _check, _positive
        _positive(self, key, "lr_model1", "lr_model2", "lr_ssd", "factor", "reset_every", "model_steps",
                  "ssd_steps", "batch_real", "batch_syn", "select_every", "kmeans_iters", "gbm_every",
                  "cutmix_beta", "shards")
        _check(self.ssd_size is None or self.ssd_size >= 1, f"{key}.ssd_size", self.ssd_size,
               "null or an integer >= 1")
        for name in ("model1", "model2"):
            try:
                canonical_spec(getattr(self, name))
            except RayddError as e:
                raise ConfigError(f"{key}.{name}: {e}") from None
