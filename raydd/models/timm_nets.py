"""timm architectures adapted to 8–64 px inputs, and the generic ``timm:<name>`` rule.

timm models are built for 224 px: a stride-4 stem and total stride 32 leave nothing of an 8 px
image. The named families rewrite the stem (CIFAR style: 3×3 stride-1 conv, no max-pool) and drop
later strides whose input is already below 4 px, so every conv keeps a map of at least 2×2.
Weights are always randomly initialised (``pretrained=False``): raydd never downloads.
"""
from __future__ import annotations

import difflib
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import RayddError
from .classic import VGG11_CFG, group_vgg, vgg_elf_split
from .layers import NORMS, timm_act
from .spec import Built, format_spec


def _timm():
    import timm  # deferred: importing timm costs about a second

    return timm


def _unstride(block: nn.Module) -> None:
    """Turn the stride-2 convs of a down-sampling block (main path and shortcut) into stride 1."""
    for module in block.modules():
        if isinstance(module, nn.Conv2d) and module.stride == (2, 2):
            module.stride = (1, 1)


def _limit_strides(first_blocks: list[nn.Module], size: int, force: tuple[int, ...] = ()) -> int:
    """Walk the first block of each stage in order; a stride-2 stage whose input is below 4 px
    (or whose index is in ``force``) gets stride 1. Returns the final map size."""
    for i, block in enumerate(first_blocks):
        if not any(isinstance(m, nn.Conv2d) and m.stride == (2, 2) for m in block.modules()):
            continue
        if i in force or size < 4:
            _unstride(block)
        else:
            size = math.ceil(size / 2)
    return size


def _norm_cls(norm: str) -> type:
    return NORMS[norm] or nn.Identity


