"""MetaDD term: the two-phase (service) gradient equals one-shot double backprop, CAM and terms."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from raydd.errors import ConfigError, RayddError
from raydd.methods import LOSS_TERMS, Services
from raydd.methods.metadd import CamNet, LocalAuxiliaries, MetaDDOptions, MetaDDTerm
from raydd.models import build
from raydd.models.vit import class_token_attention
from raydd.services import LocalService

torch.set_num_threads(1)

CLASSES = 3
VIT_APM = "vit_apm:width=16,depth=2,heads=2,head_dim=8,mlp=16"
VIT_TINY = "vit_tiny:width=16,depth=2,heads=2"
CNNS = ["convnet:width=8", "convnet:act=swish,pool=max,width=6"]


def nets(specs, seed=0):
    torch.manual_seed(seed)
    return [build(s, 1, CLASSES, 8).double().eval() for s in specs]


def batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(CLASSES, (n,), generator=g)


def one_shot(auxes, backbone, x, y, o: MetaDDOptions):
    """Eq. 4-12 written out for local nets: one graph, CAMs by autograd.grad(create_graph=True)."""
    t = backbone(x)
    ce_all = kl_all = pos_all = 0
    norms = []
    for net in auxes:
        cn = CamNet(net)   # only for its choice of layer
        if cn.vit:
            h = net.run(x, stop=cn.last_block)
            w = class_token_attention(net.stages[cn.last_block], h).sum(1)[:, 1:]
            feat = net.stages[cn.last_block](h)
            logits = net.run(feat, start=cn.after)
        else:
            feat = net.run(x, stop=cn.after)
            logits = net.run(feat, start=cn.after)
        ce = F.cross_entropy(logits, y, reduction="none")
        kl = F.kl_div(F.log_softmax(t, 1), F.log_softmax(logits, 1), log_target=True, reduction="none").sum(1)
        (g,) = torch.autograd.grad((ce + kl).sum(), feat, create_graph=True)
        if cn.vit:
            cam = (w * (feat[:, 1:] @ g.sum(1)[:, :, None])[..., 0]).reshape(len(x), cn.grid, cn.grid)
        else:
            cam = torch.einsum("bk,bkij->bij", g.mean((2, 3)), feat)
        cam = F.interpolate(cam[:, None], size=o.cam_size, mode="bilinear")[:, 0]
        flat = cam.flatten(1)
        lo, hi = flat.min(1).values, flat.max(1).values
        norms.append((cam - lo[:, None, None]) / (hi - lo + 1e-6)[:, None, None])
        ce_all, kl_all = ce_all + ce, kl_all + kl
        pos_all = pos_all + F.relu(cam).flatten(1).mean(1)
    stack = torch.stack(norms)
    var = ((stack - stack.mean(0)) ** 2).mean(0).flatten(1).mean(1)
    sign = -1 if o.pos_sign == "maximize" else 1
    per_image = o.ce * ce_all + o.kl * kl_all + o.var * var + o.pos * sign * pos_all
    return per_image.mean()


def services_for(auxes, backbone):
    return Services(teachers=LocalService([backbone]), auxiliaries=LocalAuxiliaries(auxes))


@pytest.mark.parametrize("specs", [CNNS, [VIT_APM, "convnet:width=8"], [VIT_TINY, VIT_APM]],
                         ids=["cnns", "vit_apm+cnn", "vits"])
@pytest.mark.parametrize("pos_sign", ["maximize", "minimize"])
def test_two_phase_gradient_equals_double_backprop(specs, pos_sign):
    auxes = nets(specs)
    (backbone,) = nets(["convnet:width=4,act=sigmoid"], seed=5)
    x, y = batch()
    opts = MetaDDOptions(ce=0.7, kl=1.3, var=5.0, pos=2.0, pos_sign=pos_sign, cam_size=6)
    term = MetaDDTerm(opts, segment=4)   # two segments of a batch of 6
    loss, grad = term.loss_and_grad(x, y, services_for(auxes, backbone), teacher=0)

    xr = x.clone().requires_grad_(True)
    ref = one_shot(auxes, backbone, xr, y, opts)
    (gref,) = torch.autograd.grad(ref, xr)
    assert loss == pytest.approx(ref.item(), rel=1e-9)
    assert grad.norm() > 0 and term.stats["var"] > 0
    torch.testing.assert_close(grad, gref, rtol=1e-5, atol=1e-9)


def test_double_backprop_matters():
    """Without the CAM's own gradient (detached CAMs) the var gradient would be zero."""
    auxes = nets(CNNS)
    (backbone,) = nets(["convnet:width=4"], seed=5)
    x, y = batch()
    _, grad = MetaDDTerm(MetaDDOptions(ce=0, kl=0, var=1, pos=0)).loss_and_grad(x, y, services_for(auxes, backbone))
    assert grad.abs().max() > 1e-8


