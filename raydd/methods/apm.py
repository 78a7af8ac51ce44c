"""APM: dataset distillation via adversarial prediction matching (paper 003), plain PyTorch.

Against Algorithm 1 of the paper:
  line 1      ``raydd.distillation.init``: real images of each class (or noise).
  line 3      ``APMGroup._refresh``: a teacher drawn uniformly, a fresh student θ₀ ~ p(θ) whose
              architecture comes from the model pool (``raydd.methods.pool``).
  line 4      ``APMGroup.step``: a mini-batch of B images.
  lines 5-9   ``train_student``: E epochs on the teacher's logits, K checkpoints.
  line 10     ``image_loss_and_grad``: Eq. 4 over the K checkpoints.
  line 11     ``APMGroup.step``: one image-optimiser step on the mini-batch.
As the official code does, a student is reused for ``refresh_every`` rounds, the image step is
SGD with momentum and one learning-rate decay, and the student sees DSA-augmented images.

Teachers are reached only through the teacher *service* (``Services.teachers``):
``logits(x, model)`` and ``input_grad(x, grad_logits, model)``, the vector-Jacobian product
through the frozen teacher. So a worker never holds a teacher, and the teacher runs two forwards
per segment (logits, then the VJP) however many checkpoints there are; the official loop runs it
forward and backward once per checkpoint.

MetaDD (paper 000): with ``distill.metadd.enabled`` the group adds ``raydd.methods.metadd``'s term
(frozen auxiliary nets of other architectures, reached through ``Services.auxiliaries``) to the
image gradient, with the round's teacher as its backbone; the term holds no state. With
``distill.balance: gbm`` the two gradients are combined by HMDC's Gradient Balance Module
(``raydd.methods.gbm``), whose per-class accumulators are part of the group's state.

ZCA: with ``data.zca`` on, the images given to :class:`APMGroup` are already whitened and the
teachers were trained on whitened data; nothing here depends on which space the images live in.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..config import DistillConfig
from ..errors import ConfigError, RayddError
from .base import Method, NonFiniteImages, Service, Services, Setup, register_method
from .gbm import GradientBalance
from .pool import sample_student_spec

StateDict = dict[str, Tensor]


def checkpoint_epochs(epochs: int, k: int) -> list[int]:
    """1-based epochs after which a student is stored: ``e mod ⌊E/K⌋ = 0`` (Algorithm 1, line 8),
    the first K of them, so exactly K (E=250, K=5: 50, 100, 150, 200, 250)."""
    step = epochs // k
    return [step * i for i in range(1, k + 1)]


def train_student(student: nn.Module, u: Tensor, targets: Tensor, *, epochs: int, checkpoints: int,
                  lr: float, batch: int, dsa: Callable | None = None,
                  generator: torch.Generator | None = None, precision: str = "fp32") -> list[StateDict]:
    """Algorithm 1 lines 5-9: L1 between the student's logits on (DSA-augmented) ``u`` and
    ``targets``, the teacher's logits on the *un-augmented* ``u`` (as the official code).

    SGD momentum 0.9, wd 5e-4, lr ×0.1 after E/2. Training stops at the last checkpoint, since
    later epochs could not change any stored state. ``precision`` "bf16": forward and loss under
    bf16 autocast, weights, optimiser and the stored checkpoints fp32."""
    from ..train import autocast
    keep = checkpoint_epochs(epochs, checkpoints)
    u, targets = u.detach(), targets.detach()
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    student.train()
    states: list[StateDict] = []
    for e in range(1, keep[-1] + 1):
        for group in opt.param_groups:
            group["lr"] = lr if e <= epochs // 2 else lr * 0.1
        order = torch.randperm(len(u), generator=generator).to(u.device)
        for i in range(0, len(u), batch):
            idx = order[i:i + batch]
            x = u[idx] if dsa is None else dsa(u[idx], generator=generator)
            with autocast(u.device, precision):
                loss = F.l1_loss(student(x).float(), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if e in keep:
            states.append({k: v.detach().clone() for k, v in student.state_dict().items()})
    return states


def distances(s: Tensor, t: Tensor, kind: str) -> Tensor:
    """Per-sample d(student logits, teacher logits): mean |·| (l1), mean squared (l2), 1 − cos."""
    if kind == "l1":
        return (s - t).abs().mean(1)
    if kind == "l2":
        return (s - t).pow(2).mean(1)
    if kind == "cosine":
        return 1 - F.cosine_similarity(s, t, dim=1)
    raise ConfigError(f"distill.distance: {kind!r} is invalid; expected 'l1', 'l2' or 'cosine'")


def image_loss_and_grad(u: Tensor, y: Tensor, student: nn.Module, checkpoints: list[StateDict],
                        service: Service, teacher_idx: int, *, distance: str = "l1",
                        objective: str = "linear", alpha: float = 0.1,
                        segment: int | None = None) -> tuple[float, Tensor]:
    """Eq. 4 on the mini-batch ``u`` and its gradient, computed segment by segment.

    L = 1/B Σ_i [ Σ_k term(d(f_k(u_i), f_T(u_i))) + α·CE(f_T(u_i), y_i) ],
    term = −d ("linear", the official code) or −log d ("log", Eq. 4). Every term is per sample,
    so summing segments normalised by the full B gives the same gradient for any segment size.
    Per segment the service runs the teacher twice: its logits, then the VJP of ∂L/∂logits (a
    second forward, since the graph cannot wait in the service between calls); the K student
    checkpoints run in the worker. Networks in eval mode, no augmentation."""
    if objective not in ("linear", "log"):
        raise ConfigError(f"distill.objective: {objective!r} is invalid; expected 'linear' or 'log'")
    n = len(u)
    seg = segment or n
    student.eval()
    grad = torch.zeros_like(u)
    total = 0.0
    for i in range(0, n, seg):
        x = u[i:i + seg].detach().requires_grad_(True)
        t = service.logits(x.detach(), teacher_idx).detach().requires_grad_(True)
        loss = alpha * F.cross_entropy(t, y[i:i + seg], reduction="sum")
        for state in checkpoints:
            d = distances(functional_call(student, state, (x,)), t, distance)
            loss = loss - (d if objective == "linear" else torch.log(d.clamp_min(1e-12))).sum()
        loss = loss / n
        gx, gt = torch.autograd.grad(loss, (x, t))
        grad[i:i + seg] = gx + service.input_grad(x.detach(), gt, teacher_idx)
        total += loss.item()
    return total, grad


class _Timed:
    """Wraps a service to add up the seconds spent in it."""

    def __init__(self, service: Service):
        self.service, self.seconds = service, 0.0
        self.num_models = service.num_models

    def logits(self, x: Tensor, model: int) -> Tensor:
        return self._call(self.service.logits, x, model)

    def input_grad(self, x: Tensor, grad_logits: Tensor, model: int) -> Tensor:
        return self._call(self.service.input_grad, x, grad_logits, model)

    def _call(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - t0


def _metadd_term(cfg: DistillConfig):
    """The MetaDD add-on term when ``distill.metadd.enabled`` (stateless: nothing to checkpoint)."""
    section = getattr(cfg, "metadd", None)
    if section is None or not section.enabled:
        return None
    from .metadd import MetaDDOptions, MetaDDTerm
    return MetaDDTerm(MetaDDOptions.from_config(section), segment=cfg.segment)


def _build_default(spec: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    from ..models import build
    return build(spec, in_channels, num_classes, image_size)


@register_method("apm")
class APMGroup(Method):
    """One group of synthetic images and everything needed to continue distilling it exactly.

    All randomness (mini-batches, teacher, pool, student init, DSA) comes from one
    ``torch.Generator`` seeded with ``seed``; :meth:`state_dict` holds it together with the
    current student's checkpoints, so a resumed group continues bit for bit."""

    uses = frozenset({"pool", "metadd"})

    def __init__(self, cfg: DistillConfig, images: Tensor, labels: Tensor, *, student_spec: str,
                 in_channels: int, num_classes: int, image_size: int, seed: int,
                 dsa: Callable | None = None, build_model: Callable[[str], nn.Module] | None = None):
        self.cfg = cfg
        self.u = images.detach().clone().float()
        self.y = labels.detach().clone().long().to(self.u.device)
        self.momentum = torch.zeros_like(self.u)
        self.round = 0
        self.gen = torch.Generator().manual_seed(seed)
        self.main_spec = student_spec
        self.dsa = dsa
        self.build_model = build_model or partial(_build_default, in_channels=in_channels,
                                                  num_classes=num_classes, image_size=image_size)
        self.student: nn.Module | None = None
        self.student_spec: str | None = None
        self.teacher = -1
        self.checkpoints: list[StateDict] = []
        self.metadd = _metadd_term(cfg)
        # distill.balance: gbm, GBM between L_dd and MetaDD's term (config-checked: MetaDD is on)
        self.balance = GradientBalance(num_classes, 2, cfg.balance_every, self.u.device) \
            if getattr(cfg, "balance", "none") == "gbm" else None

    @classmethod
    def create(cls, cfg: DistillConfig, images: Tensor, labels: Tensor, *, seed: int,
               setup: Setup) -> "APMGroup":
        from ..augment import DSA
        return cls(cfg, images, labels, student_spec=setup.arch, in_channels=setup.in_channels,
                   num_classes=setup.num_classes, image_size=setup.image_size, seed=seed,
                   dsa=DSA(setup.dsa_strategy) if setup.dsa_strategy else None)

    def reseed(self, seed: int) -> None:
        self.gen.manual_seed(seed)

    @property
    def images(self) -> Tensor:
        return self.u

    @property
    def labels(self) -> Tensor:
        return self.y

    def step(self, services: Services) -> dict:
        """One round: refresh the student when due, then one image step on a mini-batch."""
        cfg, timed = self.cfg, _Timed(services.teachers)
        n = len(self.u)
        b = min(cfg.batch_size or n, n)
        idx = (torch.randperm(n, generator=self.gen)[:b] if b < n else torch.arange(n)).to(self.u.device)
        u, y = self.u[idx], self.y[idx]

        t0 = time.perf_counter()
        refreshed = self.student is None or self.round % cfg.refresh_every == 0
        if refreshed:
            self._refresh(timed, u)
        t_student, s_student = time.perf_counter() - t0, timed.seconds

        t0 = time.perf_counter()
        loss, grad = image_loss_and_grad(u, y, self.student, self.checkpoints, timed, self.teacher,
                                         distance=cfg.distance, objective=cfg.objective,
                                         alpha=cfg.alpha, segment=cfg.segment)
        extra: dict = {}
        if self.metadd is not None:   # L_all = L_dd + MetaDD's terms (paper 000, Eq. 12), on the same teacher
            t1, s1 = time.perf_counter(), timed.seconds
            aux_loss, grad_aux = self.metadd.loss_and_grad(u, y, replace(services, teachers=timed),
                                                           teacher=self.teacher)
            extra = {"loss_all": loss + aux_loss, "metadd": self.metadd.stats, "grad_norm_dd": float(grad.norm()),
                     "aux_seconds": time.perf_counter() - t1 - (timed.seconds - s1)}
            if self.balance is None:
                grad = grad + grad_aux
            else:
                grad, w = self.balance.balance([grad, grad_aux], y, self.round)
                extra["gbm"] = {"w_dd": float(w[y, 0].mean()), "w_metadd": float(w[y, 1].mean())}
        if not (math.isfinite(extra.get("loss_all", loss)) and torch.isfinite(grad).all()):
            raise NonFiniteImages(f"group image gradient is not finite at round {self.round} "
                                  f"(loss {loss}); lower distill.lr_img or distill.lr_net")
        # torch SGD with momentum over the whole image tensor, as the official code: images outside
        # the mini-batch get a zero gradient but keep coasting on their momentum (B < group size).
        decayed = self.round >= int(cfg.lr_img_decay_at * cfg.rounds)
        lr = cfg.lr_img * (cfg.lr_img_decay if decayed else 1.0)
        full = grad if b == n else torch.zeros_like(self.u).index_copy_(0, idx, grad)
        momentum = cfg.momentum_img * self.momentum + full
        new = self.u - lr * momentum
        if not torch.isfinite(new).all():
            raise NonFiniteImages(f"group images became non-finite at round {self.round}; "
                                  f"lower distill.lr_img")
        self.momentum, self.u = momentum, new
        t_image = time.perf_counter() - t0

        self.round += 1
        seconds = {"student": t_student - s_student, "image": t_image - (timed.seconds - s_student),
                   "service": timed.seconds}
        if extra:   # the auxiliary service's share of the image step (teacher calls stay in "service")
            seconds["auxiliaries"] = extra.pop("aux_seconds")
            seconds["image"] -= seconds["auxiliaries"]
        return {"round": self.round - 1, "loss": loss, "refreshed": refreshed,
                "teacher": self.teacher, "student_spec": self.student_spec, **extra, "seconds": seconds}

    def _refresh(self, service: _Timed, u: Tensor) -> None:
        """Algorithm 1 line 3 and lines 5-9: new teacher, new student, K checkpoints."""
        cfg = self.cfg
        self.teacher = int(torch.randint(service.num_models, (), generator=self.gen))
        self.student_spec = sample_student_spec(self.main_spec, cfg.pool, self.gen)
        self.student = self._fresh_student(self.student_spec,
                                           int(torch.randint(2**62, (), generator=self.gen)))
        seg = cfg.segment or len(u)
        targets = torch.cat([service.logits(u[i:i + seg], self.teacher) for i in range(0, len(u), seg)])
        self.checkpoints = train_student(self.student, u, targets, epochs=cfg.student_epochs,
                                         checkpoints=cfg.checkpoints, lr=cfg.lr_net,
                                         batch=cfg.student_batch, dsa=self.dsa, generator=self.gen,
                                         precision=cfg.precision)

    def _fresh_student(self, spec: str, seed: int) -> nn.Module:
        # Initialise from our own generator's draw, not the process-wide RNG, so the group is
        # reproducible whatever else runs in the process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.build_model(spec).to(self.u.device)

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (safetensors-ready): images, labels, momentum, round, RNG, and the current
        student (spec as utf-8 bytes, teacher index, checkpoints as ``student.K.NAME``)."""
        d = {"images": self.u, "labels": self.y, "momentum": self.momentum,
             "round": torch.tensor([self.round]), "rng": self.gen.get_state(),
             **({"gbm": self.balance.acc} if self.balance is not None else {})}
        if self.student is not None:
            d["teacher"] = torch.tensor([self.teacher])
            d["student_spec"] = torch.tensor(list(self.student_spec.encode()), dtype=torch.uint8)
            for k, state in enumerate(self.checkpoints):
                d.update({f"student.{k}.{name}": v for name, v in state.items()})
        return {k: v.detach().cpu().clone() for k, v in d.items()}

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        missing = {"images", "labels", "momentum", "round", "rng"} - set(d)
        if missing:
            raise RayddError(f"group state lacks {', '.join(sorted(missing))}; is it an APM group checkpoint?")
        if d["images"].shape != self.u.shape:
            raise RayddError(f"group state holds images {tuple(d['images'].shape)}, "
                             f"expected {tuple(self.u.shape)}")
        dev = self.u.device
        self.u = d["images"].float().to(dev).clone()
        self.y = d["labels"].long().to(dev).clone()
        self.momentum = d["momentum"].float().to(dev).clone()
        self.round = int(d["round"])
        self.gen.set_state(d["rng"].to(torch.uint8).clone())
        if self.balance is not None and "gbm" in d:
            self.balance.acc = d["gbm"].float().to(dev).clone()
        self.student, self.student_spec, self.teacher, self.checkpoints = None, None, -1, []
        if "student_spec" in d:
            self.student_spec = bytes(d["student_spec"].tolist()).decode()
            self.teacher = int(d["teacher"])
            # The architecture only: its weights come from the stored checkpoints.
            self.student = self._fresh_student(self.student_spec, 0)
            names = list(self.student.state_dict())
            k = 0
            while f"student.{k}.{names[0]}" in d:
                self.checkpoints.append({n: d[f"student.{k}.{n}"].to(dev).clone() for n in names})
                k += 1
