"""Durability and bounded waits: file modes and synced renames, the trial journal, Ray's connect deadline."""
import os
import socket
import time
from pathlib import Path

import pytest
import torch

from raydd import io as rio
from raydd.errors import RayddError


def test_outputs_are_world_readable_as_the_umask_allows(tmp_path):
    rio.save_tensors(tmp_path / "a.safetensors", {"x": torch.zeros(2)})  # safetensors recreates its file
    rio.write_json(tmp_path / "b.json", {"a": 1})
    want = 0o666 & ~rio._UMASK
    assert want & 0o044  # the suite runs under a umask that lets others read
    for name in ("a.safetensors", "b.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == want, name


def test_a_rename_is_made_durable_by_syncing_its_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real(fd)
    monkeypatch.setattr(os, "fsync", spy)
    rio.write_text(tmp_path / "sub" / "f.txt", "x")
    assert synced[-1] == str((tmp_path / "sub").resolve())  # the directory, after the file itself
    assert any(p.startswith(str(tmp_path / "sub" / ".f.txt.")) for p in synced[:-1])


def test_the_trial_journal_skips_a_line_torn_by_a_crash(tmp_path):
    from raydd.evaluate.journal import append_journal, read_journal
    from raydd.evaluate.sweep import _reusable
    j = tmp_path / "trials.jsonl"
    append_journal(j, {"key": "k1", "status": "ok", "test_acc": 0.5})
    append_journal(j, {"key": "k2", "status": "error"})
    with open(j, "a") as f:
        f.write('{"key": "k3", "status": "o')  # the driver died mid-append
    assert [r["key"] for r in read_journal(j)] == ["k1", "k2"]
    append_journal(j, {"key": "k4", "status": "ok"})  # the next driver goes on after the torn line
    assert [r["key"] for r in read_journal(j)] == ["k1", "k2", "k4"]
    assert j.read_text().count("\n") == 4  # one line each, the torn one included; no blank lines
    assert set(_reusable(tmp_path / "results.json", j)) == {"k1", "k4"}  # only finished trials are reused


def test_synset_paths_with_braces_survive_the_per_seed_templates(tmp_path, digits):
    from raydd.config import EvalConfig, Resources
    from raydd.data import load_info, sample_per_class
    from raydd.evaluate.sources import prepare_sources
    from raydd.synset import Synset, load_synset, save_synset
    x, y = sample_per_class(load_info(digits), "train", 1, seed=0)
    syn_dir = save_synset(tmp_path / "syn{x}", Synset(x, y, meta={"num_classes": 10}))
    out = tmp_path / "eval{seed}"
    prep = prepare_sources(syn_dir, digits, EvalConfig(modes=["hard"]), [0], ["random"], None, "", out,
                           Resources(cpus=1), "cpu", False, None, None)
    assert prep.sources["distilled"]["synset"].format(seed=3) == str(syn_dir.resolve())
    random_dir = prep.sources["random"]["synset"].format(seed=0)
    assert random_dir == str((out / "random" / "seed-0").resolve())
    assert load_synset(random_dir).labels.numel() == 10


def test_the_connect_deadline_interrupts_a_connect_that_retries_forever(monkeypatch):
    import ray

    from raydd import raycluster
    from raydd.config import RayConfig

    def retrying_forever(*args, **kwargs):  # Ray's connect loop retries on every Exception
        while True:
            try:
                time.sleep(0.05)
            except Exception:
                pass
    monkeypatch.setattr(ray, "init", retrying_forever)
    monkeypatch.setattr(raycluster, "CONNECT_TIMEOUT_S", 0.5)
    monkeypatch.setattr(raycluster, "_probe", lambda address: None)
    t0 = time.time()
    with pytest.raises(RayddError, match=r"ray.address='10.0.0.1:6379': no Ray cluster answered within 0.5 s"):
        raycluster.init_ray(RayConfig(address="10.0.0.1:6379"))
    assert time.time() - t0 < 5


def test_an_address_where_nothing_listens_is_refused_at_once():
    from raydd.raycluster import _probe
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    with pytest.raises(RayddError, match=rf"ray.address='127.0.0.1:{port}': connection refused"):
        _probe(f"127.0.0.1:{port}")
    assert time.time() - t0 < 5
    _probe("auto")  # left to Ray