def test_cam_keeps_negative_values():
    aux = LocalAuxiliaries(nets([CNNS[0], VIT_APM]))
    x, y = batch(8)
    t = torch.randn(8, CLASSES, dtype=torch.float64)
    for out in aux.cams(x, y, t, [0, 1], cam_size=5):
        assert (out["cam"] < 0).any() and (out["cam"] > 0).any()       # no ReLU
        flat = out["cam_norm"].flatten(1)
        torch.testing.assert_close(flat.min(1).values, torch.zeros(8, dtype=flat.dtype))
        assert (flat.max(1).values > 0.99).all()
        assert out["cam"].shape == (8, 5, 5) and out["ce"].shape == (8,)


def test_variance_is_zero_for_identical_copies():
    (net,) = nets(["convnet:width=8"])
    (backbone,) = nets(["convnet:width=4"], seed=5)
    x, y = batch()
    opts = MetaDDOptions(ce=0, kl=0, var=1, pos=0)
    term = MetaDDTerm(opts)
    loss, grad = term.loss_and_grad(x, y, services_for([net, copy.deepcopy(net)], backbone))
    assert loss == 0 and term.stats["var"] == 0
    assert grad.abs().max() == 0
    other = nets(["convnet:width=8"], seed=3)[0]
    loss, _ = term.loss_and_grad(x, y, services_for([net, other], backbone))
    assert loss > 0


@pytest.mark.parametrize("on", ["ce", "kl", "var", "pos"])
def test_weights_turn_terms_off(on):
    auxes = nets(CNNS)
    (backbone,) = nets(["convnet:width=4"], seed=5)
    x, y = batch()
    opts = MetaDDOptions(**{k: (1.0 if k == on else 0.0) for k in ("ce", "kl", "var", "pos")})
    term = MetaDDTerm(opts)
    loss, grad = term.loss_and_grad(x, y, services_for(auxes, backbone))
    assert loss == pytest.approx(term.stats[on]) and loss != 0
    xr = x.clone().requires_grad_(True)
    (gref,) = torch.autograd.grad(one_shot(auxes, backbone, xr, y, opts), xr)
    torch.testing.assert_close(grad, gref, rtol=1e-5, atol=1e-9)


def test_all_weights_zero_calls_no_service():
    class Refuse:
        num_models = 2

        def __getattr__(self, name):
            raise AssertionError("service called")

    x, y = batch()
    term = MetaDDTerm(MetaDDOptions(ce=0, kl=0, var=0, pos=0))
    loss, grad = term.loss_and_grad(x, y, Services(teachers=Refuse(), auxiliaries=Refuse()))
    assert loss == 0 and not grad.any()


