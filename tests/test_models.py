import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from raydd.errors import RayddError
from raydd.models import StagedNet, available, build, canonical_spec, options, variant
from raydd.models.layers import AvgPool2x2, InstanceNorm, LayerNorm2d, GroupNorm4
from raydd.models.registry import REGISTRY
from raydd.models.timm_nets import fit_patch

torch.set_num_threads(1)

SHAPES = [(1, 8), (1, 28), (3, 32), (3, 64)]   # (channels, size)


def _x(c, s, seed=0):
    return torch.randn(2, c, s, s, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("c,s", SHAPES, ids=[f"{s}x{s}x{c}" for c, s in SHAPES])
@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_architecture_trains_and_exposes_features(name, c, s):
    torch.manual_seed(0)
    net = build(name, c, 10, s)
    assert isinstance(net, StagedNet) and net.spec == name
    assert net.stage_names[-2:] == ["pool", "fc"]
    x = _x(c, s).requires_grad_(True)
    logits = net(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([1, 7])).backward()
    # every parameter takes part and the input gradient is alive (no map shrank to a constant)
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, missing
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

    net.eval()
    with torch.no_grad():
        feats = net.features(x, ["feature_map", "embedding", "logits"])
        assert torch.allclose(feats["logits"], net(x), atol=1e-5)
    assert feats["embedding"].shape == (2, net.embedding_dim)
    fmap = feats["feature_map"]
    expected_dims = {"mlp": 2, "vit_tiny": 3, "vit_apm": 3}.get(name, 4)
    assert fmap.dim() == expected_dims and fmap.shape[0] == 2


@pytest.mark.parametrize("spec", ["convnet", "lenet", "alexnet", "vgg11_bn", "resnet18",
                                  "vit_tiny:depth=2", "mobilenetv2", "timm:convnext_atto"])
def test_run_split_anywhere_composes_to_forward(spec):
    net = build(spec, 3, 5, 16).eval()
    x = _x(3, 16)
    with torch.no_grad():
        full = net(x)
        for stop in net.stage_names[1:]:
            front = net.run(x, stop=stop)
            assert torch.allclose(net.run(front, start=stop), full, atol=1e-5), stop
        # a middle range of stages run alone equals that part of the chain
        names = net.stage_names
        a, b = names[1], names[-2]
        mid = net.run(net.run(x, stop=a), start=a, stop=b)
        assert torch.allclose(mid, net.features(x, names[-3])[names[-3]], atol=1e-5)


def test_features_named_stages_aliases_and_early_stop():
    net = build("convnet:width=16", 3, 10, 32).eval()
    x = _x(3, 32)
    out = net.features(x, ["block1", "feature_map", "block3"])
    assert list(out) == ["block1", "feature_map", "block3"]
    assert out["block1"].shape == (2, 16, 16, 16)
    assert torch.equal(out["feature_map"], out["block3"])
    assert net.features(x, "embedding")["embedding"].shape == (2, 16 * 4 * 4)

    class Boom(nn.Module):
        def forward(self, x):
            raise AssertionError("fc must not run for an early tap")
    net.stages["fc"] = Boom()
    assert net.features(x, "block2")["block2"].shape == (2, 16, 8, 8)

    with pytest.raises(RayddError, match="unknown feature tap 'block9'.*feature_map"):
        net.features(x, "block9")
    with pytest.raises(RayddError, match="unknown start stage"):
        net.run(x, start="nope")
    with pytest.raises(RayddError, match="comes after"):
        net.run(x, start="fc", stop="block1")


def test_vit_and_timm_taps():
    vit = build("vit_tiny:depth=3", 3, 10, 32).eval()
    assert vit.stage_names == ["embed", "block1", "block2", "block3", "norm", "pool", "fc"]
    f = vit.features(_x(3, 32), ["embed", "block2", "embedding"])
    assert f["embed"].shape == (2, 65, 192) and f["block2"].shape == (2, 65, 192)
    assert f["embedding"].shape == (2, 192)
    res = build("resnet18", 3, 10, 32)
    assert res.stage_names == ["stem", "layer1", "layer2", "layer3", "layer4_0", "layer4_1", "pool", "fc"]
    f = res.eval().features(_x(3, 32), ["stem", "layer2", "feature_map"])
    assert f["stem"].shape == (2, 64, 32, 32) and f["layer2"].shape == (2, 128, 16, 16)
    assert f["feature_map"].shape == (2, 512, 4, 4)


@pytest.mark.parametrize("spec,size,split,shape", [
    ("convnet:width=512", 32, "block3", (512, 4, 4)),
    ("resnet18", 32, "layer4_0", (512, 4, 4)),
    ("vgg11", 32, "conv5", (512, 4, 4)),
    ("vgg11_bn", 28, "conv5", (512, 4, 4)),
    ("convnet_d4:width=512", 64, "block4", (512, 4, 4)),
    ("vgg11", 64, "conv6", (512, 4, 4)),
    ("resnet18", 64, "layer3", (256, 16, 16)),
])
def test_elf_split_points(spec, size, split, shape):
    net = build(spec, 3, 10, size).eval()
    assert net.elf_split == split
    x = _x(3, size)
    with torch.no_grad():
        front = net.front(x)
        assert front.shape == (2, *shape)
        assert torch.allclose(net.rear(front), net(x), atol=1e-5)


def test_no_elf_split_for_mlp():
    net = build("mlp", 1, 10, 8)
    assert net.elf_split is None
    with pytest.raises(RayddError, match="no ELF split"):
        net.front(_x(1, 8))


def test_convnet_field_conventions():
    net = build("convnet", 1, 10, 28)
    conv = net.stages["block1"][0]
    assert conv.padding == (3, 3)          # 28 px acts like 32 px
    assert net.config["depth"] == 3 and net.stages["fc"].in_features == 128 * 4 * 4
    assert build("convnet", 3, 10, 64).config["depth"] == 4
    assert build("convnet_d4", 1, 10, 8).config["depth"] == 3   # capped: last conv sees 2x2
    assert build("convnet:depth=5", 1, 10, 16).config["depth"] == 4
    assert build("convnet:pool=none,depth=2,width=8", 3, 10, 8).stages["fc"].in_features == 8 * 8 * 8
    assert build("convnet:pool=none,depth=2,width=8", 1, 10, 8).stages["fc"].in_features == 8 * 12 * 12

    norms = {"convnet": InstanceNorm, "convnet_bn": nn.BatchNorm2d, "convnet_ln": LayerNorm2d,
             "convnet_gn": GroupNorm4}
    for spec, cls in norms.items():
        layer = build(spec, 3, 10, 32).stages["block2"][1]
        assert type(layer) is cls, spec
    inst = build("convnet:width=8", 3, 10, 32).stages["block1"][1]
    assert inst.num_groups == 8 and inst.affine
    assert build("convnet_gn:width=8", 3, 10, 32).stages["block1"][1].num_groups == 4
    assert build("convnet_ln:width=8", 3, 10, 32).stages["block1"][1].num_groups == 1
    nn_block = build("convnet_nn", 3, 10, 32).stages["block1"]
    assert [type(m) for m in nn_block] == [nn.Conv2d, nn.ReLU, AvgPool2x2]   # an nn.AvgPool2d(2, 2), faster
    acts = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "leakyrelu": nn.LeakyReLU, "swish": nn.SiLU,
            "gelu": nn.GELU}
    for act, cls in acts.items():
        assert type(build(f"convnet:act={act}", 3, 10, 32).stages["block1"][2]) is cls
    assert type(build("convnet:pool=max", 3, 10, 32).stages["block1"][3]) is nn.MaxPool2d
    with pytest.raises(RayddError, match="divisible by 4"):
        build("convnet_gn:width=6", 3, 10, 32)


