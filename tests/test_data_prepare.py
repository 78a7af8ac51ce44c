"""`raydd data prepare` on small generated copies of every source format: exact round trips,
idempotence, the process pool, and clear failures that leave nothing half-written."""
from __future__ import annotations

import gzip
import importlib
import io
import os
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import raydd.data as data
from raydd.errors import DataError

prep = importlib.import_module("raydd.data.prepare")  # the module, not the function of that name
ORIGINAL_ENCODE = prep._encode
RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------- fake sources

def write_idx(path: Path, arr: np.ndarray) -> None:
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.astype(np.uint8).tobytes())


def fake_fashion(root: Path, n_train: int = 40, n_test: int = 12, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = np.arange(n) % 10
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", y)
        arrays[split] = (x, y)
    return arrays


def cifar_batch(n: int, num_classes: int, key: bytes) -> dict:
    return {b"batch_label": b"fake", key: (np.arange(n) % num_classes).tolist(),
            b"data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}


def fake_cifar(root: Path, kind: str, as_archive: bool) -> dict[str, dict]:
    """Official layout: pickled dicts (protocol 2, as the originals) in a folder or .tar.gz."""
    if kind == "cifar10":
        folder, key, k = "cifar-10-batches-py", b"labels", 10
        files = {f"data_batch_{i}": cifar_batch(4, k, key) for i in range(1, 6)}
        files["test_batch"] = cifar_batch(6, k, key)
        files["batches.meta"] = {b"label_names": [f"c{i}".encode() for i in range(k)]}
    else:
        folder, key, k = "cifar-100-python", b"fine_labels", 100
        files = {"train": cifar_batch(30, k, key), "test": cifar_batch(10, k, key),
                 "meta": {b"fine_label_names": [f"f{i}".encode() for i in range(k)]}}
    root.mkdir(parents=True, exist_ok=True)
    blobs = {name: pickle.dumps(obj, protocol=2) for name, obj in files.items()}
    if as_archive:
        archive = "cifar-10-python.tar.gz" if kind == "cifar10" else "cifar-100-python.tar.gz"
        with tarfile.open(root / archive, "w:gz") as tar:
            for name, blob in blobs.items():
                info = tarfile.TarInfo(f"{folder}/{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    else:
        (root / folder).mkdir()
        for name, blob in blobs.items():
            (root / folder / name).write_bytes(blob)
    return files


def cifar_images(batches: list[dict], key: bytes) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    return x, np.concatenate([b[key] for b in batches])


def save_jpeg(path: Path, arr: np.ndarray) -> np.ndarray:
    """Write a JPEG and return what PIL decodes from it (the pixels a lossless copy must hold)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="JPEG", quality=90)
    return np.asarray(Image.open(path).convert("RGB"))


def fake_tiny_imagenet(root: Path) -> tuple[list, list]:
    wnids = ["n02", "n01", "n03"]  # unsorted on purpose: classes are the sorted WNIDs
    (root / "train").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tpizza\nn03\tbus, coach\n")
    train, test, ann = [], [], []
    for w in wnids:
        label = sorted(wnids).index(w)
        for i in range(3):
            shape = (64, 64) if (w, i) == ("n03", 0) else (64, 64, 3)  # one grayscale JPEG
            px = save_jpeg(root / "train" / w / "images" / f"{w}_{i}.JPEG",
                           RNG.integers(0, 256, shape, dtype=np.uint8))
            train.append((label, px.tobytes()))
        name = f"val_{w}.JPEG"
        test.append((label, save_jpeg(root / "val" / "images" / name,
                                      RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).tobytes()))
        ann.append(f"{name}\t{w}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    return train, test


def fake_imagefolder(root: Path) -> dict[str, list[tuple[int, tuple]]]:
    """Flat-coloured images of odd sizes and formats; resizing must keep each colour exactly.
    The wide images have differently coloured margins that the center crop must remove."""
    want: dict[str, list] = {"train": [], "test": []}
    for split, folder, n in (("train", "train", 5), ("test", "val", 2)):
        for label, cls in enumerate(["cat", "dog"]):
            d = root / folder / cls
            d.mkdir(parents=True)
            for i in range(n):
                colour = (40 * i + 10, 100 + 50 * label, 7 * i + 3 * label)
                if i % 3 == 0:  # 48×24 PNG: 12-px margins in another colour left and right
                    arr = np.zeros((24, 48, 3), np.uint8)
                    arr[:] = (255, 0, 255)
                    arr[:, 12:36] = colour
                    Image.fromarray(arr).save(d / f"{i}.png")
                elif i % 3 == 1:  # grayscale PNG, converted to RGB
                    colour = (colour[0],) * 3
                    Image.fromarray(np.full((30, 30), colour[0], np.uint8)).save(d / f"{i}.PNG")
                else:  # a JPEG; a flat colour decodes to one (possibly shifted) colour
                    px = save_jpeg(d / f"{i}.jpeg", np.full((20, 20, 3), colour, np.uint8))
                    colour = tuple(int(v) for v in px[10, 10])
                want[split].append((label, colour))
            (d / "notes.txt").write_text("not an image")
    return want


def _encode_recording_pid(item, size, channels):
    """Stand-in for the pool function: notes which process ran it, then does the real work."""
    Path(os.environ["RAYDD_TEST_PIDS"], str(os.getpid())).touch()
    time.sleep(0.02)
    return ORIGINAL_ENCODE(item, size, channels)


def shard_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


# ---------------------------------------------------------------------------- round trips

def test_fashion_mnist_round_trip_stats_and_determinism(tmp_path):
    arrays = fake_fashion(tmp_path / "src")
    result = data.prepare("fashion-mnist", tmp_path / "out", src=tmp_path / "src", shard_size=16)
    assert not result["run"]["skipped"] and result["run"]["processes"] == 2
    assert shard_files(tmp_path / "out") == ["dataset.json", "test-000000.tar", "train-000000.tar",
                                            "train-000001.tar", "train-000002.tar"]
    info = data.load_info(tmp_path / "out")
    assert info.shape == (1, 28, 28) and info.classes[9] == "Ankle boot"
    assert [s["count"] for s in info.shards["train"]] == [16, 16, 8]
    for split, (x, y) in arrays.items():
        got_x, got_y = data.load_split(info, split, normalize=False)
        assert got_x.dtype == torch.uint8 and np.array_equal(got_x[:, 0].numpy(), x)
        assert np.array_equal(got_y.numpy(), y)
        assert info.counts[split] == {"total": len(y), "per_class": np.bincount(y, minlength=10).tolist()}
    train = arrays["train"][0] / 255.0
    assert info.mean[0] == pytest.approx(train.mean(), abs=1e-12)
    assert info.std[0] == pytest.approx(train.std(), abs=1e-12)
    xn, _ = data.load_split(info, "train")
    assert np.allclose(xn[:, 0].numpy(), (train - train.mean()) / train.std(), atol=1e-5)
    assert (tmp_path / "out" / "train-000000.tar").stat().st_mode & 0o777 == 0o644
    # same inputs elsewhere, in one process: byte-identical shards
    again = data.prepare("fashion-mnist", tmp_path / "out2", src=tmp_path / "src", shard_size=16, workers=1)
    assert again["shards"] == result["shards"]


def test_digits_stratified_split_and_exact_scaling(tmp_path):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.images, d.target, test_size=0.2, stratify=d.target, random_state=0)
    data.prepare("digits", tmp_path / "out", shard_size=1000)
    info = data.load_info(tmp_path / "out")
    assert info.counts["train"]["total"] == 1437 and info.counts["test"]["total"] == 360
    x, y = data.load_split(info, "train", normalize=False)
    assert np.array_equal(y.numpy(), ytr)
    assert np.array_equal(x[:, 0].numpy(), np.rint(xtr * 255 / 16).astype(np.uint8))
    assert x.max() == 255 and set(np.unique(x[:, 0].numpy()[xtr == 8])) == {128}  # 127.5 -> 128
    test_share = np.array(info.counts["test"]["per_class"]) / np.bincount(d.target)
    assert np.all(np.abs(test_share - 0.2) < 0.02)


@pytest.mark.parametrize("kind,as_archive", [("cifar10", True), ("cifar10", False), ("cifar100", True)])
def test_cifar_round_trip(tmp_path, kind, as_archive):
    files = fake_cifar(tmp_path / "src", kind, as_archive)
    src = tmp_path / "src" / ("cifar-10-python.tar.gz" if as_archive and kind == "cifar10" else "")
    data.prepare(kind, tmp_path / "out", src=src, shard_size=7)
    info = data.load_info(tmp_path / "out")
    if kind == "cifar10":
        train, test, key = [files[f"data_batch_{i}"] for i in range(1, 6)], [files["test_batch"]], b"labels"
        assert info.classes == [f"c{i}" for i in range(10)]
    else:
        train, test, key = [files["train"]], [files["test"]], b"fine_labels"
        assert info.num_classes == 100 and info.classes[99] == "f99"
    assert info.shape == (3, 32, 32)
    for split, batches in (("train", train), ("test", test)):
        want_x, want_y = cifar_images(batches, key)
        x, y = data.load_split(info, split, normalize=False)
        assert np.array_equal(x.numpy(), want_x) and np.array_equal(y.numpy(), want_y)


def test_cifar_pickle_may_not_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return os.system, ("touch " + str(tmp_path / "pwned"),)
    fake_cifar(tmp_path / "src", "cifar10", as_archive=False)
    (tmp_path / "src" / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DataError, match=r"data_batch_3 .*forbidden object (posix|os)\.system"):
        data.prepare("cifar10", tmp_path / "out", src=tmp_path / "src")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_tiny_imagenet_layout(tmp_path):
    train, test = fake_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    data.prepare("tiny-imagenet", tmp_path / "out", src=tmp_path, shard_size=4)  # finds tiny-imagenet-200/
    info = data.load_info(tmp_path / "out")
    assert info.classes == ["goldfish", "pizza", "bus"] and info.shape == (3, 64, 64)
    assert info.counts["test"]["per_class"] == [1, 1, 1]
    for split, want in (("train", train), ("test", test)):
        x, y = data.load_split(info, split, normalize=False)
        got = sorted((int(c), img.permute(1, 2, 0).numpy().tobytes()) for img, c in zip(x, y))
        assert got == sorted(want)  # same images and labels; order is a fixed shuffle
    x, y = data.load_split(info, "train", normalize=False)
    assert y.tolist() != sorted(y.tolist())  # shards mix classes


def test_imagefolder_resizes_in_a_process_pool(tmp_path, monkeypatch):
    want = fake_imagefolder(tmp_path / "src")
    (tmp_path / "pids").mkdir()
    monkeypatch.setenv("RAYDD_TEST_PIDS", str(tmp_path / "pids"))
    monkeypatch.setattr(prep, "_encode", _encode_recording_pid)
    result = data.prepare("imagefolder", tmp_path / "out", src=tmp_path / "src", image_size=16, workers=2)
    pids = {int(p.name) for p in (tmp_path / "pids").iterdir()}
    assert len(pids) == 2 and os.getpid() not in pids  # both worker processes did work
    info = data.load_info(tmp_path / "out")
    assert info.shape == (3, 16, 16) and info.classes == ["cat", "dog"] and result["class_ids"] == ["cat", "dog"]
    for split in ("train", "test"):
        x, y = data.load_split(info, split, normalize=False)
        assert x.shape == (len(want[split]), 3, 16, 16)
        flat = x.flatten(2)
        assert bool((flat == flat[:, :, :1]).all())  # flat colour everywhere: margins were cropped
        got = sorted((int(c), tuple(int(v) for v in img[:, 0, 0])) for img, c in zip(x, y))
        assert got == sorted(want[split])


# ---------------------------------------------------------------------------- idempotence

def test_rerun_is_a_noop_and_changes_rewrite_cleanly(tmp_path):
    fake_fashion(tmp_path / "src", n_train=30)
    out = tmp_path / "out"
    first = data.prepare("fashion-mnist", out, src=tmp_path / "src", shard_size=10)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    time.sleep(0.01)
    again = data.prepare("fashion-mnist", out, src=tmp_path / "src", shard_size=10)
    assert again["run"]["skipped"] and again["shards"] == first["shards"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    # other settings: rewritten, stale shards gone
    data.prepare("fashion-mnist", out, src=tmp_path / "src", shard_size=25)
    assert shard_files(out) == ["dataset.json", "test-000000.tar", "train-000000.tar", "train-000001.tar"]
    assert data.load_split(out, "train")[0].shape[0] == 30

    # other inputs: rewritten with the new pixels
    arrays = fake_fashion(tmp_path / "src", n_train=30, seed=1)
    assert not data.prepare("fashion-mnist", out, src=tmp_path / "src", shard_size=25)["run"]["skipped"]
    assert np.array_equal(data.load_split(out, "train", normalize=False)[0][:, 0].numpy(), arrays["train"][0])

    # a missing shard makes the directory incomplete: prepared again
    (out / "train-000001.tar").unlink()
    assert not data.prepare("fashion-mnist", out, src=tmp_path / "src", shard_size=25)["run"]["skipped"]
    assert (out / "train-000001.tar").exists()


# ---------------------------------------------------------------------------- bad inputs

def test_missing_or_wrong_sources_fail_clearly_without_writing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    cases = [
        (dict(source="cifar10", src=tmp_path / "nope"), r"--src .*nope does not exist; expected cifar-10"),
        (dict(source="mnist", src=None), r"unknown dataset source 'mnist'; expected one of: digits"),
        (dict(source="digits", src=tmp_path), r"not used by 'digits'"),
        (dict(source="fashion-mnist", src=tmp_path), r"has no train-images-idx3-ubyte.gz"),
        (dict(source="imagefolder", src=tmp_path), r"imagefolder needs --image-size"),
        (dict(source="tiny-imagenet", src=tmp_path), r"has no wnids.txt"),
        (dict(source="cifar100", src=tmp_path), r"holds neither cifar-100-python.tar.gz nor"),
        (dict(source="digits", shard_size=0), r"--shard-size 0 is invalid"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(DataError, match=pattern) as e:
            data.prepare(out=out, **kwargs)
        assert "\n" not in str(e.value)
    monkeypatch.setattr("raydd.data.sources.DEFAULT_ROOT", tmp_path / "none")
    with pytest.raises(DataError, match=r"fashion-mnist needs --src PATH \(no default at .*none/fashion-mnist\)"):
        data.prepare("fashion-mnist", out)
    # a truncated and a mislabelled IDX file
    fake_fashion(tmp_path / "src")
    raw = gzip.open(tmp_path / "src" / "t10k-images-idx3-ubyte.gz").read()
    with gzip.open(tmp_path / "src" / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz holds 9308 data bytes, its header promises 9408"):
        data.prepare("fashion-mnist", out, src=tmp_path / "src")
    assert not out.exists()


def test_failure_midway_leaves_no_dataset(tmp_path):
    fake_imagefolder(tmp_path / "src")
    out = tmp_path / "out"
    data.prepare("imagefolder", out, src=tmp_path / "src", image_size=8, shard_size=3)
    (tmp_path / "src" / "train" / "dog" / "4.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match=r"cannot read image .*dog/4\.jpg"):
        data.prepare("imagefolder", out, src=tmp_path / "src", image_size=8, shard_size=3)
    assert list(out.iterdir()) == []  # old dataset withdrawn, new shards and temporaries removed
    with pytest.raises(DataError, match=r"has no dataset.json; run `raydd data prepare"):
        data.load_info(out)
