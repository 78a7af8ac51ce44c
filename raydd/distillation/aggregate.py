"""The aggregator: finished groups merged into RUN/synset with the teachers' soft labels, refusing
incomplete or non-finite sets, and a picture of the images by class."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..errors import RayddError
from ..io import atomic_path, load_tensors, sha256_file
from ..methods import method_class
from ..synset import Synset, save_synset
from .plan import GroupPlan

GRID_MAX_CLASSES = 100         # grid.png shows at most this many classes (rows) ...
GRID_PER_ROW = 10              # ... of at most this many images each
SNAPSHOT_MAX_CLASSES = 10      # the snapshots over the rounds stay small: at most 10 × 10 images


def grid_title(cfg: Config, source: str) -> str:
    """What every picture of a run's images is titled with: dataset, IPC and method."""
    return f"{source} · IPC {cfg.distill.ipc} · {cfg.distill.method}"


def soft_labels(service: Any, images: torch.Tensor, mode: str, batch: int) -> tuple[torch.Tensor, list[int]]:
    """Teacher logits on the final images: the first teacher (APM Alg. 1, line 12) or the mean."""
    models = [0] if mode == "first" else list(range(service.num_models))
    out = []
    for start in range(0, images.shape[0], batch):
        x = images[start:start + batch]
        out.append(torch.stack([service.logits(x, m).float().cpu() for m in models]).mean(0))
    return torch.cat(out), models


def write_grid(path: Path, images: torch.Tensor, labels: torch.Tensor, info: Any, zca: Any = None, *,
               title: str = "synthetic images by class", max_classes: int = GRID_MAX_CLASSES) -> Path:
    """One row per class (≤ 10 images each, ≤ ``max_classes`` rows), denormalised to pixels; ZCA
    undone first if used."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..data import denormalize

    x = zca.inverse(images) if zca is not None else images
    x = denormalize(x, info).clamp(0, 1)
    classes = list(range(min(info.num_classes, max_classes)))
    cols = max(1, min(GRID_PER_ROW, max(int((labels == c).sum()) for c in classes)))
    c_, h, w = x.shape[1:]
    pad = max(1, h // 16)
    mosaic = torch.ones(len(classes) * (h + pad) + pad, cols * (w + pad) + pad, c_)
    for r, c in enumerate(classes):
        for j, i in enumerate(torch.nonzero(labels == c).flatten()[:cols].tolist()):
            top, left = pad + r * (h + pad), pad + j * (w + pad)
            mosaic[top:top + h, left:left + w] = x[i].permute(1, 2, 0)
    img = mosaic.squeeze(-1).numpy() if c_ == 1 else mosaic.numpy()
    fig = Figure(figsize=(max(3.2, 1.5 + 0.6 * cols), 0.8 + 0.6 * len(classes)), dpi=100)  # room for the title
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(img, cmap="gray" if c_ == 1 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([pad + r * (h + pad) + h / 2 for r in range(len(classes))],
                  [str(info.classes[c]) for c in classes], fontsize=7)
    shown = "" if len(classes) == info.num_classes else f" (first {len(classes)} of {info.num_classes} classes)"
    ax.set_title(f"{title}{shown}", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def aggregate(cfg: Config, run_dir: Path, plans: list[GroupPlan], service: Any, records: list[dict],
              info: Any, *, fingerprint_sha: str, zca: Any = None,
              auxiliaries: list[dict] | None = None) -> tuple[Path, list[dict]]:
    """Merge finished groups into RUN/synset; refuse missing groups and non-finite values."""
    missing = [p.index for p in plans if not p.final_path.exists()]
    if missing:
        raise RayddError(f"refusing to write the synset: group(s) {missing} of {len(plans)} are not finished")
    per = method_class(cfg.distill.method).synset_per_stored(cfg.distill)   # HMDC: f² decoded per packed
    images, labels, groups, provenance = [], [], [], []
    for p in plans:
        t = load_tensors(p.final_path)
        x, y = t["images"].float(), t["labels"].long()
        counts = torch.bincount(y, minlength=info.num_classes).tolist()
        if counts != [p.ipc * per] * info.num_classes or tuple(x.shape[1:]) != tuple(info.shape):
            raise RayddError(f"refusing to write the synset: {p.final_path} holds {tuple(x.shape)} images with "
                             f"per-class counts {counts}, expected {p.ipc * per} per class of shape "
                             f"{tuple(info.shape)}")
        if not torch.isfinite(x).all():
            raise RayddError(f"refusing to write the synset: group {p.index} holds non-finite images")
        order = torch.argsort(y, stable=True)
        images.append(x[order])
        labels.append(y[order])
        groups.append(torch.full((len(y),), p.index, dtype=torch.int64))
        prog = p.read_progress()
        provenance.append({"group": p.index, "ipc": p.ipc, "seed": p.seed, "rounds": p.rounds,
                           "rollbacks": prog.get("rollbacks", 0), "starts": prog.get("starts", []),
                           "completions": prog.get("completions", 0), "loss": prog.get("loss"),
                           "seconds": prog.get("seconds", {}),
                           **({"memory": prog["memory"]} if "memory" in prog else {}), "sha256": sha256_file(p.final_path)})
    images_t, labels_t = torch.cat(images), torch.cat(labels)
    soft, used = soft_labels(service, images_t, cfg.distill.soft_labels, cfg.distill.service.max_batch)
    if not torch.isfinite(soft).all():
        raise RayddError("refusing to write the synset: the teachers' soft labels hold non-finite values")
    # mean/std and the ZCA are saved with the synset: it is usable without the data directory
    synset = Synset(images=images_t, labels=labels_t, soft_labels=soft, groups=torch.cat(groups),
                    meta={"num_classes": info.num_classes}, mean=list(info.mean), std=list(info.std), zca=zca)
    synset.check()
    out = run_dir / "synset"
    write_grid(out / "grid.png", images_t, labels_t, info, zca, title=grid_title(cfg, info.source))
    manifest = {
        "kind": "raydd.synset",
        "method": cfg.distill.method,
        "fingerprint": fingerprint_sha,
        "dataset": {"source": info.source, "dir": cfg.data.dir,
                    "classes": list(info.classes), "zca": cfg.data.zca},
        "ipc": cfg.distill.ipc,
        "teachers": [{"file": r.get("file"), "sha256": r.get("sha256"), "spec": r.get("spec"),
                      "test_acc": r.get("test_acc")} for r in records],
        "soft_labels": {"mode": cfg.distill.soft_labels, "teachers": [records[i].get("file") for i in used]},
        **({"auxiliaries": [{k: r.get(k) for k in ("name", "spec", "sha256", "test_acc")} for r in auxiliaries]}
           if auxiliaries else {}),   # MetaDD's pool (distill.metadd)
        "groups": provenance,
        "counts": {"images": int(images_t.shape[0]), "per_group": [p.ipc * per * info.num_classes for p in plans],
                   # packed storage (HMDC's multi-formation): ipc stored, ipc × per_stored in the synset
                   **({"packing": {"per_stored": per, "stored_per_class": cfg.distill.ipc,
                                   "images_per_class": cfg.distill.ipc * per,
                                   **({"factor": cfg.distill.hmdc.factor} if cfg.distill.method == "hmdc" else {})}}
                      if per != 1 else {})},
        "grid": "grid.png",
        "config": cfg.to_dict(),
    }
    save_synset(out, synset, manifest)
    return out, provenance
