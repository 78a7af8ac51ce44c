"""Architecture names, their options and presets; ``build``, ``available`` and ``variant``."""
from __future__ import annotations

from ..errors import RayddError
from . import classic, timm_nets, vit
from .layers import ACT_ALIASES, ACTS, NORM_ALIASES, NORMS, POOL_ALIASES, POOLS
from .spec import Entry, Option, format_spec, parse_spec
from .staged import StagedNet

NORM = Option("instance", "normalisation", tuple(NORMS), NORM_ALIASES)
ACT = Option("relu", "activation", tuple(ACTS), ACT_ALIASES)


CONVNET = dict(
    width=Option(128, "channels of every block"),
    depth=Option(None, "blocks (auto: 3 up to 32 px, 4 above), capped at log2(size)"),
    norm=NORM, act=ACT,
    pool=Option("avg", "2x2 pooling after each block", POOLS, POOL_ALIASES))
VGG = dict(norm=NORM, act=ACT, pool=Option("max", "2x2 pooling", ("avg", "max"), POOL_ALIASES))
TIMM_VGG = dict(norm=Option("batch", "normalisation", tuple(NORMS), NORM_ALIASES), act=ACT)
RESNET = dict(norm=Option("batch", "normalisation", tuple(NORMS), NORM_ALIASES), act=ACT,
              pool=Option("avg", "global pooling", ("avg", "max"), POOL_ALIASES),
              init=Option("timm", "weight init: timm's (Kaiming fan-out convs, last norm of each block "
                          "zeroed) or torch's layer defaults (the DC/DSA/APM code)", ("timm", "torch")))
VIT = dict(patch=Option(None, "patch size (auto: ~8x8 tokens, 8 px: 2, 32 px: 4, 64 px: 8)"),
            width=Option(192, "embedding width"), depth=Option(12, "transformer blocks"),
            heads=Option(3, "attention heads"))
VIT_APM = dict(patch=Option(None, "patch size (auto: 4 when it divides the size, as APM)"),
               width=Option(512, "embedding width"), depth=Option(3, "transformer blocks"),
               heads=Option(4, "attention heads"), head_dim=Option(64, "width of each head"),
               mlp=Option(512, "hidden width of the MLP"))
MLP = dict(width=Option(128, "hidden width"), depth=Option(2, "hidden layers"))


def _entries() -> list[Entry]:
    conv = dict(builder=classic.convnet, options=CONVNET, base="convnet")
    vgg = dict(builder=classic.vgg11, options=VGG, base="vgg11")
    res18 = dict(builder=timm_nets.resnet("resnet18"), options=RESNET, base="resnet18")
    return [
        Entry("convnet", "ConvNet of the DD field: 3x3 conv-instancenorm-relu-avgpool blocks, width 128, "
              "depth 3 (<=32 px) / 4 (64 px), first conv padded by 3 for grey and 28 px inputs", **conv),
        Entry("convnet_d3", "ConvNet, depth 3", fixed=dict(depth=3), **conv),
        Entry("convnet_d4", "ConvNetD4, depth 4 (64 px datasets)", fixed=dict(depth=4), **conv),
        Entry("convnet_bn", "ConvNet with batch norm", fixed=dict(norm="batch"), **conv),
        Entry("convnet_ln", "ConvNet with layer norm (over C,H,W)", fixed=dict(norm="layer"), **conv),
        Entry("convnet_gn", "ConvNet with group norm (4 groups)", fixed=dict(norm="group"), **conv),
        Entry("convnet_nn", "ConvNet without normalisation", fixed=dict(norm="none"), **conv),
        Entry("mlp", "MLP: two hidden layers of 128, ReLU", classic.mlp, MLP),
        Entry("lenet", "LeNet (DC variant): two 5x5 convs, fc 120-84", classic.lenet, {}),
        Entry("alexnet", "AlexNet for small images (DC variant): five convs, one linear",
              classic.alexnet, {}),
        Entry("vgg11", "VGG11 for small images (DC variant), instance norm", **vgg),
        Entry("vgg11_bn", "VGG11 for small images (DC variant), batch norm", fixed=dict(norm="batch"), **vgg),
        Entry("vgg11_timm", "timm VGG11-BN features, global average pool, linear", timm_nets.vgg11_timm,
              TIMM_VGG),
        Entry("resnet18", "timm ResNet-18, batch norm, timm init, CIFAR stem (3x3 stride-1 conv, no max-pool)",
              **res18),
        Entry("resnet18_in", "ResNet18 of the DC/DSA/MTT/APM tables: instance norm, CIFAR stem, "
              "PyTorch default init", fixed=dict(norm="instance", init="torch"), **res18),
        Entry("resnet18_bn", "ResNet18BN of the DC code: batch norm, CIFAR stem, PyTorch default init",
              fixed=dict(init="torch"), **res18),
        Entry("resnet34", "timm ResNet-34, CIFAR stem", timm_nets.resnet("resnet34"), RESNET),
        Entry("resnet50", "timm ResNet-50 (bottleneck), CIFAR stem", timm_nets.resnet("resnet50"), RESNET),
        Entry("vit_apm", "ViT of the APM tables: patch 4, width 512, depth 3, 4 heads of 64, MLP 512, "
              "dropout 0.1", vit.vit_apm, VIT_APM),
        Entry("vit_tiny", "timm ViT-Tiny (192 wide, 12 blocks, 3 heads), patch fitted to the image",
              timm_nets.vit_tiny, VIT),
        Entry("mobilenetv2", "timm MobileNetV2 1.0, stride-1 stem and second stage (total stride 8)",
              timm_nets.mobilenetv2, {}),
    ]


