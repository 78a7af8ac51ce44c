"""A synset as a dataset: raydd.load_synset, pixels, to_dataset / dataloader, export, provenance.

One tiny distillation (1 teacher of 1 epoch, 2 rounds, all in this process: no Ray) gives a synset
written by the real aggregator.
"""
from __future__ import annotations

import csv
import datetime
import importlib.metadata
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import raydd
from raydd.config import from_dict
from raydd.errors import RayddError
from raydd.io import read_json
from raydd.synset import Synset, git_commit, save_synset

STRATEGY = "color_crop_cutout_scale_rotate"


def _local_teacher(cfg, run):
    """The pool's one teacher trained here, saved with teachers.py's own writers (train_teachers
    would run it as a Ray task: a local Ray costs this module more than everything else)."""
    from raydd import teachers as T
    from raydd.data import load_info
    from raydd.models import build
    info = load_info(cfg.data.dir)
    spec = build(cfg.teachers.arch, info.in_channels, info.num_classes, info.image_size).spec
    recipe = T.Recipe.from_config(cfg)
    want = {"spec": spec, "seed": 0, "epochs": recipe.epochs, "recipe": asdict(recipe),
            "in_channels": info.in_channels, "num_classes": info.num_classes, "image_size": info.image_size,
            "shape": list(info.shape)}
    t0 = time.time()
    state, acc = T.train_one_teacher(spec, info, 0, recipe)
    out = run / T.TEACHERS_DIR
    out.mkdir(parents=True)
    rec = T.save_teacher(out, 0, state, acc, time.time() - t0, time.process_time(), want)
    T.write_index(out, {"source": info.source, "classes": info.classes, "shape": list(info.shape)}, {0: rec})


@pytest.fixture(scope="module")
def run(digits, tmp_path_factory):
    from raydd.distillation import run_distill
    cfg = from_dict({"data": {"source": "digits", "dir": digits, "dsa_strategy": STRATEGY}, "device": "cpu",
                     "teachers": {"arch": "convnet:width=8", "count": 1, "epochs": 1, "batch_size": 128},
                     "distill": {"ipc": 2, "groups": 1, "rounds": 2, "student_epochs": 2, "checkpoints": 1,
                                 "checkpoint_every": 2, "lr_net": 0.05, "student_batch": 64}})
    out = tmp_path_factory.mktemp("api-run")
    _local_teacher(cfg, out)
    run_distill(cfg, out, progress=False, backend="local")
    return out


def test_load_synset_records_normalisation_and_pixels_round_trip(run, digits):
    syn = raydd.load_synset(run / "synset")
    assert "load_synset" in raydd.__all__ and isinstance(syn, Synset)
    info = read_json(Path(digits) / "dataset.json")
    doc = syn.meta
    assert doc["normalisation"] == {"mean": pytest.approx(info["mean"]), "std": pytest.approx(info["std"]),
                                    "zca": None}
    assert syn.images.shape == (20, 1, 8, 8) and syn.soft_labels.shape == (20, 10)
    std = torch.tensor(info["std"]).view(-1, 1, 1)
    mean = torch.tensor(info["mean"]).view(-1, 1, 1)
    assert torch.allclose(syn.pixels, syn.images * std + mean, atol=1e-6)
    assert torch.allclose(syn.from_pixels(syn.pixels), syn.images, atol=1e-5)
    # real-image initialisation after 2 small rounds: the pixels are still (nearly) in [0, 1]
    assert syn.pixels.min() > -0.5 and syn.pixels.max() < 1.5


def test_synset_is_usable_without_its_data_directory(run, tmp_path):
    syn = raydd.load_synset(run / "synset")
    doc = dict(syn.meta)
    doc["dataset"] = {**doc["dataset"], "dir": str(tmp_path / "gone")}
    moved = save_synset(tmp_path / "moved", Synset(syn.images, syn.labels, soft_labels=syn.soft_labels,
                                                   meta=doc, mean=syn.mean, std=syn.std))
    assert torch.allclose(raydd.load_synset(moved).pixels, syn.pixels)
    # an old synset (no normalisation recorded) falls back to its data directory; gone, it says so
    old = {k: v for k, v in doc.items() if k != "normalisation"}
    legacy = save_synset(tmp_path / "legacy", Synset(syn.images, syn.labels, meta=old))
    with pytest.raises(RayddError, match="records no normalisation") as e:
        raydd.load_synset(legacy).pixels
    assert "\n" not in str(e.value)
    old["dataset"]["dir"] = syn.meta["dataset"]["dir"]
    legacy = save_synset(tmp_path / "legacy2", Synset(syn.images, syn.labels, meta=old))
    assert torch.allclose(raydd.load_synset(legacy).pixels, syn.pixels)


def test_zca_synset_stores_its_whitening(digits, tmp_path):
    from raydd.data import load_info, load_split
    from raydd.data.zca import ZCA
    info = load_info(digits)
    x, y = load_split(info, "train")
    x, y = x[:200], y[:200]
    zca = ZCA.fit(x, reg=0.1, pixel_std=info.std)
    white = zca.transform(x)
    save_synset(tmp_path / "syn", Synset(white, y, meta={"num_classes": 10}, mean=info.mean, std=info.std, zca=zca))
    syn = raydd.load_synset(tmp_path / "syn")
    assert syn.meta["normalisation"]["zca"]["file"] == "zca.safetensors" and syn.zca is None  # read lazily
    raw = x * torch.tensor(info.std).view(-1, 1, 1) + torch.tensor(info.mean).view(-1, 1, 1)
    assert torch.allclose(syn.pixels, raw, atol=1e-4)
    assert torch.allclose(syn.from_pixels(syn.pixels), white, atol=1e-4)


