"""The dataset-distillation field's own small-image nets (DC/DSA/MTT code): ConvNet, MLP, LeNet,
AlexNet and VGG11, as StagedNet stages.

Size rules shared by these nets:
- 28×28 inputs are treated like 32×32: the first conv is padded so its output is 32×32 (the DC
  code does this for its 28 px single-channel datasets; here it is keyed on the size, so that
  28 px colour inputs also work).
- The ConvNet follows the DC/DSA/APM ConvNet exactly wherever that one builds: its first conv
  is padded by 3 for every single-channel input (so 8 px grey runs on 12→6→3 maps, not 8→4→2),
  and by 1 for colour (28 px colour, which the reference cannot build, is padded by 3 as above).
- Down-sampling never leaves a conv with a map below 2×2: a normalised 1×1 map is a constant, which
  would cut the net off from its input on 8 px images.
"""
from __future__ import annotations

import torch.nn as nn

from ..errors import RayddError
from .layers import act_layer, norm_layer, pool2x2
from .spec import Built


def effective_size(image_size: int) -> int:
    return 32 if image_size == 28 else image_size


def _first_pad(image_size: int, kernel: int) -> int:
    """Padding of the first conv: 'same' padding, plus 2 per side for 28 px (acts like 32)."""
    return kernel // 2 + (2 if image_size == 28 else 0)


def _need(model: str, size: int, minimum: int, image_size: int) -> None:
    if size < minimum:
        raise RayddError(f"model {model!r} cannot run on {image_size}x{image_size} inputs: "
                         "its feature map would vanish (use larger images)")


def convnet_first_pad(in_channels: int, image_size: int) -> int:
    """First-conv padding of the DC ConvNet: 3 for grey inputs (28 px grey → 32×32 maps; at 8 px
    the last block's norm then sees 3×3 instead of 2×2 maps, which narrow nets depend on), 3 for
    28 px colour (acts like 32 px), else 1."""
    return 3 if in_channels == 1 or image_size == 28 else 1


