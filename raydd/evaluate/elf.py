"""ELF (paper 001): the feature model trained on real data, its features, and the split of an
evaluated net into front and rear with the projections that adapt it to the features' shape
(see :mod:`raydd.evaluate.protocol` for the loss)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import EvalConfig, Resources, section
from ..errors import ConfigError, RayddError
from ..io import load_tensors, read_json, save_tensors, write_json
from ..synset import Synset

ELF_DISTANCES = ("ce", "l1", "l2", "cosine")


def elf_distance(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """D(front output, feature). ``ce``: cross-entropy over the channel axis with the features as
    (unnormalised) targets, averaged over batch and positions, like the official ELF code."""
    if kind == "ce":
        return F.cross_entropy(pred, target)
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "l2":
        return F.mse_loss(pred, target)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(pred.flatten(1), target.flatten(1), dim=1)).mean()
    raise ConfigError(f"evaluate.elf.distance: {kind!r} is invalid; expected one of {', '.join(ELF_DISTANCES)}")


def next_stage(model: nn.Module, split: str) -> str:
    names = list(model.stage_names)
    if split not in names or names.index(split) + 1 >= len(names):
        raise RayddError(f"ELF split {split!r} is not an inner stage of {model.spec} (stages: {', '.join(names)})")
    return names[names.index(split) + 1]


def split_point(model: nn.Module) -> str:
    """The first stage of the rear section, or a clear refusal for nets without a split."""
    split = getattr(model, "elf_split", None)
    if split is None:
        raise RayddError(f"ELF cannot evaluate {model.spec}: it has no front/rear split (ELF needs a "
                         f"convolutional feature map, e.g. convnet, resnet18, vgg11); drop mode 'elf' for it")
    return next_stage(model, split)


@torch.no_grad()
def front_shape(model: nn.Module, image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-sample shape of the front section's output, probed in eval mode (no statistics change)."""
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        x = torch.zeros((1, *image_shape), dtype=p.dtype, device=p.device)
        return tuple(model.run(x, stop=split_point(model)).shape[1:])
    finally:
        model.train(was_training)