def test_to_dataset_trains_a_model(run):
    from raydd.models import build
    syn = raydd.load_synset(run / "synset")
    ds = syn.to_dataset()
    x0, y0 = ds[3]
    assert len(ds) == 20 and torch.equal(x0, syn.images[3]) and int(y0) == int(syn.labels[3])
    assert len(syn.to_dataset(soft_labels=True)[0]) == 3
    torch.manual_seed(0)
    model = build("mlp:width=32", 1, 10, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = torch.utils.data.DataLoader(ds, batch_size=10, shuffle=True)
    losses = []
    for _ in range(15):
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    with torch.no_grad():
        acc = (model(syn.images).argmax(1) == syn.labels).float().mean().item()
    assert losses[-1] < losses[0] / 2 and acc >= 0.8   # chance: 0.1


def test_dataloader_augments_per_image(run):
    syn = raydd.load_synset(run / "synset")
    plain = next(iter(syn.dataloader(20, shuffle=False, soft_labels=True)))
    assert torch.equal(plain[0], syn.images) and torch.equal(plain[2], syn.soft_labels)
    g = torch.Generator().manual_seed(1)
    x, y = next(iter(syn.dataloader(20, augment="flip", shuffle=False, generator=g)))
    assert torch.equal(y, syn.labels)
    flipped = [bool(torch.equal(x[i], syn.images[i].flip(-1))) for i in range(20)]
    kept = [bool(torch.equal(x[i], syn.images[i])) for i in range(20)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)  # drawn per image
    x, _ = next(iter(syn.dataloader(8, augment=STRATEGY, pixels=True, generator=g)))
    assert x.shape == (8, 1, 8, 8) and torch.isfinite(x).all()
    with pytest.raises(raydd.ConfigError, match="augment: unknown augmentation 'blur'"):
        syn.dataloader(8, augment="blur")
    with pytest.raises(RayddError, match="batch_size"):
        syn.dataloader(0)


def test_export_imagefolder_and_npz(run, tmp_path):
    from PIL import Image

    from raydd.export import export_synset, quantise
    syn = raydd.load_synset(run / "synset")
    out = export_synset(run / "synset", "imagefolder", tmp_path / "png")
    classes = syn.meta["dataset"]["classes"]
    for c, name in enumerate(classes):
        assert len(list((out / str(name)).glob("*.png"))) == 2
    rows = list(csv.DictReader((out / "labels.csv").open()))
    assert len(rows) == 20
    q = quantise(syn.pixels)
    for r in rows:
        i = int(r["index"])
        assert int(r["label"]) == int(syn.labels[i]) and r["file"].startswith(f"{classes[int(r['label'])]}/")
        soft = torch.tensor([float(r[f"soft_{k}"]) for k in range(10)], dtype=torch.float32)
        assert torch.equal(soft, syn.soft_labels[i])
        png = torch.from_numpy(np.array(Image.open(out / r["file"])))
        assert torch.equal(png, q[i, 0])
    npz = np.load(export_synset(run / "synset", "npz", tmp_path / "syn.npz", dtype="float32"))
    assert torch.equal(torch.from_numpy(npz["images"]), syn.pixels)
    assert torch.equal(torch.from_numpy(npz["labels"]), syn.labels)
    assert torch.equal(torch.from_numpy(npz["soft_labels"]), syn.soft_labels)
    npz8 = np.load(export_synset(syn, "npz", tmp_path / "syn8.npz"))
    assert npz8["images"].dtype == np.uint8 and torch.equal(torch.from_numpy(npz8["images"]), q)


def test_export_refuses_a_non_empty_out_with_one_line(run, tmp_path, capsys):
    from raydd.cli import main
    from raydd.export import export_synset
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    code = main(["export", str(run / "synset"), "--out", str(tmp_path / "full")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("raydd: error:") and err.count("\n") == 1, err
    assert "not empty" in err and (tmp_path / "full" / "x").read_text() == "keep"
    (tmp_path / "empty" / "png").mkdir(parents=True)
    export_synset(run / "synset", "imagefolder", tmp_path / "empty" / "png")   # an empty OUT is fine
    assert len(list((tmp_path / "empty" / "png").rglob("*.png"))) == 20
    export_synset(run / "synset", "npz", tmp_path / "empty" / "s.npz")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["png", "s.npz"]  # no temporaries left
    with pytest.raises(RayddError, match="exists"):
        export_synset(run / "synset", "npz", tmp_path / "empty" / "s.npz")


def test_manifest_records_versions_commit_and_time(run):
    doc = read_json(run / "synset" / "manifest.json")
    assert doc["versions"]["raydd"] == raydd.__version__ and doc["versions"]["torch"] == torch.__version__
    assert doc["versions"]["ray"] == importlib.metadata.version("ray")
    created = datetime.datetime.fromisoformat(doc["created"])
    assert created.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()) < 3600
    head = subprocess.run(["git", "-C", str(Path(raydd.__file__).parent), "rev-parse", "HEAD"],
                          capture_output=True, text=True)
    if head.returncode == 0:   # a git checkout (as in development)
        assert doc["git"]["commit"] == head.stdout.strip() and isinstance(doc["git"]["dirty"], bool)
    else:
        assert doc["git"] is None


def test_git_commit_is_none_outside_a_checkout(tmp_path):
    (tmp_path / "__init__.py").write_text("")
    assert git_commit(str(tmp_path)) is None
