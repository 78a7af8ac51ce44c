"""MetaDD (paper 000): CAM agreement across frozen auxiliary networks, an add-on image-loss term.

Per synthetic image x with label y, backbone logits t (APM's teacher) and auxiliary nets m:
  L_ai  = Σ_m CE(a_m(x), y) + Σ_m KL(softmax a_m(x) ‖ softmax t)                  (Eq. 4-5)
  c_m   = Grad-CAM of L_ai on a_m's last feature map, without ReLU               (Eq. 6-8)
  c̃_m   = min-max normalised c_m, resized to ``cam_size`` × ``cam_size``          (Eq. 10)
  var   = mean over positions of the variance of c̃_m across the nets             (Eq. 11)
  L_pos = −Σ_m mean over positions of relu(c_m)                                   (Eq. 9)
  L     = w_ce·ΣCE + w_kl·ΣKL + w_var·var + w_pos·L_pos, averaged over the batch  (Eq. 12 without L_dd)
The CAM itself is a gradient, so ∂L/∂x needs double backpropagation.

Interpretations (the paper has no code):
- The CAM is always taken of the unweighted L_ai of Eq. 4 (w_ce/w_kl weight only its share of the
  loss), so turning a loss term off does not change what the CAMs look at.
- Eq. 9 writes L_pos = Σ c while the text says the positive values are to be *maximised*; a loss is
  minimised, so the default (``pos_sign: maximize``) is the negated positive mass; ``minimize``
  takes Eq. 9 at its word (+ positive mass). Means, not sums, keep the weight independent of sizes.
- CNNs: the feature map is the input of ``pool`` (the StagedNet ``feature_map`` tap), or, where that
  is below 2×2 (8 px ConvNet), the last body stage with a ≥ 2×2 map; a 1×1 map has no CAM.
- ViTs: patch tokens A_n of the last block's output, Grad-CAM weights α = Σ_tokens ∂L_ai/∂A (only
  the tokens the head reads get a gradient, e.g. the class token), token score ⟨α, A_n⟩ weighted by
  the class token's attention to n in the last block summed over heads, W_agg (Eq. 7-8).

Two-phase split, so that the nets can live in services and even on different actors while the
variance still couples them: phase 1 (:meth:`LocalAuxiliaries.cams`) gives each net's per-image
CE, KL, raw CAM and normalised CAM; :func:`couple` turns all of them into the loss and the
cotangents (∂L/∂ each of those outputs); phase 2 (:meth:`LocalAuxiliaries.input_grad`) recomputes
each net's graph and returns the VJP of its cotangents, ∂L/∂x and ∂L/∂t. The worker turns ∂L/∂t
into a teacher VJP. Every quantity is per image (nets in eval mode), so requests can be batched.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields
from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, RayddError
from .base import Services, register_loss_term

OUTPUTS = ("ce", "kl", "cam", "cam_norm")   # phase-1 outputs per net, and phase-2 cotangents
EPS = 1e-6                                  # min-max normalisation of a (near-)constant CAM


@dataclass(frozen=True)
class MetaDDOptions:
    """Weights of the terms (paper: all 1) and the CAM resolution."""
    ce: float = 1.0
    kl: float = 1.0
    var: float = 1.0
    pos: float = 1.0
    pos_sign: str = "maximize"
    cam_size: int = 8

    def __post_init__(self):
        for name in ("ce", "kl", "var", "pos"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"distill.metadd.{name}: {v!r} is invalid; expected a weight >= 0")
        if self.pos_sign not in ("maximize", "minimize"):
            raise ConfigError(f"distill.metadd.pos_sign: {self.pos_sign!r} is invalid; "
                              "expected 'maximize' or 'minimize'")
        if isinstance(self.cam_size, bool) or not isinstance(self.cam_size, int) or self.cam_size < 2:
            raise ConfigError(f"distill.metadd.cam_size: {self.cam_size!r} is invalid; expected an integer >= 2")

    @classmethod
    def from_config(cls, section: Any) -> "MetaDDOptions":
        """From any object with these attribute names (the config section)."""
        return cls(**{f.name: getattr(section, f.name) for f in fields(cls) if hasattr(section, f.name)})


class AuxService(Protocol):
    """Frozen auxiliary nets (in-process :class:`LocalAuxiliaries`, or ``raydd.aux_services``)."""
    num_models: int

    def cams(self, x: Tensor, y: Tensor, t: Tensor, models: Sequence[int],
             cam_size: int) -> list[dict[str, Tensor]]: ...

    def input_grad(self, x: Tensor, y: Tensor, t: Tensor, cotangents: Sequence[dict[str, Tensor]],
                   models: Sequence[int], cam_size: int) -> tuple[Tensor, Tensor]: ...


# ---------------------------------------------------------------------------- one network

def _math_attention():
    """Fused attention kernels have no double backward; the math kernel computes the same."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:   # pragma: no cover - old torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


