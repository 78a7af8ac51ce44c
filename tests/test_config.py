import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from raydd.config import Config, load_config
from raydd.errors import ConfigError
from raydd.rundir import claim
from raydd.errors import RayddError

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.name == path.stem


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config("configs/digits.yaml", ["distill.ipc=6", "distill.lr_img=2",
                                               "evaluate.archs=[mlp, lenet]", "distill.segment=null",
                                               "teachers.resources.cpus=0.5"])
    assert cfg.distill.ipc == 6 and isinstance(cfg.distill.lr_img, float) and cfg.distill.lr_img == 2.0
    assert cfg.evaluate.archs == ["mlp", "lenet"]
    assert cfg.distill.segment is None
    assert cfg.teachers.resources.cpus == 0.5


def test_arch_lr_matches_specs_by_canonical_form():
    cfg = load_config("configs/digits.yaml", ['evaluate.arch_lr={"convnet:width=128": 0.02, mlp: 1}'])
    ev = cfg.evaluate
    assert ev.arch_lr == {"convnet:width=128": 0.02, "mlp": 1.0} and isinstance(ev.arch_lr["mlp"], float)
    assert ev.lr_of("convnet") == 0.02 and ev.lr_of("mlp") == 1.0  # width 128 is convnet's default
    assert ev.lr_of("convnet:width=32") is None and ev.lr_of("lenet") is None


@pytest.mark.parametrize("override, message", [
    (["distill.ipcc=3"], "unknown config key 'distill.ipcc'"),
    (["bogus=1"], "unknown config key 'bogus'"),
    (["distill.ipc=three"], "distill.ipc: expected an integer, got 'three'"),
    (["distill.ipc=2.5"], "distill.ipc: expected an integer"),
    (["distill.dsa=maybe"], "distill.dsa: expected true or false"),
    (["distill.distance=l3"], "distill.distance: 'l3' is not one of"),
    (["distill.ipc=2", "distill.groups=3"], "distill.groups: 3 is invalid; expected at most distill.ipc=2"),
    (["distill.rounds=0"], "distill.rounds: 0 is invalid"),
    (["evaluate.seeds=0"], "evaluate.seeds: 0 is invalid"),
    (["distill.balance=gbm"], "distill.balance: 'gbm' is invalid; expected none, or gbm beside distill.metadd"),
    (["distill.balance=gbm", "distill.metadd.enabled=true", "distill.balance_every=0"],
     "distill.balance_every: 0 is invalid"),
    (["distill.balance=nope"], "distill.balance: 'nope' is not one of"),
    (["distill.method=hmdc", "distill.metadd.enabled=true"],
     "distill.metadd.enabled: true is invalid; expected false: distill.method hmdc does not add MetaDD's term"),
    (["distill.method=hmdc", "distill.metadd.enabled=true", "distill.balance=gbm"], "distill.metadd.enabled"),
    (["distill.method=hmdc", "distill.pool.p_main=0.9"],
     "distill.pool.p_main: 0.9 is invalid; expected 1: distill.method hmdc has no student model pool"),
    (["evaluate.modes=[soft, fuzzy]"], "evaluate.modes: 'fuzzy' is invalid"),
    (["evaluate.modes=[soft,kd]", "evaluate.mode_archs.kd=[resnet18]"],
     "evaluate.mode_archs.kd: ['resnet18'] is invalid; expected at least one of evaluate.archs"),
    (["evaluate.mode_archs.soft=[]"], "evaluate.mode_archs.soft: [] is invalid; expected a non-empty list"),
    (["evaluate.mode_archs.kd=[resnet99]"], "evaluate.mode_archs.kd[0]: unknown model 'resnet99'"),
    (["evaluate.mode_archs.fuzzy=[mlp]"], "unknown config key 'evaluate.mode_archs.fuzzy'"),
    (["evaluate.arch_lr.mlp=0"], "evaluate.arch_lr.mlp: 0.0 is invalid; expected a positive learning rate"),
    (["evaluate.arch_lr.resnet99=0.1"], "evaluate.arch_lr.resnet99: unknown model 'resnet99'"),
    (["evaluate.arch_lr=[mlp]"], "evaluate.arch_lr: expected a mapping"),
    (["evaluate.arch_lr.mlp=0.1", "evaluate.lr_search=[0.1, 0.2]"],
     "evaluate.arch_lr: {'mlp': 0.1} is invalid; expected no per-architecture lr beside an lr_search"),
    (["teachers.resources.gpus=-1"], "teachers.resources.gpus"),
    (["distill=3"], "distill: expected a mapping"),
    (["novalue"], "expected KEY=VALUE"),
])
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("configs/digits.yaml", override)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_resolved_config_round_trips():
    cfg = load_config("configs/fashion_mnist_ipc10.yaml", ["distill.alpha=0.2"])
    assert load_config(None) == Config()
    from raydd.config import from_dict
    assert from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_run_dir_refuses_another_configs_outputs(tmp_path):
    cfg = load_config("configs/digits.yaml")
    claim(cfg, tmp_path, "teachers")
    (tmp_path / "teachers").mkdir()
    # Changing how work is scheduled is fine; changing what the teachers are is not.
    claim(load_config("configs/digits.yaml", ["teachers.resources.cpus=2"]), tmp_path, "teachers")
    with pytest.raises(RayddError, match=r"teachers.epochs \(100 → 7\)"):
        claim(load_config("configs/digits.yaml", ["teachers.epochs=7"]), tmp_path, "distill")
    # The distill section was never used yet, so a new one is accepted and recorded.
    claim(load_config("configs/digits.yaml", ["distill.rounds=5"]), tmp_path, "distill")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["distill"]["rounds"] == 5
    # Evaluation settings may change between evaluations; the recorded distill section stays.
    (tmp_path / "synset").mkdir()
    claim(load_config("configs/digits.yaml", ["distill.rounds=9", "evaluate.seeds=1"]), tmp_path,
                  "evaluate")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["distill"]["rounds"] == 5 and saved["evaluate"]["seeds"] == 1


@pytest.mark.parametrize("override, key", [
    ("distill.lr_img=.inf", "distill.lr_img"), ("distill.lr_net=.nan", "distill.lr_net"),
    ("teachers.momentum=-0.1", "teachers.momentum"), ("teachers.weight_decay=-1e-4", "teachers.weight_decay"),
    ("distill.momentum_img=-0.5", "distill.momentum_img"), ("evaluate.momentum=7", "evaluate.momentum"),
    ("evaluate.weight_decay=-1", "evaluate.weight_decay"), ("ray.num_cpus=-3", "ray.num_cpus"),
    ("evaluate.max_concurrent=0", "evaluate.max_concurrent"), ("evaluate.precision=fp16", "evaluate.precision"),
    ("teachers.precision=bf32", "teachers.precision"), ("distill.precision=half", "distill.precision"),
    ("name=../../..", "name"), ("name=a/b", "name"), ("distill.service.replicas=0", "distill.service.replicas"),
    ("evaluate.hard_cutmix=0", "evaluate.hard_cutmix"),
])
def test_impossible_values_are_refused(override, key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: ") as e:
        load_config("configs/digits.yaml", [override])
    assert "\n" not in str(e.value)


def test_duplicate_and_binary_config_files(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("name: a\ndistill:\n  ipc: 2\n  ipc: 3\n")
    with pytest.raises(ConfigError, match=r"not valid YAML: .*duplicate key 'ipc'") as e:
        load_config(dup)
    assert "\n" not in str(e.value)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(binary)