def test_cam_layer_per_family():
    assert CamNet(build("convnet:width=8", 1, 3, 8)).stage == "block2"     # block3's map is 1x1
    assert CamNet(build("convnet:width=8", 3, 3, 32)).stage == "block3"    # the pool's input
    assert CamNet(build("resnet18", 3, 3, 32)).stage.startswith("layer4_")
    vit = CamNet(build(VIT_APM, 1, 3, 8))
    assert vit.vit and vit.last_block == "block2" and vit.grid == 2
    with pytest.raises(RayddError, match="no spatial feature map"):
        CamNet(build("mlp", 1, 3, 8))


@pytest.mark.parametrize("spec", [VIT_APM, VIT_TINY])
def test_class_token_attention_reproduces_the_block(spec):
    (net,) = nets([spec])
    block = net.stages["block1"]
    tokens = net.run(batch(3)[0], stop="block1")
    w = class_token_attention(block, tokens)                       # B × heads × N
    assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)))
    attn, h = block.attn, block.norm1(tokens)
    b, n, _ = h.shape
    v = attn.qkv(h).reshape(b, n, 3, w.shape[1], -1)[:, :, 2].transpose(1, 2)   # B × heads × N × hd
    cls = (w[:, :, None] @ v)[:, :, 0].reshape(b, -1)
    proj = attn.out if hasattr(attn, "out") else attn.proj
    torch.testing.assert_close(proj(cls), attn(h)[:, 0])


def test_options_are_checked_and_the_term_is_registered():
    assert LOSS_TERMS["metadd"] is MetaDDTerm
    with pytest.raises(ConfigError, match="pos_sign"):
        MetaDDOptions(pos_sign="up")
    with pytest.raises(ConfigError, match="distill.metadd.var"):
        MetaDDOptions(var=-1)
    with pytest.raises(RayddError, match="auxiliary service"):
        MetaDDTerm().loss_and_grad(*batch(), Services(teachers=None))


# ------------------------------------------------------------------------------- APM + MetaDD

def apm_group(metadd, seed=0, **kw):
    from raydd.config import DistillConfig
    from raydd.methods.apm import APMGroup
    cfg = DistillConfig(ipc=1, rounds=6, student_epochs=2, checkpoints=1, student_batch=8, refresh_every=3,
                        lr_net=0.05, lr_img=0.5, batch_size=4, metadd=metadd, **kw)
    x, y = batch(6, seed=4)
    return APMGroup(cfg, x.float(), y, student_spec="convnet:width=4", in_channels=1, num_classes=CLASSES,
                    image_size=8, seed=seed)


def apm_services():
    torch.manual_seed(9)
    teachers = LocalService([build("convnet:width=4", 1, CLASSES, 8) for _ in range(2)])
    return Services(teachers=teachers, auxiliaries=LocalAuxiliaries([n.float() for n in nets(CNNS[:1] + [VIT_APM])]))


def test_apm_adds_the_metadd_gradient_and_logs_each_term():
    from raydd.config.metadd import MetaDDConfig
    from raydd.methods.apm import image_loss_and_grad
    section = MetaDDConfig(enabled=True, var=3.0, cam_size=4)
    plain, with_aux = apm_group(MetaDDConfig()), apm_group(section)
    services = apm_services()
    u0 = with_aux.images.clone()
    a, b = plain.step(services), with_aux.step(services)
    assert "metadd" not in a and b["teacher"] == a["teacher"]
    assert set(b["metadd"]) == {"total", "ce", "kl", "var", "pos", "grad_norm"} and b["seconds"]["auxiliaries"] > 0
    assert b["loss_all"] == pytest.approx(b["loss"] + b["metadd"]["total"])
    # the same draws (mini-batch, teacher, student): the update differs by lr × the MetaDD gradient
    idx = (plain.momentum != 0).flatten(1).any(1)
    _, g_aux = MetaDDTerm(MetaDDOptions.from_config(section)).loss_and_grad(
        u0[idx], with_aux.labels[idx], services, teacher=b["teacher"])
    assert g_aux.norm() == pytest.approx(b["metadd"]["grad_norm"], rel=1e-5)
    torch.testing.assert_close(with_aux.images[idx], plain.images[idx] - 0.5 * g_aux, rtol=1e-4, atol=1e-6)
    _, g_dd = image_loss_and_grad(u0[idx], with_aux.labels[idx], plain.student, plain.checkpoints,
                                  services.teachers, a["teacher"])
    assert b["grad_norm_dd"] == pytest.approx(float(g_dd.norm()), rel=1e-5)


