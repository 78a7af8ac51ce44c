"""The Gradient Balance Module (HMDC, paper 004 §3), shared by HMDC and by APM + MetaDD
(``distill.balance: gbm``).

Per class, an accumulator A holds each target's max |∂L_k/∂x| summed over the sampled steps; the
targets' gradients are combined with weights w_k = min(A) / a_k (the target with the largest
gradients is scaled down to the smallest one's), and the sum is normalised per (image, channel) by
its L∞, so the image step is bounded whatever the losses' scales: ``lr_img`` becomes the largest
pixel move of a step (before momentum).
"""
from __future__ import annotations

import torch
from torch import Tensor

GBM_EPS = 1e-6


def gbm_weights(acc: Tensor) -> Tensor:
    """Eq. 5: w_k = min(A) / a_k along the last axis of the accumulator(s) A (k targets)."""
    return acc.amin(dim=-1, keepdim=True) / acc


def channel_normalise(grad: Tensor, eps: float = GBM_EPS) -> Tensor:
    """Each (image, channel) slice divided by its max |·| over the pixels (+ eps), the code's
    "normalize each synthetic image"; a packed image's sub-images are normalised jointly."""
    return grad / (grad.abs().amax(dim=(2, 3), keepdim=True) + eps)


class GradientBalance:
    """GBM over images of several classes at once: ``balance(grads, labels, step)`` samples every
    ``every``-th step (each class's max over its images in the batch, classes absent from the batch
    unchanged), then returns the weighted, normalised gradient and the per-class weights."""

    def __init__(self, num_classes: int, targets: int, every: int, device: torch.device | str = "cpu"):
        self.every = every
        self.acc = torch.full((num_classes, targets), GBM_EPS, device=device)

    def balance(self, grads: list[Tensor], labels: Tensor, step: int) -> tuple[Tensor, Tensor]:
        if len(grads) != self.acc.shape[1]:
            raise ValueError(f"{len(grads)} gradients for a balance of {self.acc.shape[1]} targets")
        if step % self.every == 0:
            present = torch.bincount(labels, minlength=len(self.acc)) > 0
            for k, g in enumerate(grads):
                per_image = g.detach().abs().flatten(1).amax(dim=1)
                per_class = torch.zeros(len(self.acc), device=g.device).scatter_reduce(
                    0, labels, per_image, "amax", include_self=False)
                self.acc[present, k] += per_class[present]
        w = gbm_weights(self.acc)
        combined = sum(w[labels, k].view(-1, *[1] * (g.dim() - 1)) * g for k, g in enumerate(grads))
        return channel_normalise(combined), w
