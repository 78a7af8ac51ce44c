"""Bad inputs through the command line: exit code 2, one line naming the file or key, and nothing
written to a fresh --out. Each case builds its input in a temporary directory and is refused
before any training starts (the CLI runs in-process; Ray is never started)."""
import gzip
import io
import json
import tarfile
import zlib
from pathlib import Path

import pytest
import torch

from raydd.cli import main

TINY = ["--set", "teachers.count=1", "--set", "teachers.epochs=1", "--set", "teachers.arch=convnet:width=8",
        "--set", "evaluate.archs=[mlp]", "--set", "evaluate.seeds=1", "--set", "evaluate.epochs=1"]


def _synset(path, digits, labels=None, shape=None, manifest=None):
    from raydd.data import load_info, sample_per_class
    from raydd.io import save_tensors, sha256_file, write_json
    x, y = sample_per_class(load_info(digits), "train", 1, seed=0)
    if shape is not None:
        x = torch.zeros(len(y), *shape)
    if labels is not None:
        y = torch.as_tensor(labels(y))
    sha = save_tensors(path / "synset.safetensors", {"images": x, "labels": y.long()})
    assert sha == sha256_file(path / "synset.safetensors")
    write_json(path / "manifest.json", manifest if manifest is not None else
               {"file": "synset.safetensors", "sha256": sha, "num_classes": 10})
    return path


GZIP_HEADER = bytes([0x1F, 0x8B, 8, 0, 0, 0, 0, 0, 0, 0xFF])


def _damaged_gzip(payload, how):
    """``payload`` gzipped, then cut short ("truncated"), or a valid start followed by an invalid
    deflate block ("damaged", zlib's own error), or invalid from the first block ("header")."""
    if how == "truncated":
        return gzip.compress(payload, mtime=0)[:300]
    if how == "header":
        return GZIP_HEADER + b"\x07" + bytes(100)
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return GZIP_HEADER + c.compress(payload[: len(payload) * 3 // 4]) + c.flush(zlib.Z_SYNC_FLUSH) + b"\x07" + bytes(64)


def _cifar_gz(tmp, how):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = b"ab" * 100000
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (tmp / "cifar-10-python.tar.gz").write_bytes(_damaged_gzip(buf.getvalue(), how))
    return tmp


def _fashion_gz(tmp):
    for prefix in ("train", "t10k"):
        for kind, ndim in (("images-idx3", 3), ("labels-idx1", 1)):
            payload = bytes([0, 0, 8, ndim]) + (4).to_bytes(4, "big") * ndim + b"ab" * 50000
            (tmp / f"{prefix}-{kind}-ubyte.gz").write_bytes(_damaged_gzip(payload, "damaged"))
    return tmp


def _teachers_without_shape(run):
    """A run directory whose teachers.json was edited by hand; returns the run directory."""
    from raydd.io import write_json
    write_json(run / "teachers" / "teachers.json",
               {"dataset": "x", "teachers": [{"file": "teacher-000.safetensors", "spec": "convnet:width=8",
                                              "num_classes": 10, "sha256": "0" * 64}]})
    return str(run)


def _existing_run(out, digits, **sections):
    """A run directory claimed earlier by the digits config (no outputs yet); returns it."""
    import yaml

    from raydd.config import load_config
    cfg = load_config("configs/digits.yaml", [f"data.dir={digits}"]).to_dict()
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump({**cfg, **sections}, sort_keys=False))
    return str(out)


def _imagefolder(tmp, counts, val=None):
    """Classes a, b with ``counts`` images in train/ and ``val`` (default the same) in val/; None: no folder."""
    from PIL import Image
    for split, ns in (("train", counts), ("val", val or counts)):
        for c, n in zip("ab", ns):
            if n is None:
                continue
            d = tmp / "folder" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(d / f"{i}.png")
    return tmp / "folder"


def _config(tmp, text, name="cfg.yaml"):
    p = tmp / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(p)


def _edited_synset(tmp, digits, **fields):
    """A valid synset whose manifest.json then gets ``fields`` written over by hand; returns its directory."""
    path = _synset(tmp / "syn", digits)
    doc = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**doc, **fields}))
    return str(path)