# Parameter counts of the reference architectures, each counted by instantiating the official
# class (DC code networks.py ConvNet / ResNet18 / ResNet18BN, DD_APM utils.py get_network's ViT).
REFERENCE_COUNTS = [
    ("convnet", 3, 32, 320_010),      # DC ConvNet (width 128, depth 3, instancenorm), 32x32x3
    ("convnet", 1, 28, 317_706),      # DC ConvNet, 28x28x1 (first conv padded by 3 -> 32x32 maps)
    ("convnet", 1, 8, 298_506),       # DC ConvNet, 8x8x1 (padded by 3 -> 12x12 maps)
    ("convnet_d4", 3, 64, 467_850),   # DC ConvNetD4, 64x64x3
    ("resnet18_in", 3, 32, 11_173_962),   # DC code's ResNet18 (instance norm), 32x32x3
    ("resnet18_bn", 3, 32, 11_173_962),   # DC code's ResNet18BN, 32x32x3
    ("resnet18_in", 1, 28, 11_172_810),   # DC code's ResNet18, 28x28x1
    ("vit_apm", 3, 32, 3_221_514),        # DD_APM's ViT (patch 4, dim 512, depth 3, 4 heads), 32x32x3
]


@pytest.mark.parametrize("spec,c,s,count", REFERENCE_COUNTS, ids=[f"{r[0]}-{r[2]}x{r[1]}" for r in REFERENCE_COUNTS])
def test_field_architectures_have_the_reference_parameter_count(spec, c, s, count):
    assert sum(p.numel() for p in build(spec, c, 10, s).parameters()) == count


