"""The raw datasets `raydd data prepare` reads, each parsed into a :class:`Source`.

digits (bundled with scikit-learn), Fashion-MNIST's IDX files, the CIFAR-10/100 python batches
(archive or extracted folder; unpickled with an allow-list), Tiny ImageNet 200 and ImageNet-style
image folders. Each loader also lists its raw input files (relative path, size, mtime), from
which the prepared directory's fingerprint is made.
"""
from __future__ import annotations

import gzip
import io
import lzma
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ..errors import DataError

SOURCES = ("digits", "fashion-mnist", "cifar10", "cifar100", "tiny-imagenet", "imagefolder")
DEFAULT_ROOT = Path("/usr/share/datasets")  # --src default: DEFAULT_ROOT/SOURCE when it exists
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@dataclass
class Source:
    """A parsed source: per split, images (uint8 H×W[×3] arrays or file paths) and labels."""
    classes: list[str]
    channels: int
    size: int                                   # output height = width
    splits: dict[str, tuple[Sequence[Any], np.ndarray]]
    inputs: list[str]                           # fingerprint lines describing the raw inputs
    class_ids: list[str] | None = None


def resolve_src(source: str, src: str | os.PathLike | None) -> Path | None:
    if source == "digits":
        if src is not None:
            raise DataError(f"--src {src} is not used by 'digits' (bundled with scikit-learn); omit it")
        return None
    if src is None:
        default = DEFAULT_ROOT / source
        if default.exists():
            return default
        raise DataError(f"{source} needs --src PATH (no default at {default}); {_EXPECTED[source]}")
    path = Path(src).expanduser()
    if not path.exists():
        raise DataError(f"--src {src} does not exist; {_EXPECTED[source]}")
    return path


_EXPECTED = {
    "fashion-mnist": "expected a folder with train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                     "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz",
    "cifar10": "expected cifar-10-python.tar.gz or its extracted cifar-10-batches-py folder",
    "cifar100": "expected cifar-100-python.tar.gz or its extracted cifar-100-python folder",
    "tiny-imagenet": "expected the tiny-imagenet-200 folder (wnids.txt, train/WNID/images/, "
                     "val/images/, val/val_annotations.txt)",
    "imagefolder": "expected SRC/train/CLASS/*.jpg|png and SRC/val/CLASS/... (or SRC/test/CLASS/...)",
}


def _digits(src: Path | None, image_size: int | None) -> Source:
    """scikit-learn's 8×8 digits; 0..16 intensities map to round(v*255/16) (half to even: 8 -> 128)."""
    import sklearn
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = np.rint(d.images * 255.0 / 16.0).astype(np.uint8)
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.2, stratify=d.target, random_state=0)
    return Source(classes=[str(i) for i in range(10)], channels=1, size=8,
                   splits={"train": (xtr, ytr), "test": (xte, yte)},
                   inputs=[f"sklearn-digits\t{sklearn.__version__}\tsplit=0.2,stratified,seed=0"])


def _fashion_mnist(src: Path, image_size: int | None) -> Source:
    splits, files = {}, []
    for split, prefix in (("train", "train"), ("test", "t10k")):
        img = _find_one(src, f"{prefix}-images-idx3-ubyte", "fashion-mnist")
        lab = _find_one(src, f"{prefix}-labels-idx1-ubyte", "fashion-mnist")
        x, y = _read_idx(img, 3), _read_idx(lab, 1)
        if len(x) != len(y):
            raise DataError(f"{img.name} holds {len(x)} images but {lab.name} {len(y)} labels")
        _check_labels(y, 10, lab)
        splits[split] = (x, y.astype(np.int64))
        files += [img, lab]
    size = splits["train"][0].shape[1]
    return Source(classes=list(FASHION_CLASSES), channels=1, size=size, splits=splits,
                   inputs=list(_stat_lines(files, src)))


def _find_one(src: Path, stem: str, source: str) -> Path:
    for name in (stem + ".gz", stem):
        if (src / name).is_file():
            return src / name
    raise DataError(f"--src {src} has no {stem}.gz; {_EXPECTED[source]}")


