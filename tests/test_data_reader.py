"""The streaming reader: locations (dir, file://, http://, pipe:), per-worker shard lists,
checksums and the corrupt-shard policy, and the in-memory/batch/per-class helpers."""
from __future__ import annotations

import functools
import http.server
import json
import logging
import shutil
import threading

import pytest
import torch

import raydd.data as data
from raydd.errors import DataError, RayddError


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """scikit-learn digits in 4 train shards (400, 400, 400, 237) and 1 test shard."""
    out = tmp_path_factory.mktemp("digits")
    data.prepare("digits", out, shard_size=400)
    return out


@pytest.fixture(scope="module")
def reference(digits):
    return data.load_split(digits, "train", normalize=False)


@pytest.fixture
def copy(digits, tmp_path):
    """A private copy of the prepared digits, to damage."""
    return shutil.copytree(digits, tmp_path / "d")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(digits):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(digits)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_stream_yields_normalised_or_uint8_images(digits, reference):
    info = data.load_info(digits)
    assert (info.in_channels, info.image_size, info.num_classes) == (1, 8, 10)
    x, y = next(iter(data.stream(info, "train")))
    assert x.dtype == torch.float32 and x.shape == (1, 8, 8) and isinstance(y, int)
    u, _ = next(iter(data.stream(info, "train", normalize=False)))
    assert u.dtype == torch.uint8 and torch.equal(u, reference[0][0])
    assert torch.allclose(x, (u.float() / 255 - info.mean[0]) / info.std[0])
    assert torch.allclose(data.denormalize(x, info) * 255, u.float(), atol=1e-4)


def test_shards_for_splits_work_between_workers(digits, reference):
    info = data.load_info(digits)
    parts = [data.shards_for(info, "train", r, 3) for r in range(3)]
    assert parts == [["train-000000.tar", "train-000003.tar"], ["train-000001.tar"], ["train-000002.tar"]]
    ys = [y for part in parts for _, y in data.stream(info, "train", part, normalize=False)]
    assert sorted(ys) == sorted(reference[1].tolist())
    assert data.shards_for(info, "test", 1, 2) == []
    with pytest.raises(RayddError, match="rank 3 is invalid"):
        data.shards_for(info, "train", 3, 3)
    with pytest.raises(DataError, match="shard 'train-000009.tar' is not in the train split"):
        data.stream(info, "train", ["train-000009.tar"])
    with pytest.raises(DataError, match="split 'val' is not in the dataset"):
        data.stream(info, "val")


def test_reads_over_http_with_verification(http_root, reference):
    info = data.load_info(http_root)
    assert info.url("train-000000.tar") == f"{http_root}/train-000000.tar"
    x, y = data.load_split(info, "train", normalize=False, verify=True)
    assert torch.equal(x, reference[0]) and torch.equal(y, reference[1])
    with pytest.raises(DataError, match=r"cannot read dataset manifest http://127.0.0.1:\d+/nowhere/dataset.json"):
        data.load_info(http_root + "/nowhere")


def test_pipe_and_file_locations(digits, reference):
    for location in (f"pipe:cat {digits}/{{name}}", f"file://{digits}"):
        x, y = data.load_split(location, "train", normalize=False)
        assert torch.equal(x, reference[0]) and torch.equal(y, reference[1])
    with pytest.raises(DataError, match=r"pipe: command without \{name\}"):
        data.load_info(f"pipe:cat {digits}")


def test_truncated_shard_fails_or_is_skipped(copy, reference, caplog):
    shard = copy / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:300_000])
    for verify in (True, False):
        with pytest.raises(DataError, match=r"^corrupt shard .*/train-000001.tar: ") as e:
            data.load_split(copy, "train", verify=verify)
        assert "\n" not in str(e.value)
    with caplog.at_level(logging.WARNING, logger="raydd.data.reader"):
        s = data.stream(copy, "train", on_corrupt="skip", normalize=False)
        ys = [y for _, y in s]
    assert len(ys) == 1437 - 400 and s.dropped_samples == 400
    assert [(d["shard"], d["samples"]) for d in s.skipped] == [("train-000001.tar", 400)]
    assert "skipped 400 sample(s) of corrupt shard train-000001.tar" in caplog.text
    assert data.load_split(copy, "train", on_corrupt="skip")[0].shape[0] == 1037


def test_wrong_checksum(copy, reference):
    manifest = json.loads((copy / "dataset.json").read_text())
    manifest["shards"]["train"][2]["sha256"] = "0" * 64
    (copy / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"train-000002.tar: sha256 [0-9a-f]{12}… does not match dataset.json"):
        data.load_split(copy, "train")
    x, _ = data.load_split(copy, "train", verify=False, normalize=False)
    assert torch.equal(x, reference[0])
    s = data.stream(copy, "train", on_corrupt="skip")
    assert sum(1 for _ in s) == 1037 and s.skipped[0]["shard"] == "train-000002.tar"
    assert "sha256" in s.skipped[0]["reason"]


