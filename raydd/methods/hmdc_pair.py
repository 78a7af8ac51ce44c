"""HMDC's model side: the two heterogeneous nets, Spatial-Semantic Decomposition (SSD) with its
projections and layer-matching matrix, and their trajectory, trained on real data only.

:class:`PairTrajectory` never sees a synthetic image, so it can run apart from the image updates
(one Ray actor publishing versioned states, class-sharded image workers; see ``hmdc.py``).
Version ``t`` of the pair is what image step ``t`` matches against.
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..augment import cutmix
from ..config.hmdc import HMDCConfig
from ..errors import ConfigError, RayddError
from .hmdc_parts import augment, generator, soft_ce

StateDict = dict[str, Tensor]


def decompose(f: Tensor, size: int) -> Tensor:
    """B×(1+size²)×C: the semantic token (CNN: global mean; ViT: class token 0), then the spatial
    map (ViT: patch tokens as a square) bilinearly resized (align_corners=True) to size×size."""
    if f.dim() == 4:
        sem, maps = f.mean(dim=(2, 3)), f
    elif f.dim() == 3:
        side = math.isqrt(f.shape[1] - 1)
        sem = f[:, 0]
        maps = f[:, 1:].transpose(1, 2).reshape(f.shape[0], f.shape[2], side, side)
    else:
        raise RayddError(f"SSD: a feature of shape {tuple(f.shape)} is neither a map nor tokens")
    maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=True)
    return torch.cat([sem[:, None], maps.flatten(2).transpose(1, 2)], dim=1)


def map_side(f: Tensor) -> int:
    return f.shape[2] if f.dim() == 4 else math.isqrt(f.shape[1] - 1)


class SSD(nn.Module):
    """Per-layer Linear(C_l → d), d the smallest width of any tapped layer, shared by a layer's
    semantic and spatial tokens; the deeper net's layers mixed down to the shallower's count by
    ``softmax(Mᵀ, dim=1)`` (M = 0 at init, softmax over the shallow slots per deep layer, as the
    code: at init every slot is (L_deep / L_shallow) × the mean). ``loss`` is the MSE."""

    def __init__(self, chans1: Sequence[int], chans2: Sequence[int], size: int):
        super().__init__()
        width = min(*chans1, *chans2)
        self.size = size
        self.proj1 = nn.ModuleList(nn.Linear(c, width) for c in chans1)
        self.proj2 = nn.ModuleList(nn.Linear(c, width) for c in chans2)
        self.mix = 2 if len(chans2) >= len(chans1) else 1          # the side that is mixed down
        self.match = nn.Parameter(torch.zeros(min(len(chans1), len(chans2)), max(len(chans1), len(chans2))))

    @staticmethod
    def tokens(feats: Sequence[Tensor], proj: nn.ModuleList, size: int) -> Tensor:
        """B×L×(1+size²)×d."""
        return torch.stack([p(decompose(f, size)) for f, p in zip(feats, proj)], dim=1)

    def forward(self, f1: Sequence[Tensor], f2: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        t1, t2 = self.tokens(f1, self.proj1, self.size), self.tokens(f2, self.proj2, self.size)
        s = torch.softmax(self.match.t(), dim=1)                  # L_deep × L_shallow
        if self.mix == 2:
            t2 = torch.einsum("blnd,lj->bjnd", t2, s)
        else:
            t1 = torch.einsum("blnd,lj->bjnd", t1, s)
        return t1, t2

    def loss(self, f1: Sequence[Tensor], f2: Sequence[Tensor]) -> Tensor:
        a, b = self(f1, f2)
        return F.mse_loss(a, b)


def default_taps(net: nn.Module, probe: Tensor) -> list[str]:
    """The body blocks; a CNN's last block counts twice, as the official ConvNet returns it (L = 4)."""
    taps = [n for n in net.stage_names if n.startswith("block")]
    if not taps:
        raise ConfigError(f"distill.hmdc: model {net.spec!r} has no 'block*' stages to distil between")
    last = net.features(probe, taps[-1])[taps[-1]]
    return taps + [taps[-1]] if last.dim() == 4 else taps