def test_convnet_first_conv_padding_follows_the_dc_code():
    # grey inputs are padded by 3 at every size (8 px: 12->6->3 maps, not 8->4->2), colour by 1
    grey = build("convnet:width=8", 1, 10, 8).eval()
    assert grey.stages["block1"][0].padding == (3, 3) and grey.config["first_pad"] == 3
    f = grey.features(_x(1, 8), ["block1", "block2", "block3"])
    assert [f[k].shape[-1] for k in ("block1", "block2", "block3")] == [6, 3, 1]
    colour = build("convnet:width=8", 3, 10, 8)
    assert colour.stages["block1"][0].padding == (1, 1) and colour.config["depth"] == 3
    assert build("convnet", 1, 10, 32).stages["block1"][0].padding == (3, 3)
    assert build("convnet", 3, 10, 28).stages["block1"][0].padding == (3, 3)   # 28 px acts like 32
    assert build("convnet", 3, 10, 32).stages["block1"][0].padding == (1, 1)
    assert build("convnet", 3, 10, 64).config["depth"] == 4


def test_dc_resnet18_variants():
    net = build("resnet18_in", 3, 10, 32)
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(type(m) is InstanceNorm and m.num_groups == m.num_channels for m in norms)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    # PyTorch default init as in the DC code: no residual branch starts zeroed (timm's does)
    assert all(bool((blk.bn2.weight == 1).all()) for blk in net.stages["layer1"])
    assert all(bool((blk.bn2.weight == 0).all()) for blk in build("resnet18", 3, 10, 32).stages["layer1"])
    assert net.spec == "resnet18_in" and net.elf_split == "layer4_0"
    assert net.eval().features(_x(3, 32), "feature_map")["feature_map"].shape == (2, 512, 4, 4)
    bn = build("resnet18_bn", 3, 10, 32)
    assert isinstance(bn.stages["stem"][1], nn.BatchNorm2d) and bn.config["init"] == "torch"
    assert variant("resnet18_in", activation="swish") == "resnet18:act=swish,init=torch,norm=instance"


def test_vit_apm_structure():
    vit = build("vit_apm", 3, 10, 32).eval()
    assert vit.stage_names == ["embed", "block1", "block2", "block3", "norm", "pool", "fc"]
    assert vit.config["patch"] == 4 and vit.config["tokens"] == 64
    f = vit.features(_x(3, 32), ["embed", "embedding"])
    assert f["embed"].shape == (2, 65, 512) and f["embedding"].shape == (2, 512)
    attn = vit.stages["block1"].attn
    assert attn.qkv.bias is None and attn.qkv.out_features == 3 * 4 * 64
    assert build("vit_apm", 1, 10, 8).config["tokens"] == 4
    assert build("vit_apm:patch=2,depth=1", 1, 10, 8).config["tokens"] == 16
    small = build("vit_apm:width=32,heads=2,head_dim=8,mlp=16,depth=1", 3, 10, 16)
    assert small.stages["block1"].attn.qkv.out_features == 3 * 2 * 8
    with pytest.raises(RayddError, match="patch=3 does not divide"):
        build("vit_apm:patch=3", 3, 10, 32)
    # dropout 0.1: training-mode outputs vary, eval-mode outputs do not
    x = _x(3, 32)
    with torch.no_grad():
        assert torch.equal(vit(x), vit(x))
        vit.train()
        assert not torch.equal(vit(x), vit(x))