def convnet(opts: dict, in_channels: int, num_classes: int, image_size: int) -> Built:
    """D × [3×3 conv → norm → act → 2×2 pool] → flatten → linear (DC ConvNet).

    Depth defaults to 3 up to 32 px and 4 above (the field's ConvNet / ConvNetD4). With pooling,
    depth is capped so that the last conv still sees a map of at least 2×2 (8 px: depth ≤ 3).
    The embedding is the flattened last map, as in the DC code (W·h·w wide).
    """
    width, norm, act, pool = opts["width"], opts["norm"], opts["act"], opts["pool"]
    pad = convnet_first_pad(in_channels, image_size)
    maps = [image_size + 2 * pad - 2]            # map of each block's conv output
    depth = opts["depth"] or (3 if image_size <= 32 else 4)
    if pool != "none":
        while len(maps) < depth and maps[-1] // 2 >= 2:
            maps.append(maps[-1] // 2)
        depth = len(maps)
        size = maps[-1] // 2
    else:
        size = maps[0]
    if norm == "group" and width % 4:
        raise RayddError(f"model 'convnet': norm=group needs a width divisible by 4, got width={width}")
    stages = []
    channels = in_channels
    for d in range(depth):
        layers = [nn.Conv2d(channels, width, 3, padding=pad if d == 0 else 1)]
        layers += filter(None, [norm_layer(norm, width), act_layer(act), pool2x2(pool)])
        stages.append((f"block{d + 1}", nn.Sequential(*layers)))
        channels = width
    stages += [("pool", nn.Flatten()), ("fc", nn.Linear(width * size * size, num_classes))]
    config = dict(width=width, depth=depth, norm=norm, act=act, pool=pool, first_pad=pad)
    return Built(stages, elf_split=f"block{depth}", config=config)


def mlp(opts: dict, in_channels: int, num_classes: int, image_size: int) -> Built:
    """Flatten → ``depth`` × [linear(width) → ReLU] → linear (DC MLP: width 128, two hidden layers).
    No spatial map: ``feature_map`` and ``embedding`` are both the last hidden layer."""
    width, depth = opts["width"], opts["depth"]
    stages = []
    features = in_channels * image_size * image_size
    for d in range(depth):
        layers = ([nn.Flatten()] if d == 0 else []) + [nn.Linear(features, width), nn.ReLU()]
        stages.append((f"fc{d + 1}", nn.Sequential(*layers)))
        features = width
    stages += [("pool", nn.Identity()), ("fc", nn.Linear(width, num_classes))]
    return Built(stages, config=dict(width=width, depth=depth))


def lenet(opts: dict, in_channels: int, num_classes: int, image_size: int) -> Built:
    """DC LeNet: 2 × [5×5 conv → ReLU → 2×2 max-pool], fc 120 → fc 84 → classes.

    Convs are unpadded as for CIFAR; 28 px pads the first by 2 (as the DC code does for MNIST);
    below 16 px both are padded by 2 so the map survives. ``pool`` holds flatten → fc120 → fc84,
    so ``feature_map`` is the last conv map and ``embedding`` the 84-d penultimate layer."""
    small = image_size < 16
    pad1 = 2 if small or image_size == 28 else 0
    pad2 = 2 if small else 0
    size = ((image_size + 2 * pad1 - 4) // 2 + 2 * pad2 - 4) // 2
    _need("lenet", size, 1, image_size)
    stages = [
        ("conv1", nn.Sequential(nn.Conv2d(in_channels, 6, 5, padding=pad1), nn.ReLU(), nn.MaxPool2d(2))),
        ("conv2", nn.Sequential(nn.Conv2d(6, 16, 5, padding=pad2), nn.ReLU(), nn.MaxPool2d(2))),
        ("pool", nn.Sequential(nn.Flatten(), nn.Linear(16 * size * size, 120), nn.ReLU(),
                               nn.Linear(120, 84), nn.ReLU())),
        ("fc", nn.Linear(84, num_classes)),
    ]
    return Built(stages)


def alexnet(opts: dict, in_channels: int, num_classes: int, image_size: int) -> Built:
    """DC AlexNet for small images: five convs (128-192-256-192-192), three 2×2 max-pools, one linear.
    ELF splits after conv5, whose 4×4 map (28/32 px) has the size of the ConvNet's last block."""
    size = effective_size(image_size) // 8
    _need("alexnet", size, 1, image_size)

    def conv(cin, cout, k, pad, pooled):
        return nn.Sequential(*[nn.Conv2d(cin, cout, k, padding=pad), nn.ReLU()]
                             + ([nn.MaxPool2d(2)] if pooled else []))

    stages = [
        ("conv1", conv(in_channels, 128, 5, _first_pad(image_size, 5), True)),
        ("conv2", conv(128, 192, 5, 2, True)),
        ("conv3", conv(192, 256, 3, 1, False)),
        ("conv4", conv(256, 192, 3, 1, False)),
        ("conv5", conv(192, 192, 3, 1, True)),
        ("pool", nn.Flatten()),
        ("fc", nn.Linear(192 * size * size, num_classes)),
    ]
    return Built(stages, elf_split="conv5")


VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def group_vgg(layers: list[nn.Module], image_size: int) -> tuple[list[tuple[str, nn.Module]], int]:
    """Group a flat VGG layer list into stages ``conv1..convN`` (each conv with its norm/act and the
    pool that follows it). A pool is dropped when its input is below 4 px (below 2 px for the last
    one), so 8–16 px inputs keep ≥ 2×2 maps for every conv. Returns (stages, final map size)."""
    size = effective_size(image_size)
    groups: list[list[nn.Module]] = []
    last_pool = max(i for i, m in enumerate(layers) if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)))
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Conv2d):
            groups.append([layer])
        elif isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
            if size >= 4 or (i == last_pool and size >= 2):
                groups[-1].append(layer)
                size //= 2
        else:
            groups[-1].append(layer)
    return [(f"conv{i + 1}", nn.Sequential(*g)) for i, g in enumerate(groups)], size


def vgg_elf_split(image_size: int) -> str:
    """ELF paper: split VGG11 after its 5th conv (32 px) / 6th conv (64 px); both give the 4×4 map
    of the ConvNet (D3 / D4) whose features are matched."""
    return "conv5" if image_size <= 32 else "conv6"


def vgg11(opts: dict, in_channels: int, num_classes: int, image_size: int) -> Built:
    """DC VGG11: [conv3×3 → norm → act] with 2×2 pools, flatten → linear. The DC code defaults to
    instance norm ('vgg11', as used by ELF's VGG11-IN) and offers batch norm ('vgg11_bn')."""
    norm, act, pool = opts["norm"], opts["act"], opts["pool"]
    layers: list[nn.Module] = []
    channels = in_channels
    for v in VGG11_CFG:
        if v == "M":
            layers.append(pool2x2(pool))
            continue
        pad = _first_pad(image_size, 3) if not layers else 1
        layers += filter(None, [nn.Conv2d(channels, v, 3, padding=pad), norm_layer(norm, v), act_layer(act)])
        channels = v
    stages, size = group_vgg(layers, image_size)
    stages += [("pool", nn.Flatten()), ("fc", nn.Linear(channels * size * size, num_classes))]
    return Built(stages, elf_split=vgg_elf_split(image_size), config=dict(norm=norm, act=act, pool=pool))