def _edited_data(tmp, digits, **fields):
    """A copy of the digits whose dataset.json then gets ``fields`` written over by hand; returns it."""
    import shutil
    new = tmp / "data"
    shutil.copytree(digits, new)
    doc = json.loads((new / "dataset.json").read_text())
    (new / "dataset.json").write_text(json.dumps({**doc, **fields}))
    return str(new)


def _evaluate(t, d, o, synset):
    return ["evaluate", "configs/digits.yaml", "--set", f"data.dir={d}", *TINY, "--set", "evaluate.modes=[hard]",
            "--synset", synset, "--out", o]


# (id, argv(tmp, digits, out) -> list, fragments the one line must hold)
CASES = [
    ("binary config", lambda t, d, o: ["run", _config(t, b"\xff\xfe\x00\x81name: x"), "--out", o], ["cfg.yaml"]),
    ("duplicate yaml key", lambda t, d, o: ["run", _config(t, "name: a\nname: b\n"), "--out", o],
     ["duplicate key 'name'"]),
    ("lr_img inf", lambda t, d, o: ["distill", "configs/digits.yaml", "--set", "distill.lr_img=.inf", "--out", o],
     ["distill.lr_img"]),
    ("negative momentum", lambda t, d, o: ["teachers", "train", "configs/digits.yaml", "--set",
                                           "teachers.momentum=-0.5", "--out", o], ["teachers.momentum"]),
    ("negative weight decay", lambda t, d, o: ["evaluate", "configs/digits.yaml", "--set",
                                               "evaluate.weight_decay=-1", "--out", o], ["evaluate.weight_decay"]),
    ("negative momentum_img", lambda t, d, o: ["distill", "configs/digits.yaml", "--set",
                                               "distill.momentum_img=-0.1", "--out", o], ["distill.momentum_img"]),
    ("evaluate momentum 7", lambda t, d, o: ["evaluate", "configs/digits.yaml", "--set", "evaluate.momentum=7",
                                             "--out", o], ["evaluate.momentum"]),
    ("unknown pool activation", lambda t, d, o: ["distill", "configs/digits.yaml", "--set",
                                                 "distill.pool.activations=[nosuch]", "--out", o],
     ["distill.pool.activations[0]"]),
    ("unknown pool norm", lambda t, d, o: ["distill", "configs/digits.yaml", "--set",
                                           "distill.pool.norms=[batch,nosuch]", "--out", o], ["distill.pool.norms[1]"]),
    ("service max_restarts -2", lambda t, d, o: ["distill", "configs/digits.yaml", "--set",
                                                 "distill.service.max_restarts=-2", "--out", o],
     ["distill.service.max_restarts"]),
    ("ray num_cpus -3", lambda t, d, o: ["run", "configs/digits.yaml", "--set", "ray.num_cpus=-3", "--out", o],
     ["ray.num_cpus"]),
    ("name escaping runs/", lambda t, d, o: ["run", "configs/digits.yaml", "--set", "name=../../escape"],
     ["name"]),
    ("--out is a file", lambda t, d, o: ["teachers", "train", "configs/digits.yaml", "--set", f"data.dir={d}",
                                         *TINY, "--out", _config(t, "x", "taken")], ["--out", "taken"]),
    ("--out under a file", lambda t, d, o: ["run", "configs/digits.yaml", "--set", f"data.dir={d}", *TINY,
                                            "--out", _config(t, "x", "taken") + "/run"], ["--out", "taken"]),
    ("prepare --out is a file", lambda t, d, o: ["data", "prepare", "digits", "--out", _config(t, "x", "taken")],
     ["--out", "taken"]),
    ("prepare --out under a file", lambda t, d, o: ["data", "prepare", "digits", "--out",
                                                    _config(t, "x", "taken") + "/sub"], ["--out", "taken"]),
    *[(f"{how} cifar tar.gz", lambda t, d, o, how=how: ["data", "prepare", "cifar10", "--src",
                                                         str(_cifar_gz(t, how)), "--out", o],
       ["cifar-10-python.tar.gz", "not a readable tar archive"]) for how in ("truncated", "damaged", "header")],
    ("damaged fashion-mnist gzip", lambda t, d, o: ["data", "prepare", "fashion-mnist", "--src", str(_fashion_gz(t)),
                                                    "--out", o], ["train-images-idx3-ubyte.gz", "invalid block"]),
    ("imagefolder empty class", lambda t, d, o: ["data", "prepare", "imagefolder", "--image-size", "8",
                                                 "--src", str(_imagefolder(t, [3, 0])), "--out", o], ["b"]),
    ("imagefolder empty val class", lambda t, d, o: ["data", "prepare", "imagefolder", "--image-size", "8", "--src",
                                                     str(_imagefolder(t, [3, 3], val=[2, 0])), "--out", o],
     ["val/b holds no images"]),
    ("imagefolder val lacks a class", lambda t, d, o: ["data", "prepare", "imagefolder", "--image-size", "8", "--src",
                                                       str(_imagefolder(t, [3, 3], val=[2, None])), "--out", o],
     ["val/b", "lacks the class folder"]),
    ("synset manifest a list", lambda t, d, o: ["evaluate", "configs/digits.yaml", "--set", f"data.dir={d}", *TINY,
                                                "--synset", str(_synset(t / "syn", d, manifest=[])), "--out", o],
     ["manifest.json"]),
    ("synset labels -1", lambda t, d, o: ["evaluate", "configs/digits.yaml", "--set", f"data.dir={d}", *TINY,
                                          "--synset", str(_synset(t / "syn", d, labels=lambda y: y * 0 - 1)),
                                          "--out", o], ["labels", "-1"]),
    ("synset label 10 of 10 classes", lambda t, d, o: ["evaluate", "configs/digits.yaml", "--set", f"data.dir={d}",
                                                       *TINY, "--synset",
                                                       str(_synset(t / "syn", d, labels=lambda y: y + 1)),
                                                       "--out", o], ["labels", "10"]),
    ("synset shape mismatch", lambda t, d, o: ["evaluate", "configs/digits.yaml", "--set", f"data.dir={d}", *TINY,
                                               "--synset", str(_synset(t / "syn", d, shape=(3, 4, 4))),
                                               "--out", o], ["3×4×4"]),
    ("--synset with {x}", lambda t, d, o: ["evaluate", "configs/digits.yaml", "--set", f"data.dir={d}", *TINY,
                                           "--synset", str(t / "syn{x}"), "--out", o], ["{x}"]),
    ("data.dir missing (cifar10)", lambda t, d, o: ["distill", "configs/digits.yaml", "--set", "data.source=cifar10",
                                                    "--set", f"data.dir={t / 'nodata'}", *TINY, "--out", o],
     ["data.dir", "raydd data prepare"]),
    ("data.dir is a file", lambda t, d, o: ["teachers", "train", "configs/digits.yaml", "--set",
                                            f"data.dir={_config(t, 'x', 'datafile')}", *TINY, "--out", o],
     ["data.dir", "datafile"]),
    ("unknown teacher arch", lambda t, d, o: ["teachers", "train", "configs/digits.yaml", "--set", f"data.dir={d}",
                                              *TINY, "--set", "teachers.arch=resnet9000", "--out", o],
     ["resnet9000"]),
    ("unknown evaluation arch", lambda t, d, o: ["evaluate", "configs/digits.yaml", "--set", f"data.dir={d}", *TINY,
                                                 "--set", "evaluate.archs=[resnet9000]", "--set",
                                                 "evaluate.modes=[hard]", "--synset", str(_synset(t / "syn", d)),
                                                 "--out", o], ["resnet9000"]),
    ("teachers.json record without shape", lambda t, d, o: ["evaluate", "configs/digits.yaml", "--set",
                                                            f"data.dir={d}", *TINY, "--set",
                                                            "evaluate.modes=[hard]", "--synset",
                                                            str(_synset(t / "syn", d)), "--out",
                                                            _teachers_without_shape(Path(o))],
     ["teachers.json", "teachers[0]", "'shape'"]),
    ("refused after the claim of an existing run", lambda t, d, o: [
        "teachers", "train", "configs/digits.yaml", "--set", "data.source=cifar10", "--set",
        f"data.dir={t / 'nodata'}", *TINY, "--out", _existing_run(Path(o), d)], ["data.dir", "raydd data prepare"]),
    ("refused after the claim of a fresh run", lambda t, d, o: [
        "teachers", "train", "configs/digits.yaml", "--set", "data.source=cifar10", "--set",
        f"data.dir={t / 'nodata'}", *TINY, "--out", o], ["data.dir", "raydd data prepare"]),
    ("unreachable ray.address", lambda t, d, o: ["teachers", "train", "configs/digits.yaml", "--set",
                                                 f"data.dir={d}", *TINY, "--set", "ray.num_cpus=null",
                                                 "--set", "ray.address=127.0.0.1:1", "--out", o], ["127.0.0.1:1"]),
    # refused by the config, not after a run (or Ray's connect retries) had started
    ("malformed ray.address", lambda t, d, o: ["teachers", "train", "configs/digits.yaml", "--set", f"data.dir={d}",
                                               *TINY, "--set", "ray.num_cpus=null", "--set",
                                               "ray.address=notahost:abc", "--out", o],
     ["ray.address", "'notahost:abc'", "HOST:PORT"]),
    ("seed beyond 2**32", lambda t, d, o: ["run", "configs/digits.yaml", "--set", f"data.dir={d}", *TINY, "--set",
                                           "seed=99999999999999999999999", "--out", o], ["seed", "[0, 4294967295]"]),
    ("config section null", lambda t, d, o: ["run", _config(t, "distill:\n"), "--set", f"data.dir={d}", *TINY,
                                             "--out", o], ["distill: expected a mapping", "got null"]),
    ("hand-edited dataset.json shape", lambda t, d, o: ["teachers", "train", "configs/digits.yaml", *TINY, "--set",
                                                     f"data.dir={_edited_data(t, d, shape=[1, -8, 8])}", "--out", o],
     ["dataset.json", "shape [1, -8, 8]"]),
    ("hand-edited dataset.json num_classes", lambda t, d, o: ["teachers", "train", "configs/digits.yaml", *TINY, "--set",
                                                    f"data.dir={_edited_data(t, d, num_classes=0)}", "--out", o],
     ["dataset.json", "num_classes 0"]),
    ("hand-edited synset sha256", lambda t, d, o: _evaluate(t, d, o, _edited_synset(t, d, sha256=5)),
     ["manifest.json", "sha256 5"]),
    ("hand-edited synset file outside", lambda t, d, o: _evaluate(t, d, o, _edited_synset(t, d, file="../../x")),
     ["manifest.json", "file '../../x'"]),
    ("hand-edited synset num_classes", lambda t, d, o: _evaluate(t, d, o, _edited_synset(t, d, num_classes="a")),
     ["manifest.json", "num_classes 'a'"]),
    ("synset of 5 classes for 10", lambda t, d, o: _evaluate(t, d, o, _edited_synset(t, d, num_classes=5)),
     ["5 classes", "num_classes 10"]),
]