def _one_line(e: BaseException) -> str:
    """A decompression error in one line: tarfile's "r:*" lists every method it tried, one per line;
    the first is gzip's."""
    lines = [ln.strip(" -") for ln in str(e).splitlines() if ln.strip(" -")]
    if len(lines) > 1 and lines[0].startswith("file could not be opened"):
        return lines[1]
    return " ".join(lines) or type(e).__name__


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """IDX format: 0x0000, dtype 0x08 (uint8), ndim, big-endian uint32 dims, then the data."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is not a readable {'gzip ' if path.suffix == '.gz' else ''}file "
                        f"({_one_line(e)})") from None
    head = 4 + 4 * ndim
    if len(data) < head or data[:2] != b"\0\0" or data[2] != 0x08 or data[3] != ndim:
        raise DataError(f"{path} is not a uint8 IDX file with {ndim} dimension(s)")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    if len(data) - head != int(np.prod(dims)):
        raise DataError(f"{path} holds {len(data) - head} data bytes, its header promises {int(np.prod(dims))}")
    return np.frombuffer(data, np.uint8, offset=head).reshape(dims)


class _CifarUnpickler(pickle.Unpickler):
    """The official CIFAR batches are pickles; allow only what they contain (dicts, lists,
    bytes, numpy arrays), so a tampered archive cannot run code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"forbidden object {module}.{name}")
        return super().find_class(module, name)


def _cifar(src: Path, folder: str, archive: str, members: list[str], source: str) -> tuple[dict, list[str]]:
    """Read the named batch files from the archive or an extracted folder; returns unpickled dicts."""
    raw: dict[str, bytes] = {}
    candidates = [src / archive] if src.is_dir() else [src]
    tar_path = next((p for p in candidates if p.is_file()), None)
    dirs = [src, src / folder] if src.is_dir() else []
    base = next((d for d in dirs if all((d / m).is_file() for m in members)), None)
    if base is not None:
        for m in members:
            raw[m] = (base / m).read_bytes()
        inputs = list(_stat_lines([base / m for m in members], base))
    elif tar_path is not None:
        try:
            with tarfile.open(tar_path, "r:*") as tar:
                for info in tar:
                    name = info.name.rsplit("/", 1)[-1]
                    if info.isreg() and name in members and name not in raw:
                        raw[name] = tar.extractfile(info).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as e:
            raise DataError(f"{tar_path} is not a readable tar archive ({_one_line(e)})") from None
        missing = [m for m in members if m not in raw]
        if missing:
            raise DataError(f"{tar_path} lacks {', '.join(missing)}; {_EXPECTED[source]}")
        inputs = list(_stat_lines([tar_path], tar_path.parent))
    else:
        raise DataError(f"--src {src} holds neither {archive} nor {folder}/ with "
                        f"{', '.join(members)}; {_EXPECTED[source]}")
    out = {}
    for m, data in raw.items():
        try:
            obj = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
        except Exception as e:  # any damage in a pickle stream surfaces as one of many types
            raise DataError(f"CIFAR batch {m} in {src} is unreadable ({e})") from None
        if not isinstance(obj, dict):
            raise DataError(f"CIFAR batch {m} in {src} is not a dict")
        out[m] = obj
    return out, inputs


def _cifar_split(batches: list[dict], key: bytes, name: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for b in batches:
        if b"data" not in b or key not in b:
            raise DataError(f"CIFAR {name} batch lacks {b'data'!r} or {key!r}")
        x = np.asarray(b[b"data"], dtype=np.uint8)
        if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(b[key]):
            raise DataError(f"CIFAR {name} batch has data of shape {x.shape}, expected N×3072 with N labels")
        xs.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(b[key], dtype=np.int64))
    y = np.concatenate(ys)
    _check_labels(y, num_classes, name)
    return np.ascontiguousarray(np.concatenate(xs)), y


def _cifar10(src: Path, image_size: int | None) -> Source:
    train = [f"data_batch_{i}" for i in range(1, 6)]
    b, inputs = _cifar(src, "cifar-10-batches-py", "cifar-10-python.tar.gz",
                       train + ["test_batch", "batches.meta"], "cifar10")
    classes = [n.decode() for n in b["batches.meta"].get(b"label_names", [])]
    if len(classes) != 10:
        raise DataError(f"CIFAR-10 batches.meta in {src} lists {len(classes)} class names, expected 10")
    splits = {"train": _cifar_split([b[m] for m in train], b"labels", "train", 10),
              "test": _cifar_split([b["test_batch"]], b"labels", "test", 10)}
    return Source(classes=classes, channels=3, size=32, splits=splits, inputs=inputs)


def _cifar100(src: Path, image_size: int | None) -> Source:
    b, inputs = _cifar(src, "cifar-100-python", "cifar-100-python.tar.gz", ["train", "test", "meta"], "cifar100")
    classes = [n.decode() for n in b["meta"].get(b"fine_label_names", [])]
    if len(classes) != 100:
        raise DataError(f"CIFAR-100 meta in {src} lists {len(classes)} fine class names, expected 100")
    splits = {s: _cifar_split([b[s]], b"fine_labels", s, 100) for s in ("train", "test")}
    return Source(classes=classes, channels=3, size=32, splits=splits, inputs=inputs)


