"""Auxiliary pools (MetaDD): checked before any work, trained with the teacher machinery, refused
when trained for another dataset."""
from __future__ import annotations

import pytest

from raydd.auxiliaries import INDEX, check_auxiliaries, load_auxiliaries, train_auxiliaries
from raydd.config import load_config
from raydd.config.metadd import DEFAULT_AUXILIARIES
from raydd.errors import ConfigError, RayddError
from raydd.io import read_json, write_json

VIT = "vit_apm:depth=1,head_dim=8,heads=2,mlp=16,width=16"


def cfg_for(digits, *sets):
    return load_config("configs/digits.yaml", [f"data.dir={digits}", "teachers.batch_size=256",
                                               "auxiliaries.epochs=1", *sets])


def test_bad_auxiliary_specs_are_refused_in_one_line(digits):
    from raydd.data import load_info
    info = load_info(digits)
    with pytest.raises(ConfigError, match=r"^auxiliaries\.archs\[1\]: .*no spatial feature map") as e:
        check_auxiliaries(cfg_for(digits, "auxiliaries.archs=[lenet, mlp]"), info)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^auxiliaries\.archs\[0\]: unknown model 'lenett'"):
        cfg_for(digits, "auxiliaries.archs=[lenett]")
    assert check_auxiliaries(cfg_for(digits), info) == DEFAULT_AUXILIARIES["digits"]


@pytest.mark.ray
@pytest.mark.slow   # two Ray training tasks: ~40 s on 2 busy cores
def test_pool_trains_resumes_and_refuses_another_dataset(digits, tmp_path, ray_local):
    cfg = cfg_for(digits, f"auxiliaries.archs=[lenet, '{VIT}']")
    recs = train_auxiliaries(cfg, tmp_path, progress=False)
    assert [r["spec"] for r in recs] == ["lenet", VIT] and all(0 < r["test_acc"] <= 1 for r in recs)
    manifest = read_json(tmp_path / "auxiliaries" / INDEX)
    assert manifest["dataset"]["source"] == "digits" and len(manifest["auxiliaries"]) == 2
    assert train_auxiliaries(cfg, tmp_path, progress=False) == recs   # nothing retrained

    from raydd.data import load_info
    info = load_info(digits)
    nets, loaded = load_auxiliaries(cfg, tmp_path, info)
    assert len(nets) == 2 and [r["sha256"] for r in loaded] == [r["sha256"] for r in recs]

    index = tmp_path / "auxiliaries" / "aux-01" / "teachers" / "teachers.json"
    doc = read_json(index)
    write_json(index, {**doc, "dataset": {**doc["dataset"], "source": "fashion-mnist"}})
    with pytest.raises(RayddError, match=r"^auxiliary aux-01 .* was trained for fashion-mnist .* but the data "
                                         r"is digits") as e:
        load_auxiliaries(cfg, tmp_path, info)
    assert "\n" not in str(e.value)


def test_results_table_splits_seen_and_unseen_architectures():
    from raydd.evaluate.metadd_split import split_markdown
    agg = [{"arch": a, "source": "distilled", "mode": "soft", "mean": m, "best": True}
           for a, m in (("lenet", 0.8), ("convnet:width=16", 0.6), ("alexnet", 0.4), ("mlp", 0.2),
                        ("convnet:width=8", 0.9))]
    config = {"data": {"source": "digits"}, "distill": {"metadd": {"enabled": True}},
              "auxiliaries": {"archs": ["lenet", "convnet:width=16"]}, "teachers": {"arch": "convnet:width=8"}}
    archs = ["convnet:width=8", "lenet", "convnet:width=16", "alexnet", "mlp"]
    text = split_markdown(agg, archs, [("distilled", "soft")], config)
    assert "| distilled with: convnet:width=8 | 90.00 (1) |" in text      # the teachers' net is not unseen
    assert "| seen (auxiliaries): lenet, convnet:width=16 | 70.00 (2) |" in text
    assert "| unseen: alexnet, mlp | 30.00 (2) |" in text
    assert "distilled with" not in split_markdown(agg, archs[1:], [("distilled", "soft")], config)
    assert split_markdown(agg, ["lenet"], [("distilled", "soft")], {"distill": {}}) == ""


def test_hmdc_images_are_distilled_with_its_model_pair_not_the_soft_label_teacher():
    from raydd.evaluate.metadd_split import distilled_specs
    hmdc = {"teachers": {"arch": "convnet:width=32"},
            "distill": {"method": "hmdc", "hmdc": {"model1": "convnet:width=32", "model2": "vit_tiny:width=64"}}}
    assert distilled_specs(hmdc) == ["convnet:width=32", "vit_tiny:width=64"]
    apm = {"teachers": {"arch": "convnet:width=32"}, "distill": {"method": "apm", "arch": "convnet_bn:width=32"}}
    assert distilled_specs(apm) == ["convnet:width=32", "convnet_bn:width=32"]