class CamNet:
    """A frozen StagedNet split at its CAM layer: ``run(x)`` → (logits, feature, attention|None)."""

    def __init__(self, net: nn.Module):
        from ..models.timm_nets import ViTEmbed
        from ..models.vit import PatchEmbed

        names = getattr(net, "stage_names", None)
        if names is None:
            raise RayddError(f"auxiliary net {type(net).__name__} is not a raydd model (StagedNet); "
                             "build it with raydd.models.build")
        self.net, self.spec = net, net.spec
        first = net.stages[names[0]]
        self.vit = isinstance(first, (PatchEmbed, ViTEmbed))
        if self.vit:
            blocks = [n for n in names if n.startswith("block")]
            self.last_block = blocks[-1]
            self.after = names[names.index(self.last_block) + 1]
            self.prefix = getattr(net.stages["pool"], "num_prefix_tokens", 1)
            self.grid = math.isqrt(net.config["tokens"])
        else:
            self.stage = self._cam_stage(net, names)
            self.after = names[names.index(self.stage) + 1]

    @staticmethod
    def _cam_stage(net: nn.Module, names: list[str]) -> str:
        """The input of ``pool`` if it is a ≥ 2×2 map, else the last body stage with one."""
        shapes = {}
        p = next(net.parameters())
        x = torch.zeros(1, net.in_channels, net.image_size, net.image_size, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            for name in names[:-2]:
                x = net.stages[name](x)
                shapes[name] = tuple(x.shape)
        for name in reversed(names[:-2]):
            if len(shapes[name]) == 4 and min(shapes[name][2:]) >= 2:
                return name
        raise RayddError(f"auxiliary {net.spec} has no spatial feature map of at least 2x2 for a CAM "
                         "(use a CNN, vit_apm or vit_tiny)")

    def run(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        net = self.net
        if not self.vit:
            feat = net.run(x, stop=self.after)
            return net.run(feat, start=self.after), feat, None
        from ..models.vit import class_token_attention
        h = net.run(x, stop=self.last_block)
        block = net.stages[self.last_block]
        attn = class_token_attention(block, h)
        feat = block(h)
        return net.run(feat, start=self.after), feat, attn

    def cam(self, feat: Tensor, grad: Tensor, attn: Tensor | None) -> Tensor:
        """B × h × w Grad-CAM (Eq. 6) or ViT CAM (Eq. 7-8), without ReLU."""
        if not self.vit:
            alpha = grad.mean((2, 3), keepdim=True)
            return (alpha * feat).sum(1)
        alpha = grad.sum(1, keepdim=True)                              # B × 1 × D
        score = (feat[:, self.prefix:] * alpha).sum(-1)               # B × N
        w_agg = attn.sum(1)[:, self.prefix:]                          # B × N
        return (w_agg * score).reshape(len(feat), self.grid, self.grid)


def aux_outputs(cn: CamNet, x: Tensor, y: Tensor, t: Tensor, cam_size: int, *,
                create_graph: bool, cams: bool = True) -> dict[str, Tensor]:
    """Per-image CE, KL(a‖t), raw CAM resized to cam_size² and its min-max normalisation
    (``cams=False``: CE and KL only). ``x`` must require grad (the CAM is a gradient); with
    ``create_graph`` all outputs stay differentiable in x and t."""
    with _math_attention():
        logits, feat, attn = cn.run(x)
        ce = F.cross_entropy(logits, y, reduction="none")
        logp, logq = F.log_softmax(logits, 1), F.log_softmax(t, 1)
        kl = (logp.exp() * (logp - logq)).sum(1)
        if not cams:
            return {"ce": ce, "kl": kl}
        (grad,) = torch.autograd.grad((ce + kl).sum(), feat, create_graph=create_graph)
        cam = cn.cam(feat, grad, attn)
    cam = F.interpolate(cam[:, None], size=(cam_size, cam_size), mode="bilinear", align_corners=False)[:, 0]
    lo, hi = cam.amin((1, 2), keepdim=True), cam.amax((1, 2), keepdim=True)
    return {"ce": ce, "kl": kl, "cam": cam, "cam_norm": (cam - lo) / (hi - lo + EPS)}


def aux_vjp(cn: CamNet, x: Tensor, y: Tensor, t: Tensor, cot: dict[str, Tensor],
            cam_size: int) -> tuple[Tensor, Tensor]:
    """Phase 2 for one net: (∂/∂x, ∂/∂t) of Σ ⟨cotangent, output⟩ over :data:`OUTPUTS`, by
    recomputing the graph (it cannot wait in a service between the two calls)."""
    x = x.detach().requires_grad_(True)
    t = t.detach().requires_grad_(True)
    with torch.enable_grad():
        cams = any(cot[k].any() for k in ("cam", "cam_norm"))   # zero: no double backprop needed
        out = aux_outputs(cn, x, y, t, cam_size, create_graph=True, cams=cams)
        total = sum((cot[k].to(v) * v).sum() for k, v in out.items())
        gx, gt = torch.autograd.grad(total, (x, t), allow_unused=True)
    return (torch.zeros_like(x) if gx is None else gx), (torch.zeros_like(t) if gt is None else gt)


class LocalAuxiliaries:
    """Frozen auxiliary nets in this process (tests, single-process runs, and inside the actor).
    Results come back on the device of ``x``; ∂/∂x and ∂/∂t are summed over the requested nets."""

    def __init__(self, nets: Sequence[nn.Module], device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.nets = [CamNet(n.to(self.device).eval().requires_grad_(False)) for n in nets]

    @property
    def num_models(self) -> int:
        return len(self.nets)

    @property
    def specs(self) -> list[str]:
        return [cn.spec for cn in self.nets]

    def _net(self, i: int) -> CamNet:
        if not 0 <= i < len(self.nets):
            raise RayddError(f"auxiliary index {i} is out of range; the service hosts {len(self.nets)}")
        return self.nets[i]

    def _inputs(self, x: Tensor, y: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        d = self.device
        return x.detach().to(d), y.to(d).long(), t.detach().to(d)

    def cams(self, x: Tensor, y: Tensor, t: Tensor, models: Sequence[int],
             cam_size: int) -> list[dict[str, Tensor]]:
        xd, yd, td = self._inputs(x, y, t)
        out = []
        with torch.enable_grad():
            for m in models:
                o = aux_outputs(self._net(m), xd.clone().requires_grad_(True), yd, td, cam_size,
                                create_graph=False)
                out.append({k: v.detach().to(x.device) for k, v in o.items()})
        return out

    def input_grad(self, x: Tensor, y: Tensor, t: Tensor, cotangents: Sequence[dict[str, Tensor]],
                   models: Sequence[int], cam_size: int) -> tuple[Tensor, Tensor]:
        xd, yd, td = self._inputs(x, y, t)
        gx, gt = torch.zeros_like(xd), torch.zeros_like(td)
        for m, cot in zip(models, cotangents, strict=True):
            a, b = aux_vjp(self._net(m), xd, yd, td, {k: v.to(self.device) for k, v in cot.items()}, cam_size)
            gx, gt = gx + a, gt + b
        return gx.to(x.device), gt.to(x.device)


# ---------------------------------------------------------------------------- the coupling

def couple(outs: Sequence[dict[str, Tensor]], opts: MetaDDOptions,
           n: int) -> tuple[dict[str, float], list[dict[str, Tensor]]]:
    """The loss of all nets' phase-1 outputs, summed over the images and divided by ``n`` (the
    whole mini-batch, so segments add up), and its cotangents for each net's outputs.
    Returns ({total, ce, kl, var, pos}, cotangents)."""
    leaves = [{k: o[k].detach().requires_grad_(True) for k in OUTPUTS} for o in outs]
    ce = sum(o["ce"].sum() for o in leaves)
    kl = sum(o["kl"].sum() for o in leaves)
    norm = torch.stack([o["cam_norm"] for o in leaves])                 # M × B × S × S
    var = norm.var(0, unbiased=False).mean((1, 2)).sum()                # Eq. 11, per image, summed
    sign = -1.0 if opts.pos_sign == "maximize" else 1.0
    pos = sign * sum(F.relu(o["cam"]).mean((1, 2)).sum() for o in leaves)
    parts = {"ce": ce / n, "kl": kl / n, "var": var / n, "pos": pos / n}
    total = opts.ce * parts["ce"] + opts.kl * parts["kl"] + opts.var * parts["var"] + opts.pos * parts["pos"]
    flat = [o[k] for o in leaves for k in OUTPUTS]
    grads = torch.autograd.grad(total, flat, allow_unused=True)   # None: a term weighted 0
    grads = [torch.zeros_like(v) if g is None else g for v, g in zip(flat, grads)]
    cots = [dict(zip(OUTPUTS, grads[i:i + len(OUTPUTS)])) for i in range(0, len(grads), len(OUTPUTS))]
    return {"total": total.item(), **{k: v.item() for k, v in parts.items()}}, cots


@register_loss_term("metadd")
class MetaDDTerm:
    """The MetaDD term of a method's image loss. ``services.auxiliaries`` hosts the nets and
    ``services.teachers`` the backbone, so the worker holds neither."""

    def __init__(self, opts: MetaDDOptions | None = None, *, segment: int | None = None):
        self.opts = opts or MetaDDOptions()
        self.segment = segment
        self.stats: dict = {}

    @property
    def active(self) -> bool:
        o = self.opts
        return any(w > 0 for w in (o.ce, o.kl, o.var, o.pos))

    def terms(self, x: Tensor, y: Tensor, aux: AuxService, t: Tensor,
              n: int) -> tuple[dict[str, float], Tensor, Tensor]:
        """One segment: (losses, ∂L/∂x through the auxiliaries, ∂L/∂t) with the batch size ``n``.
        A method that already holds the backbone logits ``t`` adds ∂L/∂t to its own teacher
        cotangent, so one teacher VJP serves both terms."""
        models = range(aux.num_models)
        outs = aux.cams(x, y, t, models, self.opts.cam_size)
        losses, cots = couple(outs, self.opts, n)
        gx, gt = aux.input_grad(x, y, t, cots, models, self.opts.cam_size)
        return losses, gx, gt

    def loss_and_grad(self, images: Tensor, labels: Tensor, services: Services, *,
                      teacher: int = 0) -> tuple[float, Tensor]:
        """L (Eq. 12 without L_dd) on ``images`` and ∂L/∂images; per-term losses and the gradient
        norm in :attr:`stats`. ``teacher`` is the backbone's index in the teacher service."""
        aux = services.auxiliaries
        if aux is None:
            raise RayddError("the metadd loss term needs an auxiliary service (Services.auxiliaries)")
        n = len(images)
        grad = torch.zeros_like(images)
        sums = dict.fromkeys(("total", "ce", "kl", "var", "pos"), 0.0)
        if self.active:
            seg = self.segment or n
            for i in range(0, n, seg):
                x, y = images[i:i + seg].detach(), labels[i:i + seg]
                t = services.teachers.logits(x, teacher)
                losses, gx, gt = self.terms(x, y, aux, t, n)
                grad[i:i + seg] = gx + services.teachers.input_grad(x, gt, teacher)
                sums = {k: sums[k] + losses[k] for k in sums}
        self.stats = {**sums, "grad_norm": float(grad.norm())}
        return sums["total"], grad
