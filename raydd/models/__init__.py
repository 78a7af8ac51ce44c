"""Model zoo: every architecture is a :class:`StagedNet` built from a spec string.

``build("convnet:width=32,norm=batch", in_channels, num_classes, image_size)``; names and
options: ``available()`` and ``options(name)`` (``raydd models list``); model-pool variants:
``variant(spec, activation=..., norm=..., pool=...)``.
"""
from .registry import available, build, canonical_spec, options, variant
from .staged import StagedNet

__all__ = ["StagedNet", "available", "build", "canonical_spec", "is_vit", "options", "variant"]


def is_vit(net) -> bool:
    """A transformer on patch tokens: raydd's ViTs, or any timm VisionTransformer (``timm:deit_…`` too)."""
    from timm.models.vision_transformer import VisionTransformer

    from .timm_nets import ViTEmbed
    from .vit import PatchEmbed
    return any(isinstance(m, (PatchEmbed, ViTEmbed, VisionTransformer)) for m in net.modules())