class PairModels(nn.Module):
    """model1, model2 and the SSD between them; ``outputs(x)`` gives both nets' logits and tapped
    features in one forward each."""

    def __init__(self, cfg: HMDCConfig, in_channels: int, num_classes: int, image_size: int):
        super().__init__()
        from ..models import build
        self.net1 = build(cfg.model1, in_channels, num_classes, image_size)
        self.net2 = build(cfg.model2, in_channels, num_classes, image_size)
        for net in (self.net1, self.net2):
            for m in net.modules():
                if getattr(m, "track_running_stats", False):
                    raise ConfigError(f"distill.hmdc: model {net.spec!r} keeps running statistics (batch "
                                      "norm); the image update would change the model trajectory")
                if hasattr(m, "fused_attn"):
                    m.fused_attn = False        # double backward through attention (the code's VT:9)
        probe = torch.zeros(1, in_channels, image_size, image_size)
        self.taps1, self.taps2 = default_taps(self.net1, probe), default_taps(self.net2, probe)
        f1, f2 = self._feats(self.net1, self.taps1, probe), self._feats(self.net2, self.taps2, probe)
        size = cfg.ssd_size or min(map_side(f) for f in f1 + f2)
        chans = [[f.shape[1] if f.dim() == 4 else f.shape[2] for f in fs] for fs in (f1, f2)]
        self.ssd = SSD(chans[0], chans[1], size)

    @staticmethod
    def _feats(net: nn.Module, taps: list[str], x: Tensor) -> list[Tensor]:
        d = net.features(x, list(dict.fromkeys(taps)))
        return [d[t] for t in taps]

    def outputs(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor, list[Tensor]]:
        out = []
        for net, taps in ((self.net1, self.taps1), (self.net2, self.taps2)):
            d = net.features(x, list(dict.fromkeys(taps)) + ["logits"])
            out += [d["logits"], [d[t] for t in taps]]
        return tuple(out)

    def features(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        return self._feats(self.net1, self.taps1, x), self._feats(self.net2, self.taps2, x)

    @torch.no_grad()
    def embed(self, x: Tensor, which: int, chunk: int = 1024) -> Tensor:
        """The embedding k-means selects with: model1's flattened last map (the ConvNet's 2048-d),
        model2's final-norm class token; no augmentation."""
        net = self.net1 if which == 1 else self.net2
        return torch.cat([net.features(x[i:i + chunk], "embedding")["embedding"] for i in range(0, len(x), chunk)])


def fresh_pair(cfg: HMDCConfig, shape: tuple[int, int, int], seed: int, device) -> PairModels:
    """A pair initialised from ``seed`` alone (PyTorch's default inits; the ViT from scratch)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PairModels(cfg, *shape).to(device)


class PairTrajectory:
    """The models, projections and matching matrix with their optimisers, trained on real data only.

    ``step`` = t: the state image step t sees. ``advance()`` moves to t+1: at an outer-iteration
    boundary (t+1 ≡ 0 mod ``reset_every``) everything is drawn afresh with fresh optimisers — the
    conv layers included (the official optimiser keeps the pre-reset ConvNet parameters, so its
    conv layers are never trained; raydd trains them); otherwise ``model_steps`` SGD steps of
    CE₁ + CE₂ + L_MD on per-sample-augmented, CutMixed real batches, then ``ssd_steps`` Adam steps
    of L_MD on the projections and M with the nets frozen."""

    def __init__(self, cfg: HMDCConfig, shape: tuple[int, int, int], real_x: Tensor, real_y: Tensor,
                 ops: Sequence[str], seed: int, device):
        self.cfg, self.shape, self.ops, self.seed, self.device = cfg, shape, list(ops), seed, device
        self.real_x, self.real_y = real_x, real_y
        self.step = 0
        self.seconds = {"models": 0.0, "ssd": 0.0}   # the last advance's split
        self._reset(0)

    def _reset(self, outer: int) -> None:
        self.models = fresh_pair(self.cfg, self.shape, int(generator(self.seed, "pair", outer).initial_seed()),
                                 self.device)
        m = self.models
        self.opt1 = torch.optim.SGD(m.net1.parameters(), lr=self.cfg.lr_model1)
        self.opt2 = torch.optim.SGD(m.net2.parameters(), lr=self.cfg.lr_model2)
        self.opt_ssd = torch.optim.Adam(m.ssd.parameters(), lr=self.cfg.lr_ssd)

    def reseed(self, seed: int) -> None:
        self.seed = seed

    def _batch(self, g: torch.Generator) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        idx = torch.randperm(len(self.real_x), generator=g)[:cfg.batch_real].to(self.real_x.device)
        x = augment(self.real_x[idx], self.ops, g, shared=False)
        t = F.one_hot(self.real_y[idx], self.shape[1]).to(x.dtype)
        return cutmix(x, t, g, cfg.cutmix_beta) if cfg.cutmix else (x, t)

    def advance(self) -> None:
        nxt = self.step + 1
        self.seconds = {"models": 0.0, "ssd": 0.0}     # the split of this advance, for the step's stats
        t0 = time.perf_counter()
        if nxt % self.cfg.reset_every == 0:
            self._reset(nxt // self.cfg.reset_every)   # the last step's training would be discarded
            self.seconds["models"] = time.perf_counter() - t0
        else:
            self._train(self.step)
        self.step = nxt

    def _train(self, t: int) -> None:
        cfg, m = self.cfg, self.models
        g = generator(self.seed, "train", t)
        t0 = time.perf_counter()
        for _ in range(cfg.model_steps):
            x, tgt = self._batch(g)
            l1, f1, l2, f2 = m.outputs(x)
            loss = soft_ce(l1, tgt) + soft_ce(l2, tgt) + (m.ssd.loss(f1, f2) if cfg.md else 0.0)
            self.opt1.zero_grad(set_to_none=True)
            self.opt2.zero_grad(set_to_none=True)
            loss.backward()
            self.opt1.step()
            self.opt2.step()
        t1 = time.perf_counter()
        self.seconds["models"] = t1 - t0
        if not cfg.md:
            return
        for _ in range(cfg.ssd_steps):
            x, _ = self._batch(g)
            with torch.no_grad():
                f1, f2 = m.features(x)
            self.opt_ssd.zero_grad(set_to_none=True)   # also drops the MD gradients of the model phase
            m.ssd.loss(f1, f2).backward()
            self.opt_ssd.step()
        self.seconds["ssd"] = time.perf_counter() - t1

    def publish(self) -> StateDict:
        """Version ``step`` of the pair: what an image worker loads into its own :class:`PairModels`."""
        out = {f"pair.{k}": v.detach().cpu().clone() for k, v in self.models.state_dict().items()}
        out["pair_step"] = torch.tensor([self.step])
        return out

    def state_dict(self) -> StateDict:
        """``publish()`` plus the Adam moments (the SGDs have no state) and the seed."""
        out = self.publish()
        out["pair_seed"] = torch.tensor([self.seed])
        for i, st in self.opt_ssd.state_dict()["state"].items():
            out.update({f"adam.{i}.{k}": v.detach().cpu().clone().reshape(-1) for k, v in st.items()})
        return out

    def load_state_dict(self, d: StateDict) -> None:
        self.step, self.seed = int(d["pair_step"]), int(d["pair_seed"])
        self._reset(self.step // self.cfg.reset_every)            # architecture and fresh optimisers
        load_published(self.models, d)
        groups = self.opt_ssd.state_dict()["param_groups"]
        state: dict[int, dict[str, Tensor]] = {}
        for k, v in d.items():
            if k.startswith("adam."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v.reshape(()) if name == "step" else v
        shapes = [p.shape for p in self.models.ssd.parameters()]
        state = {i: {n: (t if n == "step" else t.reshape(shapes[i]).to(self.device)) for n, t in s.items()}
                 for i, s in state.items()}
        self.opt_ssd.load_state_dict({"state": state, "param_groups": groups})


def load_published(models: PairModels, state: StateDict) -> int:
    """Load a published version into ``models`` (same config and shape); returns its step."""
    models.load_state_dict({k[len("pair."):]: v for k, v in state.items() if k.startswith("pair.")})
    return int(state["pair_step"])