@pytest.mark.parametrize("argv, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, fragments, tmp_path, digits, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])  # configs/ is relative to the repository
    out = tmp_path / "out"
    args = argv(tmp_path, digits, str(out))
    before = sorted(p for p in tmp_path.rglob("*"))
    saved = (out / "config.yaml").read_bytes() if (out / "config.yaml").exists() else None
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("raydd: error:") and "\n" not in err, err
    for f in fragments:
        assert f in err, err
    if out not in before:  # a fresh --out is not even created
        assert not out.exists(), sorted(out.rglob("*"))
    # an existing run directory keeps its earlier claim (config.yaml, byte for byte, or none) even when
    # the refusal came after this command's claim, and the lock file of the process that claimed it;
    # nothing else is written anywhere
    assert ((out / "config.yaml").read_bytes() if (out / "config.yaml").exists() else None) == saved
    kept = {out / ".raydd.lock"}
    after = sorted(p for p in tmp_path.rglob("*") if p not in kept)
    assert after == [p for p in before if p not in kept]


def test_an_alias_bomb_is_quoted_briefly(tmp_path, capsys, monkeypatch):
    """YAML anchors make ``name`` a list of 9**6 leaves held by reference; the error quotes it in one
    short line (a full repr would be megabytes, or for a deeper bomb never finish)."""
    text = "name:\n  - &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"  - &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcde", "bcdef"))
    monkeypatch.chdir(Path(__file__).parents[1])
    assert main(["config", "show", _config(tmp_path, text)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raydd: error: name: expected a string, got [[") and "\n" not in err, err[:300]
    assert len(err) < 1000, len(err)