def resnet(arch: str):
    def build(opts: dict, in_channels: int, num_classes: int, image_size: int) -> Built:
        """timm ResNet with a CIFAR stem. ELF splits after layer4's first block (paper: conv5_2,
        32 px) or after layer3 (conv4_4, 64 px).

        The blocks are those of the DC code's ResNet (conv-norm-act-conv-norm, 1×1 stride-2
        conv + norm shortcut); at 32 px the global average pool is its 4×4 average pool.
        ``init=timm`` keeps timm's init (Kaiming fan-out convs, last norm of each block zeroed);
        ``init=torch`` keeps PyTorch's layer defaults, as the DC/DSA/APM code does."""
        norm, act, pool, init = opts["norm"], opts["act"], opts["pool"], opts["init"]
        model = _timm().create_model(
            arch, pretrained=False, in_chans=in_channels, num_classes=num_classes,
            norm_layer=_norm_cls(norm), act_layer=timm_act(act), global_pool=pool,
            zero_init_last=norm != "none" and init == "timm")   # zero-init needs a norm weight to zero
        conv = nn.Conv2d(in_channels, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        if init == "timm":
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # as timm inits convs
        else:
            for module in model.modules():
                if isinstance(module, nn.Conv2d):
                    module.reset_parameters()
        layers = [model.layer1, model.layer2, model.layer3, model.layer4]
        size = _limit_strides([layer[0] for layer in layers], image_size)
        stages = [("stem", nn.Sequential(conv, model.bn1, model.act1)),
                  ("layer1", model.layer1), ("layer2", model.layer2), ("layer3", model.layer3)]
        stages += [(f"layer4_{i}", block) for i, block in enumerate(model.layer4)]
        stages += [("pool", model.global_pool), ("fc", model.fc)]
        return Built(stages, elf_split="layer4_0" if image_size <= 32 else "layer3",
                     config=dict(norm=norm, act=act, pool=pool, init=init, final_map=size))
    return build


def mobilenetv2(opts: dict, in_channels: int, num_classes: int, image_size: int) -> Built:
    """timm mobilenetv2_100 with stride-1 stem and stride-1 second stage (as CIFAR MobileNetV2
    ports do): total stride 8, so 32 px ends on a 4×4 map."""
    model = _timm().create_model("mobilenetv2_100", pretrained=False, in_chans=in_channels,
                                 num_classes=num_classes)
    model.conv_stem.stride = (1, 1)
    size = _limit_strides([stage[0] for stage in model.blocks], image_size, force=(1,))
    stages = [("stem", nn.Sequential(model.conv_stem, model.bn1))]
    stages += [(f"stage{i + 1}", stage) for i, stage in enumerate(model.blocks)]
    stages += [("head", nn.Sequential(model.conv_head, model.bn2)),
               ("pool", model.global_pool), ("fc", model.classifier)]
    return Built(stages, config=dict(final_map=size))


def vgg11_timm(opts: dict, in_channels: int, num_classes: int, image_size: int) -> Built:
    """timm's VGG11 feature stack (conv with bias → norm → act, timm init), global average pool,
    linear. timm's 224 px head (a 7×7 conv to 4096 channels, ~120M weights) is replaced: it is
    built with a one-channel hidden layer only so that nothing large is allocated, then dropped."""
    norm, act = opts["norm"], opts["act"]
    model = _timm().create_model("vgg11", pretrained=False, in_chans=in_channels,
                                 num_classes=num_classes, norm_layer=NORMS[norm],
                                 act_layer=timm_act(act), mlp_ratio=1 / 4096)
    layers = list(model.features)
    if image_size == 28:
        layers[0].padding = (3, 3)   # 28 px acts like 32 px, as in the DC nets
    stages, _ = group_vgg(layers, image_size)
    fc = nn.Linear(VGG11_CFG[-2], num_classes)
    nn.init.normal_(fc.weight, 0, 0.01)   # timm VGG's linear init
    nn.init.zeros_(fc.bias)
    stages += [("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())), ("fc", fc)]
    return Built(stages, elf_split=vgg_elf_split(image_size), config=dict(norm=norm, act=act))


class ViTEmbed(nn.Module):
    """Patch embedding + class token + position embedding of a timm VisionTransformer whose
    blocks, norm and head were moved out into their own stages."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))


class ViTPool(nn.Module):
    """Tokens → embedding: class token (or mean of patch tokens), then timm's fc_norm/head dropout."""

    def __init__(self, kind: str, num_prefix_tokens: int, fc_norm: nn.Module, head_drop: nn.Module):
        super().__init__()
        self.kind, self.num_prefix_tokens = kind, num_prefix_tokens
        self.fc_norm, self.head_drop = fc_norm, head_drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, 0] if self.kind == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)
        return self.head_drop(self.fc_norm(x))


def fit_patch(image_size: int) -> int:
    """Patch size for a ~8×8 token grid: the divisor (≥ 2) of the size nearest size/8
    (8 px → 2, 28/32 px → 4, 64 px → 8)."""
    divisors = [p for p in range(2, image_size + 1) if image_size % p == 0]
    return min(divisors, key=lambda p: (abs(p - image_size / 8), -p))


def vit_tiny(opts: dict, in_channels: int, num_classes: int, image_size: int) -> Built:
    """timm VisionTransformer, tiny config (width 192, depth 12, 3 heads), img_size = the input
    size and the patch fitted to it. Stages: embed, block1..N, norm, pool (class token), fc."""
    from timm.models.vision_transformer import VisionTransformer

    patch = opts["patch"] or fit_patch(image_size)
    width, depth, heads = opts["width"], opts["depth"], opts["heads"]
    if image_size % patch:
        raise RayddError(f"model 'vit_tiny': patch={patch} does not divide the image size {image_size}")
    if width % heads:
        raise RayddError(f"model 'vit_tiny': width={width} is not divisible by heads={heads}")
    vit = VisionTransformer(img_size=image_size, patch_size=patch, in_chans=in_channels,
                            num_classes=num_classes, embed_dim=width, depth=depth, num_heads=heads)
    blocks, norm, head = list(vit.blocks), vit.norm, vit.head
    pool = ViTPool(vit.global_pool, vit.num_prefix_tokens, vit.fc_norm, vit.head_drop)
    vit.blocks, vit.norm, vit.head = nn.Sequential(), nn.Identity(), nn.Identity()
    vit.fc_norm, vit.head_drop = nn.Identity(), nn.Identity()
    stages = [("embed", ViTEmbed(vit))]
    stages += [(f"block{i + 1}", block) for i, block in enumerate(blocks)]
    stages += [("norm", norm), ("pool", pool), ("fc", head)]
    return Built(stages, config=dict(patch=patch, width=width, depth=depth, heads=heads,
                                     tokens=(image_size // patch) ** 2))


# ---------------------------------------------------------------- generic rule: timm:<any name>

RESIZE_SIZES = (16, 32, 64, 128, 224)


class Resize(nn.Module):
    """Bilinear up-sampling of the input to the smallest size the timm body accepts."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class TimmBody(nn.Module):
    """``model.forward_features``; the classifier was moved out into the ``fc`` stage."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


class TimmPool(nn.Module):
    """``model.forward_head(pre_logits=True)``. The model is referenced, not registered: its
    parameters belong to the ``body`` stage, and registering them twice would duplicate them in
    state dicts (which safetensors refuses)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        object.__setattr__(self, "_owner", model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._owner.forward_head(x, pre_logits=True)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _parse_resize(name: str, value: Any) -> int | None | str:
    """'auto' (default), 'none'/0 or a size in px."""
    if value in ("auto", "none", 0):
        return None if value in ("none", 0) else "auto"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 8:
        return value
    raise RayddError(f"model {name!r}: resize={value!r} is not auto, none or a size >= 8")


def _create(name: str, kwargs: dict, in_channels: int, num_classes: int, size: int) -> nn.Module:
    """create_model with img_size when the constructor accepts it (ViT-like models need it)."""
    timm = _timm()
    base = dict(kwargs, pretrained=False, in_chans=in_channels, num_classes=num_classes)
    try:
        return timm.create_model(name, img_size=size, **base)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise RayddError(f"model 'timm:{name}': timm.create_model rejected its arguments "
                             f"(options given: {sorted(kwargs)}): {_short(exc)}") from None
    try:
        return timm.create_model(name, **base)
    except TypeError as exc:
        raise RayddError(f"model 'timm:{name}': timm.create_model rejected its arguments "
                         f"(options given: {sorted(kwargs)}): {_short(exc)}") from None


def _detach_classifier(name: str, model: nn.Module) -> nn.Module:
    fc = model.get_classifier()
    if not isinstance(fc, nn.Module) or isinstance(fc, nn.Identity):
        raise RayddError(f"timm model {name} cannot be used: it has no single classifier layer "
                         f"(get_classifier() gives {type(fc).__name__}; distilled/multi-head models "
                         "are not supported)")
    for path, module in model.named_modules():
        if module is fc:
            parent_path, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent_path), attr, nn.Identity())
            return fc
    raise RayddError(f"timm model {name} cannot be used: its classifier is not a submodule")


def _stages(model: nn.Module, fc: nn.Module, resize: int | None) -> list[tuple[str, nn.Module]]:
    stages = [("resize", Resize(resize))] if resize else []
    return stages + [("body", TimmBody(model)), ("pool", TimmPool(model)), ("fc", fc)]


def _probe(stages, in_channels: int, num_classes: int, image_size: int) -> int:
    """Run a zero batch through the stages; returns the embedding width or raises."""
    net = nn.Sequential(*(m for _, m in stages[:-1]))
    fc = stages[-1][1]
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            emb = net(torch.zeros(2, in_channels, image_size, image_size))
            if emb.dim() != 2:
                raise ValueError(f"pre-logits have shape {tuple(emb.shape)}, not batch x features")
            logits = fc(emb)
    finally:
        net.train(was_training)
    if tuple(logits.shape) != (2, num_classes):
        raise ValueError(f"logits have shape {tuple(logits.shape)}, expected (2, {num_classes})")
    return emb.shape[1]


def timm_generic(name: str, given: dict, in_channels: int, num_classes: int,
                 image_size: int) -> tuple[Built, str]:
    """Any timm classification model: built at the input size (img_size passed when accepted)
    and checked with a dummy forward. If it cannot run that small, ``resize=auto`` (default)
    up-samples the input to the smallest of 16/32/64/128/224 px that works; ``resize=none``
    refuses instead; ``resize=N`` forces N px. Other options go to ``timm.create_model``.
    Returns (built, canonical spec)."""
    timm = _timm()
    model_name = name[len("timm:"):]
    if not timm.is_model(model_name.split(".")[0]):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (see timm.list_models())"
        raise RayddError(f"unknown timm model {model_name!r}{hint}")
    kwargs = dict(given)
    resize = _parse_resize(name, kwargs.pop("resize", "auto"))
    if kwargs.pop("pretrained", False):
        raise RayddError(f"model {name!r}: pretrained=true is not supported (raydd never downloads weights)")
    for reserved in ("in_chans", "num_classes", "img_size"):
        if reserved in kwargs:
            raise RayddError(f"model {name!r}: option {reserved!r} is set by raydd from the dataset")
    spec = format_spec(name, {k: v for k, v in given.items() if not (k == "resize" and v == "auto")})

    def attempt(size: int) -> Built:
        model = _create(model_name, kwargs, in_channels, num_classes, size)
        fc = _detach_classifier(model_name, model)
        stages = _stages(model, fc, size if size != image_size else None)
        dim = _probe(stages, in_channels, num_classes, image_size)
        return Built(stages, embedding_dim=dim, config=dict(input_size=size))

    sizes = [image_size] if resize in (None, "auto") else [resize]
    if resize == "auto":
        sizes += [s for s in RESIZE_SIZES if s > image_size]
    first_error = None
    for size in sizes:
        try:
            return attempt(size), spec
        except RayddError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of a foreign model becomes one line
            first_error = first_error or exc
    tried = "" if len(sizes) == 1 else f" (also up-sampled to {', '.join(map(str, sizes[1:]))} px)"
    hint = " (add resize=auto to up-sample)" if resize is None else ""
    raise RayddError(f"timm model {model_name} cannot run on {image_size}x{image_size} inputs: "
                     f"{_short(first_error)}{tried}{hint}")