@torch.no_grad()
def extract_features(model: nn.Module, images: torch.Tensor, *, batch_size: int = 256,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """Features of (un-augmented) ``images`` at the feature model's own ELF split, in eval mode."""
    stop = split_point(model)
    model.to(device).eval()
    out = [model.run(images[i:i + batch_size].to(device), stop=stop).cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out).float()


class ElfNet(nn.Module):
    """The evaluated net plus the learned projections that adapt its split to the feature shape.

    ``forward`` is the plain net, so accuracy is measured on it alone; the projections exist
    only for the two ELF terms during training.
    """

    def __init__(self, net: nn.Module, image_shape: tuple[int, ...], feature_shape: tuple[int, ...]):
        super().__init__()
        self.net = net
        self.start = split_point(net)
        fs = tuple(feature_shape)
        hs = front_shape(net, image_shape)
        if len(hs) != len(fs) or len(hs) not in (1, 3):
            raise RayddError(f"ELF cannot evaluate {net.spec}: its front outputs {shape_text(hs)} but the "
                             f"features are {shape_text(fs)}; only channel counts and spatial grids can be adapted")
        self.front_shape, self.feature_shape = hs, fs
        self.grid = hs[1:] if len(hs) == 3 and hs[1:] != fs[1:] else None
        if hs[0] == fs[0]:
            self.to_feature: nn.Module = nn.Identity()
            self.from_feature: nn.Module = nn.Identity()
        elif len(hs) == 3:
            self.to_feature = nn.Conv2d(hs[0], fs[0], kernel_size=1)
            self.from_feature = nn.Conv2d(fs[0], hs[0], kernel_size=1)
        else:
            self.to_feature = nn.Linear(hs[0], fs[0])
            self.from_feature = nn.Linear(fs[0], hs[0])

    @property
    def adapted(self) -> str:
        """How the shapes were reconciled, for the report ('' when they matched)."""
        parts = []
        if not isinstance(self.to_feature, nn.Identity):
            parts.append(f"1x1 projection {self.front_shape[0]}<->{self.feature_shape[0]} channels")
        if self.grid is not None:
            parts.append(f"features resized {shape_text(self.feature_shape[1:])}->{shape_text(self.grid)}")
        return "; ".join(parts)

    def fit_features(self, features: torch.Tensor) -> torch.Tensor:
        """Stored features on the front's spatial grid (done once, before training)."""
        if tuple(features.shape[1:]) != self.feature_shape:
            raise RayddError(f"ELF features have shape {shape_text(features.shape[1:])}, expected "
                             f"{shape_text(self.feature_shape)}")
        if self.grid is None:
            return features
        shrink = all(g <= s for g, s in zip(self.grid, self.feature_shape[1:]))
        if shrink:
            return F.interpolate(features, size=self.grid, mode="area")
        return F.interpolate(features, size=self.grid, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor, f: torch.Tensor, cfg) -> torch.Tensor:
        h = self.net.run(x, stop=self.start)
        task = F.cross_entropy(self.net.run(h, start=self.start), y)
        front = elf_distance(self.to_feature(h), f, cfg.distance)
        rear = F.cross_entropy(self.net.run(self.from_feature(f), start=self.start), y)
        return task + cfg.lambda_front * front + cfg.lambda_rear * rear


def shape_text(s: Iterable[int]) -> str:
    return "×".join(str(int(v)) for v in s)


def train_feature_model(spec: str, train_data: tuple | Callable[[], Iterable], ecfg: EvalConfig, *,
                        image_shape: tuple[int, int, int], num_classes: int, epochs: int, seed: int = 0,
                        dsa_strategy: str | None = None, device: str | torch.device = "cpu",
                        on_epoch: Callable[[str, int, float], None] | None = None) -> nn.Module:
    """The ELF feature model: ``spec`` trained on the real training data with the evaluation recipe.

    ``train_data``: ``(x, y)`` tensors or a callable returning fresh batches per epoch. The model
    must have an ELF split itself (the paper takes the output of the last conv block).
    """
    from ..augment import DSA
    from ..models import build
    from ..train import train_classifier

    torch.manual_seed(int(seed))
    model = build(spec, image_shape[0], num_classes, image_shape[1])
    split_point(model)
    dsa = DSA(dsa_strategy) if ecfg.dsa and dsa_strategy else None
    train_classifier(model, train_data, epochs=epochs, lr=ecfg.lr, momentum=ecfg.momentum,
                     weight_decay=ecfg.weight_decay, batch_size=ecfg.batch_size, dsa=dsa, device=device,
                     generator=torch.Generator().manual_seed(int(seed)), precision=ecfg.precision,
                     progress=None if on_epoch is None else (lambda ep, loss: on_epoch("features", ep, loss)))
    return model.eval()


def elf_refusal(net: torch.nn.Module, image_shape: tuple[int, ...], feature_shape: tuple[int, ...]) -> str:
    try:
        ElfNet(net, image_shape, feature_shape)
    except RayddError as e:
        return str(e).split(": ", 1)[-1] if str(e).startswith("ELF cannot") else str(e)
    return ""


def ensure_feature_model(ecfg: EvalConfig, data: str, info: Any, fp: str, dsa_strategy: str, out: Path,
                       resources: Resources, device: str, zca: dict[str, str] | None, ray_cfg: Any,
                       progress: bool):
    """Train (once) the ELF feature model on real data as a Ray task; returns (model, sha, feature shape)."""
    from ..models import build

    shape, classes = tuple(int(v) for v in info.shape), int(info.num_classes)
    model = build(ecfg.elf.feature_arch, shape[0], classes, shape[1])
    try:
        fshape = front_shape(model, shape)
    except RayddError as e:
        raise ConfigError(f"evaluate.elf.feature_arch: {e}") from None
    weights, meta_path = out / "elf_feature_model.safetensors", out / "elf_feature_model.json"
    want = {"spec": model.spec, "epochs": ecfg.elf.feature_epochs, "lr": ecfg.lr, "momentum": ecfg.momentum,
            "weight_decay": ecfg.weight_decay, "batch_size": ecfg.batch_size, "dsa": ecfg.dsa,
            "dsa_strategy": dsa_strategy, "data": fp}
    meta = read_json(meta_path) if meta_path.exists() else {}
    if not (weights.exists() and all(meta.get(k) == v for k, v in want.items())):
        import ray

        from ..raycluster import init_ray
        init_ray(ray_cfg)
        if progress:
            print(f"[evaluate] training the ELF feature model {model.spec} for {ecfg.elf.feature_epochs} epochs",
                  flush=True)
        # it runs alone, before any trial: give it the free CPUs of a node, not one trial's share
        node = max([n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")], default=0)
        cpus = max(resources.cpus, math.floor(min(node, ray.available_resources().get("CPU", 0))))
        task = ray.remote(num_cpus=cpus, num_gpus=resources.gpus, max_retries=1)(_feature_task)
        state, acc = ray.get(task.remote(ecfg.elf.feature_arch, data, dataclasses.asdict(ecfg),
                                         dsa_strategy, device, cpus, zca))
        sha = save_tensors(weights, state, metadata={"spec": model.spec})
        write_json(meta_path, {**want, "sha256": sha, "test_acc": acc})
        meta = read_json(meta_path)
    model.load_state_dict(load_tensors(weights, sha256=meta["sha256"]))
    return model.eval(), meta["sha256"], fshape


def _feature_task(spec: str, data: str, ecfg_dict: dict, dsa_strategy: str, device: str,
                  cpus: float, zca: dict[str, str] | None) -> tuple[dict[str, torch.Tensor], float]:
    from ..data import load_info
    from ..train import accuracy, set_threads
    from .baselines import real_test, real_train, whitener

    set_threads(cpus)
    ecfg = section(EvalConfig, ecfg_dict, "evaluate")
    info = load_info(data)
    whiten = whitener(zca)
    model = train_feature_model(
        spec, real_train(info, whiten, ecfg.batch_size, seed=0), ecfg,
        image_shape=tuple(info.shape), num_classes=info.num_classes, epochs=ecfg.elf.feature_epochs,
        dsa_strategy=dsa_strategy, device=device)
    acc = accuracy(model, real_test(info, zca)(), device)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, acc


def distilled_features(syn: Synset, syn_sha: str, model: torch.nn.Module, model_sha: str, out: Path) -> Path:
    path, meta_path = out / "elf_features.safetensors", out / "elf_features.json"
    want = {"synset_sha256": syn_sha, "feature_model_sha256": model_sha}
    meta = read_json(meta_path) if meta_path.exists() else {}
    if not (path.exists() and all(meta.get(k) == v for k, v in want.items())):
        sha = save_tensors(path, {"elf_features": extract_features(model, syn.images)})
        write_json(meta_path, {**want, "sha256": sha})
    return path