def test_apm_with_metadd_resumes_exactly(tmp_path):
    from raydd.config.metadd import MetaDDConfig
    from raydd.io import load_tensors, save_tensors
    section = MetaDDConfig(enabled=True, cam_size=4)
    services = apm_services()
    straight = apm_group(section)
    for _ in range(4):
        straight.step(services)
    first = apm_group(section)
    for _ in range(2):
        first.step(services)
    save_tensors(tmp_path / "g.safetensors", first.state_dict())
    resumed = apm_group(section, seed=5)
    resumed.load_state_dict(load_tensors(tmp_path / "g.safetensors"))
    for _ in range(2):
        resumed.step(services)
    assert torch.equal(resumed.images, straight.images)


def test_apm_balances_metadd_with_gbm_and_resumes_exactly(tmp_path):
    """distill.balance: gbm combines L_dd's and MetaDD's gradients with HMDC's GBM: the first step is
    lr × the per-class weighted, per-channel L-inf normalised sum; the accumulators resume exactly."""
    from raydd.config.metadd import MetaDDConfig
    from raydd.io import load_tensors, save_tensors
    from raydd.methods.apm import image_loss_and_grad
    from raydd.methods.gbm import GradientBalance
    section = MetaDDConfig(enabled=True, cam_size=4)
    services = apm_services()
    plain, group = apm_group(section), apm_group(section, balance="gbm", balance_every=2)
    u0 = group.images.clone()
    a, b = plain.step(services), group.step(services)
    idx = (group.momentum != 0).flatten(1).any(1)
    x, y = u0[idx], group.labels[idx]
    _, g_dd = image_loss_and_grad(x, y, plain.student, plain.checkpoints, services.teachers, a["teacher"])
    _, g_aux = MetaDDTerm(MetaDDOptions.from_config(section)).loss_and_grad(x, y, services, teacher=b["teacher"])
    want, w = GradientBalance(CLASSES, 2, every=2).balance([g_dd, g_aux], y, step=0)
    torch.testing.assert_close(group.images[idx], x - 0.5 * want, rtol=1e-4, atol=1e-6)
    moved = (x - group.images[idx]).abs().amax(dim=(2, 3))     # lr is each channel's largest pixel move
    assert torch.allclose(moved, torch.full_like(moved, 0.5), rtol=1e-3)   # up to the eps of the L-inf
    assert b["gbm"] == pytest.approx({"w_dd": float(w[y, 0].mean()), "w_metadd": float(w[y, 1].mean())})
    assert min(b["gbm"].values()) < 1.0 and not torch.equal(group.images, plain.images)

    straight = apm_group(section, balance="gbm", balance_every=2)
    for _ in range(4):
        straight.step(services)
    first = apm_group(section, balance="gbm", balance_every=2)
    for _ in range(3):
        first.step(services)
    save_tensors(tmp_path / "g.safetensors", first.state_dict())
    resumed = apm_group(section, seed=5, balance="gbm", balance_every=2)
    resumed.load_state_dict(load_tensors(tmp_path / "g.safetensors"))
    assert torch.equal(resumed.balance.acc, first.balance.acc) and bool((first.balance.acc > 1e-5).any())
    resumed.step(services)
    assert torch.equal(resumed.images, straight.images)


def test_apm_with_metadd_needs_an_auxiliary_service():
    from raydd.config.metadd import MetaDDConfig
    group = apm_group(MetaDDConfig(enabled=True))
    with pytest.raises(RayddError, match="auxiliary service"):
        group.step(Services(teachers=apm_services().teachers))