def test_undecodable_sample_without_verification(copy):
    shard = copy / "test-000000.tar"
    raw = bytearray(shard.read_bytes())
    at = raw.index(b"IDAT") + 6
    raw[at:at + 8] = b"\x00" * 8
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"test-000000.tar: sample 00000000: PNG does not decode"):
        data.load_split(copy, "test", verify=False)
    s = data.stream(copy, "test", verify=False, on_corrupt="skip")
    assert sum(1 for _ in s) == 359 and s.skipped == [
        {"shard": "test-000000.tar", "reason": s.skipped[0]["reason"], "samples": 1}]


def test_missing_shard_and_manifest(copy):
    (copy / "test-000000.tar").unlink()
    with pytest.raises(DataError, match=r"test-000000.tar: cannot open"):
        data.load_split(copy, "test")
    (copy / "dataset.json").write_text('{"classes": []}')
    with pytest.raises(DataError, match=r"is not a raydd dataset manifest \(missing source, num_classes"):
        data.load_info(copy)


def test_helpers(digits, reference):
    info = data.load_info(digits)
    x, y = data.load_split(info, "train", limit=10)
    assert x.shape == (10, 1, 8, 8) and x.dtype == torch.float32 and torch.equal(y, reference[1][:10])

    sizes = [len(yb) for _, yb in data.batches(info, "test", 64)]
    assert sizes == [64] * 5 + [40]
    xb, yb = next(data.batches(info, "test", 64, normalize=False))
    assert xb.shape == (64, 1, 8, 8) and xb.dtype == torch.uint8 and yb.dtype == torch.int64

    xs, ys = data.sample_per_class(info, "train", 3, seed=1)
    assert ys.tolist() == [c for c in range(10) for _ in range(3)]
    assert torch.equal(data.sample_per_class(info, "train", 3, seed=1)[0], xs)
    assert not torch.equal(data.sample_per_class(info, "train", 3, seed=2)[0], xs)
    rx, ry = reference
    pixels = data.sample_per_class(info, "train", 3, seed=1, normalize=False)[0]
    for img, c in zip(pixels, ys):  # real images of their own class
        assert any(torch.equal(img, r) for r in rx[ry == c])
    assert torch.allclose(data.denormalize(xs, info) * 255, pixels.float(), atol=1e-4)
    with pytest.raises(DataError, match=r"class 0 \(0\) has 36 images in the test split, fewer than k=37"):
        data.sample_per_class(info, "test", 37, seed=0)


def test_shuffle_is_a_reproducible_permutation(digits, reference):
    def labels(**kw):
        return [y for _, y in data.stream(digits, "train", normalize=False, **kw)]
    a, b = labels(shuffle=True, seed=3), labels(shuffle=True, seed=3)
    assert a == b and a != reference[1].tolist() and a != labels(shuffle=True, seed=4)
    assert sorted(a) == sorted(reference[1].tolist())


def test_missing_dataset_dir(tmp_path):
    with pytest.raises(DataError, match=r"has no dataset.json; run `raydd data prepare SOURCE --out"):
        data.load_info(tmp_path)


def test_load_split_checks_the_last_shard(copy):
    """A whole-split read runs the end-of-shard checks of every shard, the last one included:
    here its labels are rewritten (all 0) and its sha256 is stale."""
    manifest = json.loads((copy / "dataset.json").read_text())
    last = manifest["shards"]["train"][-1]["name"]
    import tarfile
    src = copy / last
    members = []
    with tarfile.open(src) as t:
        for m in t.getmembers():
            data_ = t.extractfile(m).read()
            if m.name.endswith(".cls"):
                data_ = b"0"
                m.size = 1
            members.append((m, data_))
    import io
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for m, d in members:
            t.addfile(m, io.BytesIO(d))
    src.write_bytes(buf.getvalue())
    manifest["shards"]["train"][-1]["bytes"] = len(buf.getvalue())
    (copy / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=rf"{last}: sha256 [0-9a-f]{{12}}… does not match dataset.json"):
        data.load_split(copy, "train")
    _, y = data.load_split(copy, "train", verify=False)
    assert (y[-237:] == 0).all()   # the rewrite is real: unverified, it would train on it


@pytest.mark.parametrize("name", ["t.tar; touch PWNED; true", "../x.tar", "a b.tar", "$(id).tar", ""])
def test_shard_names_cannot_inject_commands(copy, tmp_path, name):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    manifest = json.loads((copy / "dataset.json").read_text())
    manifest["shards"]["train"][0]["name"] = name
    (copy / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="shard name .* is invalid; expected letters, digits"):
        data.load_split(f"pipe:cd {cwd} && cat {copy}/{{name}}", "train")
    assert not any(cwd.iterdir())


def test_pipe_names_are_shell_quoted(monkeypatch):
    """A name the pattern allows still reaches the shell quoted; option-like names are refused."""
    from raydd.data import manifest
    assert manifest._join("pipe:cat /d/{name}", "train-000000.tar") == "pipe:cat /d/train-000000.tar"
    monkeypatch.setattr(manifest, "SHARD_NAME", __import__("re").compile(r".+"))
    assert manifest._join("pipe:cat /d/{name}", "a;b") == "pipe:cat /d/'a;b'"
    assert manifest._join("/d/{name}", "a;b") == "/d/a;b"   # no shell: no quoting
    monkeypatch.undo()
    with pytest.raises(DataError, match="shard name '-rf' is invalid"):
        manifest._join("pipe:cat /d/{name}", "-rf")