REGISTRY: dict[str, Entry] = {e.name: e for e in _entries()}
GENERIC = ("timm:<name>", "any timm classification model, built for the input size (or up-sampled "
           "to one it accepts: resize=auto|none|N); other options go to timm.create_model")


def available() -> list[tuple[str, str]]:
    """(name, one-line description) of every architecture, for ``raydd models list``."""
    return [(e.name, e.description) for e in REGISTRY.values()] + [GENERIC]


def options(name: str) -> list[tuple[str, str]]:
    """(option, "help (default X)") of a registered architecture, for ``raydd models list``."""
    entry = _entry(name)
    out = []
    for key, opt in entry.options.items():
        default = entry.fixed.get(key, opt.default)
        choices = f"; one of {', '.join(opt.choices)}" if opt.choices else ""
        out.append((key, f"{opt.help}{choices} (default {'auto' if default is None else default})"))
    return out


def _entry(name: str) -> Entry:
    if name not in REGISTRY:
        raise RayddError(f"unknown model {name!r} (known: {', '.join(REGISTRY)}, or timm:<any timm model>)")
    return REGISTRY[name]


def build(spec: str, in_channels: int, num_classes: int, image_size: int) -> StagedNet:
    """Build a freshly initialised StagedNet for N×in_channels×image_size×image_size inputs."""
    for key, value, low in (("in_channels", in_channels, 1), ("num_classes", num_classes, 2),
                            ("image_size", image_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise RayddError(f"model {spec!r}: {key}={value!r} is not an integer >= {low}")
    name, given = parse_spec(spec)
    if name.startswith("timm:"):
        built, canonical = timm_nets.timm_generic(name, given, in_channels, num_classes, image_size)
    else:
        entry = _entry(name)
        values, explicit = entry.resolve(given)
        built = entry.builder(values, in_channels, num_classes, image_size)
        canonical = format_spec(entry.name, explicit)
    fc = built.stages[-1][1]
    dim = built.embedding_dim if built.embedding_dim is not None else fc.in_features
    return StagedNet(built.stages, spec=canonical, in_channels=in_channels, num_classes=num_classes,
                     image_size=image_size, embedding_dim=dim, elf_split=built.elf_split,
                     config=built.config)


def canonical_spec(spec: str) -> str:
    """The canonical form of a spec (sorted options, canonical values) without building it."""
    name, given = parse_spec(spec)
    if name.startswith("timm:"):
        return format_spec(name, {k: v for k, v in given.items() if not (k == "resize" and v == "auto")})
    entry = _entry(name)
    return format_spec(entry.name, entry.resolve(given)[1])


def variant(spec: str, *, activation: str | None = None, norm: str | None = None,
            pool: str | None = None) -> str:
    """Spec of a model-pool variant of ``spec`` (paper 002): same family, other activation /
    normalisation / pooling. Presets are rewritten to their family with explicit options, e.g.
    ``variant("convnet_bn", activation="swish") == "convnet:act=swish,norm=batch"``."""
    name, given = parse_spec(spec)
    if name.startswith("timm:"):
        raise RayddError(f"model {name!r} has no model-pool variants (supported: convnet family, "
                         "vgg11, vgg11_timm, resnet18/34/50)")
    entry = _entry(name)
    _, explicit = entry.resolve(given)
    changes = {k: v for k, v in (("act", activation), ("norm", norm), ("pool", pool)) if v is not None}
    missing = [k for k in changes if k not in entry.options]
    if missing:
        raise RayddError(f"model {name!r} has no {'/'.join(missing)} option for model-pool variants "
                         "(supported: convnet family, vgg11, vgg11_timm, resnet18/34/50)")
    base = REGISTRY[entry.base] if entry.base else entry
    options = {k: v for k, v in entry.fixed.items() if base.fixed.get(k) != v}
    options.update(explicit)
    options.update(changes)
    return format_spec(base.name, base.resolve(options)[1])