def test_small_image_adaptations():
    # timm nets: CIFAR stem, and no stride below 4 px so the last map is at least 2x2
    res = build("resnet50", 1, 10, 8)
    stem_conv = res.stages["stem"][0]
    assert stem_conv.kernel_size == (3, 3) and stem_conv.stride == (1, 1)
    assert res.config["final_map"] == 2
    assert build("mobilenetv2", 3, 10, 32).config["final_map"] == 4
    assert build("vgg11", 1, 10, 8).eval().features(_x(1, 8), "conv5")["conv5"].shape[-1] == 2
    assert [fit_patch(s) for s in (8, 28, 32, 64)] == [2, 4, 4, 8]
    assert build("vit_tiny:depth=1", 1, 10, 28).config["tokens"] == 49
    with pytest.raises(RayddError, match="patch=3 does not divide"):
        build("vit_tiny:patch=3", 3, 10, 32)
    with pytest.raises(RayddError, match="cannot run on 4x4"):
        build("alexnet", 3, 10, 4)


def test_norm_act_options_on_timm_families():
    net = build("resnet18:norm=instance,act=swish", 3, 10, 16)
    assert net.spec == "resnet18:act=swish,norm=instance"
    types = {type(m) for m in net.modules()}
    assert InstanceNorm in types and nn.SiLU in types and nn.BatchNorm2d not in types
    vgg = build("vgg11_timm:norm=none", 3, 10, 16)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in vgg.modules())
    assert sum(p.numel() for p in vgg.parameters()) < 10_000_000   # timm's 4096-wide head is gone


def test_spec_parsing_and_canonical_form():
    assert canonical_spec("convnet:width=32,norm=batchnorm,act=relu") == "convnet:norm=batch,width=32"
    assert canonical_spec(" convnet_bn : width=32 , norm=batch ") == "convnet_bn:width=32"
    assert canonical_spec("timm:resnet18:drop_rate=0.1,resize=auto") == "timm:resnet18:drop_rate=0.1"
    assert build("convnet:pool=maxpooling,width=8", 3, 10, 16).spec == "convnet:pool=max,width=8"
    for bad, pattern in [("convnet:width", "not key=value"), ("convnet:width=8,width=9", "given twice"),
                         ("convnet:width=abc", "width='abc' is not an integer"),
                         ("convnet:width=true", "is not an integer"),
                         ("convnet:norm=weird", "not one of instance, batch, layer, group, none"),
                         ("", "bad model spec")]:
        with pytest.raises(RayddError, match=pattern):
            build(bad, 3, 10, 32)
    with pytest.raises(RayddError, match="image_size=0"):
        build("convnet", 3, 10, 0)


def test_unknown_architecture_is_one_clear_line():
    with pytest.raises(RayddError) as err:
        build("resnet19", 3, 10, 32)
    msg = str(err.value)
    assert "\n" not in msg and "'resnet19'" in msg and "resnet18" in msg and "timm:<" in msg
    with pytest.raises(RayddError,
                       match=r"unknown option 'widht' \(valid options: width, depth, norm, act, pool\)"):
        build("convnet:widht=3", 3, 10, 32)
    with pytest.raises(RayddError, match="valid options: none"):
        build("lenet:width=3", 3, 10, 32)


def test_variant():
    assert variant("convnet") == "convnet"
    assert variant("convnet_bn", activation="swish") == "convnet:act=swish,norm=batch"
    assert variant("convnet:width=32", norm="layernorm", pool="maxpooling") == \
        "convnet:norm=layer,pool=max,width=32"
    assert variant("convnet_d4", norm="instance") == "convnet:depth=4"
    assert variant("vgg11_bn", activation="leakyrelu") == "vgg11:act=leakyrelu,norm=batch"
    assert variant("resnet18", norm="instance") == "resnet18:norm=instance"
    net = build(variant("convnet:width=8", activation="sigmoid", norm="group"), 3, 10, 16)
    assert type(net.stages["block1"][2]) is nn.Sigmoid and type(net.stages["block1"][1]) is GroupNorm4
    with pytest.raises(RayddError, match="'mlp' has no norm option"):
        variant("mlp", norm="batch")
    with pytest.raises(RayddError, match="no model-pool variants"):
        variant("timm:resnet18", activation="relu")
    with pytest.raises(RayddError, match="not one of"):
        variant("convnet", activation="tanh")