def _tiny_imagenet(src: Path, image_size: int | None) -> Source:
    """Tiny ImageNet 200: train/WNID/images/*.JPEG is the train split, val/ the test split
    (its test/ folder has no labels). Classes are the sorted WNIDs, named from words.txt."""
    root = src / "tiny-imagenet-200" if (src / "tiny-imagenet-200").is_dir() else src
    if not (root / "wnids.txt").is_file():
        raise DataError(f"--src {src} has no wnids.txt; {_EXPECTED['tiny-imagenet']}")
    wnids = sorted({w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()})
    index = {w: i for i, w in enumerate(wnids)}
    words = {}
    if (root / "words.txt").is_file():
        for line in (root / "words.txt").read_text().splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid.strip()] = text.split(",")[0].strip()
    train: list[tuple[str, int]] = []
    for w in wnids:
        folder = root / "train" / w / "images"
        files = _image_files(folder)
        if not files:
            raise DataError(f"{folder} holds no images; {_EXPECTED['tiny-imagenet']}")
        train += [(str(f), index[w]) for f in files]
    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DataError(f"{ann} is missing; {_EXPECTED['tiny-imagenet']}")
    test: list[tuple[str, int]] = []
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        parts = line.split("\t")
        if not line.strip():
            continue
        if len(parts) < 2 or parts[1] not in index:
            raise DataError(f"{ann} line {n}: expected 'FILE<TAB>WNID...' with a WNID from wnids.txt, "
                            f"got {line[:80]!r}")
        path = root / "val" / "images" / parts[0]
        if not path.is_file():
            raise DataError(f"{ann} line {n}: image {path} does not exist")
        test.append((str(path), index[parts[1]]))
    return _files_source(wnids, [words.get(w, w) for w in wnids], {"train": train, "test": test}, root, 64)


def _imagefolder(src: Path, image_size: int | None) -> Source:
    """ImageNet-style SRC/train/CLASS/* and SRC/val/CLASS/* (or test/); classes = sorted folders."""
    if image_size is None:
        raise DataError("imagefolder needs --image-size N (images are center-cropped and resized to N×N, "
                        "e.g. 64 for ImageNet-64)")
    test_dir = next((src / d for d in ("val", "test") if (src / d).is_dir()), None)
    if not (src / "train").is_dir() or test_dir is None:
        raise DataError(f"--src {src} lacks train/ or val/; {_EXPECTED['imagefolder']}")
    classes = sorted(d.name for d in (src / "train").iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{src / 'train'} has no class folders; {_EXPECTED['imagefolder']}")
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split, folder in (("train", src / "train"), ("test", test_dir)):
        items = []
        for d in sorted(p for p in folder.iterdir() if p.is_dir()):
            if d.name not in index:
                raise DataError(f"{d} is a class missing from {src / 'train'}; both splits need the same classes")
            files = _image_files(d)
            if not files:   # an empty test class would read as 0 % (or be skipped) in every evaluation
                raise DataError(f"{d} holds no images ({', '.join(sorted(IMAGE_EXTS))}); every class "
                                f"needs images in both splits")
            items += [(str(f), index[d.name]) for f in files]
        if not items:
            raise DataError(f"{folder} holds no images; {_EXPECTED['imagefolder']}")
        missing = sorted(set(classes) - {c for c in classes if (folder / c).is_dir()})
        if missing:
            raise DataError(f"{folder} lacks the class folder {folder / missing[0]} of {src / 'train'}; "
                            f"every class needs images in both splits")
        splits[split] = items
    return _files_source(classes, classes, splits, src, image_size)


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def _files_source(ids: list[str], names: list[str], splits: dict[str, list[tuple[str, int]]],
                  base: Path, size: int) -> Source:
    """File lists sorted by class are permuted once (fixed seed) so every shard mixes classes."""
    out, inputs = {}, []
    for split, items in splits.items():
        order = np.random.RandomState(0).permutation(len(items))
        out[split] = ([items[i][0] for i in order], np.array([items[i][1] for i in order], dtype=np.int64))
        inputs += _stat_lines([Path(p) for p, _ in items], base)
    return Source(classes=names, channels=3, size=size, splits=out, inputs=inputs, class_ids=ids)


LOADERS: dict[str, Callable[[Any, int | None], Source]] = {
    "digits": _digits, "fashion-mnist": _fashion_mnist, "cifar10": _cifar10, "cifar100": _cifar100,
    "tiny-imagenet": _tiny_imagenet, "imagefolder": _imagefolder}


def _check_labels(y: np.ndarray, num_classes: int, where: Any) -> None:
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{where} has labels in [{y.min()}, {y.max()}], expected 0..{num_classes - 1}")


def _stat_lines(paths: Iterable[Path], base: Path) -> Iterator[str]:
    for p in paths:
        st = p.stat()
        yield f"{os.path.relpath(p, base)}\t{st.st_size}\t{st.st_mtime_ns}"
