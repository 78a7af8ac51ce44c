"""The plain-torch evaluation trial: losses of every mode, the ELF split, clear refusals."""
import math

import pytest
import torch
import torch.nn.functional as F

from raydd.config import EvalConfig
from raydd.errors import ConfigError, RayddError
from raydd.evaluate.elf import ElfNet, elf_distance, extract_features, front_shape
from raydd.evaluate.protocol import evaluate_once, kd_loss, kl_teacher_student, soft_l1
from raydd.models import build
from raydd.synset import Synset

C, S, K = 1, 8, 4  # channels, image size, classes


def _toy(n_per_class=6, seed=0):
    """Learnable toy images: each class lights up its own quadrant."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(K).repeat_interleave(n_per_class)
    x = 0.3 * torch.randn(len(y), C, S, S, generator=g)
    for i, c in enumerate(y.tolist()):
        r, q = divmod(c, 2)
        x[i, :, 4 * r:4 * r + 4, 4 * q:4 * q + 4] += 2.0
    return x, y


def _ecfg(**kw):
    e = EvalConfig(epochs=kw.pop("epochs", 12), lr=kw.pop("lr", 0.05), batch_size=8, dsa=kw.pop("dsa", False))
    for k, v in kw.items():
        setattr(e, k, v)
    return e


def _tests(x, y):
    return lambda: [(x, y)]


def test_kd_loss_equals_hand_computed_kl():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    t = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    y = torch.tensor([0, 2])
    T, alpha = 2.0, 0.3

    def softmax(row):
        e = [math.exp(v / T) for v in row]
        return [v / sum(e) for v in e]

    kl = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        ps, pt = softmax(srow), softmax(trow)
        kl += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))  # KL(teacher ‖ student)
    kl /= 2
    ce = sum(-math.log(math.exp(r[c]) / sum(math.exp(v) for v in r)) for r, c in zip(s.tolist(), y.tolist())) / 2
    assert kl_teacher_student(s, t, T).item() == pytest.approx(T * T * kl, rel=1e-5)
    assert kd_loss(s, t, y, alpha, T).item() == pytest.approx((1 - alpha) * ce + alpha * T * T * kl, rel=1e-5)
    # the swapped direction (the public code's bug) is a different number here
    swapped = F.kl_div(F.log_softmax(t / T, 1), F.softmax(s / T, 1), reduction="batchmean").item() * T * T
    assert abs(swapped - T * T * kl) > 1e-3


def test_elf_distances():
    pred = torch.randn(2, 3, 2, 2)
    feat = torch.rand(2, 3, 2, 2)
    manual = -(feat * F.log_softmax(pred, dim=1)).sum(1).mean()  # CE over channels, features as targets
    assert elf_distance(pred, feat, "ce").item() == pytest.approx(manual.item(), rel=1e-5)
    assert elf_distance(pred, feat, "l1").item() == pytest.approx((pred - feat).abs().mean().item(), rel=1e-5)
    assert elf_distance(feat, feat, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError, match="elf.distance"):
        elf_distance(pred, feat, "hamming")


@pytest.mark.parametrize("mode, precision", [("hard", "fp32"), ("soft", "fp32"), ("kd", "fp32"), ("elf", "fp32"),
                                             ("soft", "bf16"), ("elf", "bf16")])
def test_loss_decreases_in_every_mode(mode, precision, monkeypatch):
    import raydd.train
    used, real = [], raydd.train.train_classifier
    monkeypatch.setattr(raydd.train, "train_classifier", lambda *a, **kw: used.append(kw["precision"]) or real(*a, **kw))
    torch.manual_seed(0)
    x, y = _toy()
    soft = elf = None
    if mode == "soft":
        soft = 3.0 * F.one_hot(y, K).float()
    if mode == "elf":
        fm = build("convnet:width=32", C, K, S)  # 32 feature channels vs the net's 16: 1×1 projections
        elf = extract_features(fm, x)
    seen = []
    ecfg = _ecfg(epochs=16, lr=0.1, kd=_kd(), precision=precision)
    res = evaluate_once("convnet:width=16", mode, 0, Synset(x, y, soft_labels=soft, elf_features=elf),
                        _tests(x, y), ecfg, image_shape=(C, S, S), num_classes=K,
                        on_epoch=lambda phase, ep, loss: seen.append((phase, ep, loss)))
    train = [loss for phase, _, loss in seen if phase == "train"]
    assert len(train) == ecfg.epochs
    # ELF's channel cross-entropy has unnormalised feature targets (as in the official code), so its
    # minimum is Σ_c f_c·-log(f_c/Σf) > 0: compare what lies above that floor.
    floor = elf_distance(torch.log(elf + 1e-12), elf, "ce").item() if mode == "elf" else 0.0
    assert res["train_loss_last"] - floor < 0.9 * (res["train_loss_first"] - floor)
    assert res["train_loss_first"] == train[0] and res["train_loss_last"] == train[-1]
    assert 0.0 <= res["test_acc"] <= 1.0 and res["epochs"] == ecfg.epochs
    assert used == [precision] * (2 if mode == "kd" else 1)   # the teacher of kd trains under it too
    if mode == "kd":
        assert [p for p, _, _ in seen].count("teacher") == ecfg.epochs and "teacher_acc" in res
    if mode == "elf":
        assert "projection 16<->32" in res["elf_adapted"]


def _kd():
    from raydd.config import KDConfig
    return KDConfig(alpha=0.5, temperature=4.0, teacher_arch="convnet:width=16")


def test_soft_mode_targets_the_stored_logits(monkeypatch):
    """Hard labels say class c+1, the stored logits say c: soft training must follow the logits."""
    x, y = _toy(n_per_class=4)
    target = 4.0 * F.one_hot(y, K).float() - 1.0
    wrong = (y + 1) % K
    built = []

    def capture(*a, **k):  # keep the trained net to inspect its logits
        built.append(build(*a, **k))
        return built[-1]

    monkeypatch.setattr("raydd.models.build", capture)
    res = evaluate_once("mlp:width=32", "soft", 0, Synset(x, wrong, soft_labels=target), _tests(x, y),
                        _ecfg(epochs=30, lr=0.05), image_shape=(C, S, S), num_classes=K)
    net = built[0].eval()
    with torch.no_grad():
        out = net(x)
    assert res["test_acc"] == 1.0  # accuracy against y, the logits' classes, not the hard labels
    assert (out - target).abs().mean() < 0.5 * (target.abs().mean())
    assert soft_l1(target, target).item() == 0.0


@pytest.mark.parametrize("arch,shape", [("convnet", (128, 4, 4)), ("convnet_bn", (128, 4, 4)),
                                        ("resnet18", (512, 4, 4)), ("vgg11", (512, 4, 4))])
def test_elf_split_shapes(arch, shape):
    """32×32 inputs: the paper's split points give the feature model's 512×4×4 maps (ConvNet-W128 is projected)."""
    torch.manual_seed(0)
    net = build(arch, 3, 10, 32).eval()
    feat_model = build("convnet:width=512", 3, 10, 32)
    fshape = front_shape(feat_model, (3, 32, 32))
    assert fshape == (512, 4, 4)
    assert front_shape(net, (3, 32, 32)) == shape
    m = ElfNet(net, (3, 32, 32), fshape).eval()
    x = torch.randn(2, 3, 32, 32)
    h = net.run(x, stop=m.start)
    assert tuple(h.shape[1:]) == shape
    assert torch.allclose(net.run(h, start=m.start), net(x), atol=1e-5)  # front ∘ rear = the net
    assert tuple(m.to_feature(h).shape[1:]) == fshape
    assert (m.adapted == "") == (shape == fshape)
    f = torch.rand(2, *fshape)
    m.train()
    loss = m.loss(x, torch.tensor([1, 2]), f, EvalConfig().elf)
    loss.backward()
    assert torch.isfinite(loss) and next(net.parameters()).grad is not None


def test_elf_resizes_features_to_the_front_grid():
    net = build("convnet:width=8", C, K, S)  # 8×8 input → 1×1 front
    m = ElfNet(net, (C, S, S), (8, 4, 4))
    assert m.grid == (1, 1) and "resized 4×4->1×1" in m.adapted
    f = torch.rand(3, 8, 4, 4)
    assert torch.allclose(m.fit_features(f), f.mean((2, 3), keepdim=True), atol=1e-6)


@pytest.mark.parametrize("arch", ["mlp", "vit_tiny"])
def test_impossible_elf_combination_fails_clearly(arch):
    x, y = _toy(n_per_class=1)
    syn = Synset(x, y, elf_features=torch.rand(len(y), 8, 1, 1))
    with pytest.raises(RayddError, match=rf"ELF cannot evaluate {arch}.*no front/rear split"):
        evaluate_once(arch, "elf", 0, syn, _tests(x, y), _ecfg(epochs=1), image_shape=(C, S, S), num_classes=K)


def test_elf_rank_mismatch_is_refused():
    net = build("convnet:width=8", C, K, S)
    with pytest.raises(RayddError, match=r"front outputs 8×1×1 but the features are 16"):
        ElfNet(net, (C, S, S), (16,))


def test_bad_inputs_of_a_trial():
    x, y = _toy(n_per_class=1)
    with pytest.raises(ConfigError, match="mode 'fuzzy' is unknown"):
        evaluate_once("mlp", "fuzzy", 0, Synset(x, y), _tests(x, y), _ecfg(), image_shape=(C, S, S), num_classes=K)
    with pytest.raises(RayddError, match="training images are 1×8×8 but the test data is 3×8×8"):
        evaluate_once("mlp", "hard", 0, Synset(x, y), _tests(x, y), _ecfg(), image_shape=(3, S, S), num_classes=K)
    with pytest.raises(RayddError, match="has 3 classes"):
        evaluate_once("mlp", "hard", 0, Synset(x, y), _tests(x, y), _ecfg(), image_shape=(C, S, S), num_classes=3)
    with pytest.raises(RayddError, match="needs stored soft labels"):
        evaluate_once("mlp", "soft", 0, Synset(x, y), _tests(x, y), _ecfg(), image_shape=(C, S, S), num_classes=K)


def test_hard_cutmix_mixes_the_batches_and_spares_vits(monkeypatch):
    import raydd.augment
    x, y = _toy()
    mixed = []
    real = raydd.augment.cutmix
    monkeypatch.setattr(raydd.augment, "cutmix", lambda *a, **kw: mixed.append(real(*a, **kw)) or mixed[-1])
    runs = {}
    for arch, beta in [("convnet:width=16", None), ("convnet:width=16", 1.0),
                       ("vit_tiny:width=16,depth=1,heads=2", None), ("vit_tiny:width=16,depth=1,heads=2", 1.0)]:
        mixed.clear()
        runs[arch, beta] = res = evaluate_once(arch, "hard", 0, Synset(x, y), _tests(x, y), _ecfg(hard_cutmix=beta),
                                               image_shape=(C, S, S), num_classes=K)
        on = beta is not None and arch.startswith("convnet")
        assert len(mixed) == (12 * 3 if on else 0) and res.get("cutmix") == (beta if on else None)
        if on:   # the targets are one-hot labels mixed by the pasted area, summing to 1
            targets = torch.cat([t for _, t in mixed])
            assert torch.allclose(targets.sum(1), torch.ones(len(targets)))
            assert ((targets > 0) & (targets < 1)).any()
    conv, vit = "convnet:width=16", "vit_tiny:width=16,depth=1,heads=2"
    assert runs[conv, 1.0]["train_loss_first"] != runs[conv, None]["train_loss_first"]
    assert runs[vit, 1.0] | {"seconds": 0} == runs[vit, None] | {"seconds": 0}    # a ViT trains as without it
