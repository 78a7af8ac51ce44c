"""ZCA whitening of a run: the transform (kornia's ``ZCAWhitening(eps=0.1, compute_inv=True)`` on
raw [0, 1] pixels, as used by MTT/APM on CIFAR) and ``RUN/zca.safetensors``, fitted once and shared by teachers,
distillation and evaluation."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..config import Config
from ..errors import RayddError
from ..io import load_tensors, read_json, save_tensors, write_json
from .manifest import load_info
from .reader import batches

ZCA_FILE = "zca.safetensors"
ZCA_INDEX = "zca.json"
ZCA_REG = 0.1


class ZCA:
    """ZCA whitening fitted on flattened real training images (kornia's formulation).

    ``T = U diag((S + reg)^-1/2) Uᵀ`` from the unbiased covariance ``U S Uᵀ``;
    ``transform(x) = (x - mean) T`` and ``inverse(y) = y T⁻¹ + mean``.

    The references whiten raw [0, 1] pixels (ToTensor only) with reg = 0.1. raydd's images are
    mean/std-normalised, so :meth:`fit` takes the normalisation's per-channel ``pixel_std`` and
    folds it into T: ``transform(z) = (z - mean) diag(s) T_raw``, which is exactly the references'
    ``(x - mean_x) T_raw`` of the raw pixels x = z·s + m. (Fitting on normalised pixels instead
    would amount to reg/s², ~0.004 on CIFAR: far weaker regularisation.)
    """

    KEYS = ("zca_mean", "zca_matrix", "zca_inverse")

    def __init__(self, mean: torch.Tensor, matrix: torch.Tensor, inverse_matrix: torch.Tensor):
        self.mean, self.matrix, self.inverse_matrix = mean, matrix, inverse_matrix

    @classmethod
    def fit(cls, x: torch.Tensor | Iterable[torch.Tensor], reg: float = 0.1,
            pixel_std: Sequence[float] | None = None) -> "ZCA":
        """Fit on an N×C×H×W tensor, or an iterable of such batches (accumulated in float64).
        ``pixel_std``: the per-channel std that normalised ``x``, so that ``reg`` acts on raw pixels."""
        batches = [x] if isinstance(x, torch.Tensor) else x
        n, total, gram, scale = 0, None, None, None
        for b in batches:
            if scale is None:
                std = torch.ones(b.shape[1]) if pixel_std is None else torch.tensor(pixel_std)
                if std.numel() != b.shape[1]:
                    raise RayddError(f"ZCA pixel_std has {std.numel()} values for {b.shape[1]} channels")
                scale = std.to(torch.float64).repeat_interleave(b[0, 0].numel())
            f = b.reshape(b.shape[0], -1).to(torch.float64) * scale
            if total is None:
                total, gram = f.sum(0), f.T @ f
            else:
                total += f.sum(0)
                gram += f.T @ f
            n += f.shape[0]
        if n < 2:
            raise ValueError("ZCA needs at least two images to fit")
        mean = total / n
        cov = (gram - n * torch.outer(mean, mean)) / (n - 1)
        s, u = torch.linalg.eigh(cov)
        s = s.clamp_min(0.0)
        matrix = scale[:, None] * ((u * torch.rsqrt(s + reg)) @ u.T)
        inverse = ((u * torch.sqrt(s + reg)) @ u.T) / scale[None, :]
        return cls((mean / scale).float(), matrix.float(), inverse.float())

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x[0].numel() != self.mean.numel():
            raise RayddError(f"ZCA was fitted on images of {self.mean.numel()} values, "
                             f"got images of shape {tuple(x.shape[1:])}")
        return x.reshape(x.shape[0], -1)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        m, t = self.mean.to(x.device, x.dtype), self.matrix.to(x.device, x.dtype)
        return ((self._flat(x) - m) @ t).reshape(x.shape)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        m, t = self.mean.to(x.device, x.dtype), self.inverse_matrix.to(x.device, x.dtype)
        return (self._flat(x) @ t + m).reshape(x.shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.KEYS, (self.mean, self.matrix, self.inverse_matrix)))

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "ZCA":
        missing = [k for k in cls.KEYS if k not in state]
        if missing:
            raise RayddError(f"ZCA state lacks {', '.join(missing)}")
        return cls(*(state[k] for k in cls.KEYS))


def ensure_zca(cfg: Config, run_dir: str | os.PathLike, info=None) -> ZCA | None:
    """The run's ZCA (``RUN/zca.safetensors``) when ``data.zca`` is on: loaded, or fitted once on
    the real training split and saved, so teachers, distillation and evaluation share it."""
    if not cfg.data.zca:
        return None
    info = load_info(info or cfg.data.dir)
    run_dir = Path(run_dir)
    meta = {"classes": info.classes, "shape": list(info.shape), "reg": ZCA_REG, "space": "raw pixels"}
    index = run_dir / ZCA_INDEX
    if index.exists():
        rec = read_json(index)
        if {k: rec.get(k) for k in meta} == meta:
            return ZCA.from_state(load_tensors(run_dir / ZCA_FILE, sha256=rec.get("sha256")))
    zca = ZCA.fit((x for x, _ in batches(info, "train", 4096, verify=cfg.data.verify,
                                         on_corrupt=cfg.data.on_corrupt)), reg=ZCA_REG, pixel_std=info.std)
    sha = save_tensors(run_dir / ZCA_FILE, zca.state_dict())
    write_json(index, {**meta, "file": ZCA_FILE, "sha256": sha})
    return zca