def test_generic_timm_rule_builds_and_trains():
    net = build("timm:efficientnet_b0", 1, 10, 8)
    assert net.stage_names == ["body", "pool", "fc"] and net.spec == "timm:efficientnet_b0"
    x = _x(1, 8).requires_grad_(True)
    F.cross_entropy(net(x), torch.tensor([0, 3])).backward()
    assert x.grad.abs().sum() > 0
    assert net.eval().features(x, "embedding")["embedding"].shape == (2, net.embedding_dim)

    # too small for convnext's stride-32 body: up-sampled to the smallest size that runs ...
    up = build("timm:convnext_atto", 1, 10, 8)
    assert up.stage_names[0] == "resize" and up.config["input_size"] == 32
    assert up(_x(1, 8)).shape == (2, 10)
    # ... or refused, with a one-line reason
    with pytest.raises(RayddError, match=r"timm model convnext_atto cannot run on 8x8 inputs: .*resize"):
        build("timm:convnext_atto:resize=none", 1, 10, 8)


def test_generic_timm_rule_refusals():
    with pytest.raises(RayddError, match="no single classifier layer"):
        build("timm:levit_128s", 3, 10, 32)           # distilled two-head model
    with pytest.raises(RayddError, match=r"unknown timm model 'resnet18x' \(did you mean resnet18"):
        build("timm:resnet18x", 3, 10, 32)
    with pytest.raises(RayddError, match="never downloads"):
        build("timm:resnet18:pretrained=true", 3, 10, 32)
    with pytest.raises(RayddError, match="rejected its arguments.*'foo'"):
        build("timm:resnet18:foo=1", 3, 10, 32)


def test_timm_state_dict_has_no_duplicates_and_round_trips(tmp_path):
    from raydd.io import load_tensors, save_tensors

    for spec in ("timm:convnext_atto", "vit_tiny:depth=2"):
        net = build(spec, 3, 10, 32).eval()
        path = tmp_path / "w.safetensors"
        save_tensors(path, {k: v.contiguous() for k, v in net.state_dict().items()})
        other = build(spec, 3, 10, 32).eval()
        other.load_state_dict(load_tensors(path))
        x = _x(3, 32)
        with torch.no_grad():
            assert torch.allclose(net(x), other(x), atol=1e-5)


def test_available_lists_every_name_once():
    entries = available()
    names = [n for n, _ in entries]
    assert names[:-1] == list(REGISTRY) and names[-1] == "timm:<name>"
    assert {"convnet", "convnet_d3", "convnet_d4", "mlp", "lenet", "alexnet", "vgg11", "vgg11_bn",
            "resnet18", "resnet18_in", "resnet18_bn", "resnet34", "resnet50", "vit_apm", "vit_tiny",
            "mobilenetv2"} <= set(names)
    assert all(desc and "\n" not in desc for _, desc in entries)


def test_options_describe_defaults_of_presets():
    conv = dict(options("convnet_bn"))
    assert list(conv) == ["width", "depth", "norm", "act", "pool"]
    assert "(default batch)" in conv["norm"] and "(default 128)" in conv["width"]
    assert options("lenet") == []
    with pytest.raises(RayddError, match="unknown model"):
        options("nope")


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 3, 6, 10), (2, 3, 7, 6)])
def test_fast_avg_pool_equals_torch_with_first_and_second_derivatives(shape):
    from raydd.models.layers import AvgPool2x2
    pool = AvgPool2x2()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(pool(x), F.avg_pool2d(x, 2, 2), atol=1e-12)
    assert torch.autograd.gradcheck(pool, (x,)) and torch.autograd.gradgradcheck(pool, (x,))
    g = torch.randn_like(F.avg_pool2d(x, 2))
    mine, = torch.autograd.grad(pool(x), x, g)
    ref, = torch.autograd.grad(F.avg_pool2d(x, 2, 2), x, g)
    assert torch.allclose(mine, ref, atol=1e-12)
    # a stacked ensemble (vmap) goes through it, and the ConvNet uses it
    xs = torch.randn(4, *shape, dtype=torch.float64)
    assert torch.allclose(torch.func.vmap(pool)(xs), F.avg_pool2d(xs.flatten(0, 1), 2).unflatten(0, (4, shape[0])))
    assert isinstance(build("convnet", 1, 10, 28).stages.block1[-1], AvgPool2x2)
    cl = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    assert torch.allclose(pool(cl), F.avg_pool2d(cl, 2))
