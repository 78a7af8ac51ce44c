"""Stacked evaluation trials: members follow their lone trials; nets that would couple are refused."""
import pytest
import torch

from raydd.config import EvalConfig
from raydd.errors import RayddError
from raydd.evaluate.protocol import evaluate_once
from raydd.evaluate.stacked import NotStackable, Stack, evaluate_stacked, stack_refusal, stackable
from raydd.models import build
from raydd.synset import Synset

STRATEGY = "color_crop_cutout_flip_scale_rotate"


def _sets(n_sets, n=20, shape=(1, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Synset(torch.randn(n, *shape, generator=g), torch.arange(10).repeat_interleave(n // 10),
                   soft_labels=torch.randn(n, 10, generator=g), meta={"num_classes": 10}) for _ in range(n_sets)]


def _tests(shape=(1, 8, 8)):
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(300, *shape, generator=g), torch.randint(10, (300,), generator=g)
    return lambda: [(x[i:i + 100], y[i:i + 100]) for i in range(0, 300, 100)]


@pytest.mark.parametrize("arch,mode,soft_loss", [("convnet_bn:width=8", "soft", "l1"), ("convnet:width=8", "hard", "l1"),
                                                 ("mlp", "soft", "kl"), ("lenet", "hard", "l1")])
def test_each_member_follows_its_lone_trial(arch, mode, soft_loss):
    # three members: seeds 0 and 1 on two sets, seed 0 again on a third (same seed, other data)
    sets, seeds = _sets(3), [0, 1, 0]
    ecfg = EvalConfig(archs=[arch], modes=[mode], epochs=6, lr=0.05, batch_size=8, soft_loss=soft_loss,
                      soft_temperature=2.0)
    kw = dict(image_shape=(1, 8, 8), num_classes=10, dsa_strategy=STRATEGY)
    lone = [evaluate_once(arch, mode, s, d, _tests(), ecfg, **kw) for s, d in zip(seeds, sets)]
    stacked = evaluate_stacked(arch, mode, seeds, sets, _tests(), ecfg, **kw)
    for a, b in zip(lone, stacked):
        assert b["stacked"] == 3 and b["epochs"] == 6
        assert b["train_loss_first"] == pytest.approx(a["train_loss_first"], rel=1e-5)
        assert b["train_loss_last"] == pytest.approx(a["train_loss_last"], rel=1e-4, abs=1e-6)
        assert abs(b["test_acc"] - a["test_acc"]) <= 1 / 300 + 1e-9   # one borderline image at most
    # the members are distinct trials, not copies of one
    assert len({round(r["train_loss_last"], 6) for r in stacked}) == 3


def test_the_wide_net_keeps_members_apart_and_refuses_nets_that_mix_them():
    models = [build("convnet_bn:width=8", 1, 10, 8) for _ in range(2)]
    stack = Stack.build(models, torch.randn(4, 1, 8, 8)).train(False)
    x = torch.randn(2, 5, 1, 8, 8)
    with torch.no_grad():
        out = stack(x)
        x2 = x.clone()
        x2[1] += 10.0                                   # member 1's input changes ...
        out2 = stack(x2)
    assert out.shape == (2, 5, 10)
    assert torch.allclose(out[0], models[0].eval()(x[0]), atol=1e-5)
    assert torch.equal(out[0], out2[0]) and not torch.allclose(out[1], out2[1])   # ... member 0's logits do not
    why = stack_refusal("vit_tiny", (1, 8, 8), 10)
    assert why is not None and "widened" in why
    assert stack_refusal("resnet18", (1, 8, 8), 10) is None and stack_refusal("mlp", (1, 8, 8), 10) is None
    with pytest.raises(NotStackable):
        Stack.build([build("vit_tiny", 1, 10, 8) for _ in range(2)], torch.randn(2, 1, 8, 8))


def test_modes_that_train_alone_and_sets_of_different_sizes_are_refused():
    assert stackable("soft", EvalConfig()) and stackable("hard", EvalConfig())
    assert not stackable("hard", EvalConfig(hard_cutmix=1.0)) and not stackable("kd", EvalConfig())
    kw = dict(image_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(RayddError, match="trains alone"):
        evaluate_stacked("mlp", "kd", [0, 1], _sets(2), _tests(), EvalConfig(epochs=1), **kw)
    with pytest.raises(RayddError, match="sets of one size"):
        evaluate_stacked("mlp", "hard", [0, 1], [_sets(1, n=20)[0], _sets(1, n=30)[0]], _tests(),
                         EvalConfig(epochs=1), **kw)


def test_bad_stack_settings_are_refused_before_any_work(tmp_path):
    from raydd.config import from_dict
    from raydd.errors import ConfigError
    from raydd.evaluate import sweep
    with pytest.raises(ConfigError, match=r"evaluate\.stack.*0.*an integer >= 1"):
        from_dict({"name": "x", "evaluate": {"stack": 0}})
    cfg = from_dict({"name": "x", "evaluate": {"stack": 4}})
    with pytest.raises(ConfigError, match=r"evaluate\.stack: 4 with a scheduler or search_alg"):
        sweep(tmp_path / "no-synset", ["mlp"], seeds=1, config=cfg, data=str(tmp_path / "no-data"),
              scheduler=object(), out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
