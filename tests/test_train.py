import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from raydd.augment import DSA
from raydd.errors import RayddError
from raydd.train import accuracy, autocast, keep_freed_memory, resolve_device, set_threads, tensor_batches, train_classifier


def blobs(n=200, seed=0):
    """Two linearly separable classes of 1×4×4 'images'."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 1, 4, 4, generator=g) * 0.5
    x[:, 0, :2] += (y.float() * 2 - 1)[:, None, None] * 1.5
    return x, y


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))


class Scalar(nn.Module):
    """A model whose only parameter p gets gradient 1 per step: p moves by exactly -lr."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))


def test_loss_decreases_and_accuracy_is_high():
    x, y = blobs()
    model = small_net()
    history = train_classifier(model, (x, y), epochs=6, lr=0.05, batch_size=32,
                               generator=torch.Generator().manual_seed(1))
    assert len(history) == 6 and history[-1] < history[0] * 0.5
    assert accuracy(model, tensor_batches((x, y), 64), "cpu") > 0.95


def test_lr_steps_down_tenfold_at_half_of_the_epochs():
    model, seen = Scalar(), []
    x, y = torch.zeros(4, 1), torch.zeros(4, dtype=torch.long)
    train_classifier(model, (x, y), epochs=4, lr=1.0, momentum=0.0, weight_decay=0.0, batch_size=4,
                     loss_fn=lambda m, xb, yb: m.p * 1.0,
                     progress=lambda epoch, loss: seen.append((epoch, round(float(model.p.detach()), 6))))
    assert seen == [(1, -1.0), (2, -2.0), (3, -2.1), (4, -2.2)]
    single = Scalar()
    train_classifier(single, (x, y), epochs=1, lr=1.0, momentum=0.0, weight_decay=0.0,
                     loss_fn=lambda m, xb, yb: m.p * 1.0)
    assert float(single.p.detach()) == -1.0  # one epoch is not decayed


def test_extras_and_targets_reach_loss_fn_aligned_with_the_shuffle():
    x, y = blobs(64)
    soft = F.one_hot(y, 2).float() * 3
    feats = y.float() * 10
    calls = []

    def loss_fn(model, xb, yb, fb, sb):  # data extras first, then targets
        assert torch.equal(sb.argmax(1), yb) and torch.equal(fb, yb.float() * 10)
        calls.append(yb.clone())
        return F.l1_loss(model(xb), sb)

    model = small_net()
    history = train_classifier(model, (x, y, feats), targets=soft, loss_fn=loss_fn, epochs=3,
                               lr=0.05, batch_size=16, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 12 and history[-1] < history[0]
    assert not torch.equal(torch.cat(calls[:4]), y)  # the epoch really was shuffled
    with pytest.raises(ValueError, match="loss_fn"):
        train_classifier(small_net(), (x, y, feats), epochs=1, lr=0.1)


def test_dsa_and_streamed_data():
    x, y = blobs(64)
    epochs_started, seen_generators = [], []

    def stream():
        epochs_started.append(1)
        return tensor_batches((x, y), 16)

    dsa = DSA("crop_scale_rotate")

    def recording_dsa(xb, generator):
        seen_generators.append(generator)
        return dsa(xb, generator)

    g = torch.Generator().manual_seed(0)
    history = train_classifier(small_net(), stream, epochs=3, lr=0.05, dsa=recording_dsa, generator=g)
    assert len(epochs_started) == 3 and len(history) == 3
    assert len(seen_generators) == 12 and all(s is g for s in seen_generators)
    with pytest.raises(ValueError, match="streamed"):
        train_classifier(small_net(), stream, epochs=1, lr=0.1, targets=y)


def test_same_seed_same_result_with_dsa():
    x, y = blobs(64)
    runs = []
    for _ in range(2):
        model = small_net()
        train_classifier(model, (x, y), epochs=2, lr=0.05, batch_size=16, dsa=DSA(),
                         generator=torch.Generator().manual_seed(4))
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(runs[0], runs[1])


def test_divergence_is_a_one_line_error():
    x, y = torch.zeros(4, 1), torch.zeros(4, dtype=torch.long)
    with pytest.raises(RayddError, match="diverged in epoch 1"):
        train_classifier(Scalar(), (x, y), epochs=2, lr=1.0,
                         loss_fn=lambda m, xb, yb: m.p * float("nan"))


def test_accuracy_restores_mode_and_counts_correctly():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1, 1, 1])
    model.train()
    assert accuracy(model, tensor_batches((x, y), 3), "cpu") == 0.75
    assert model.training
    with pytest.raises(RayddError):
        accuracy(model, [], "cpu")


def test_accuracy_of_a_conv_net_is_layout_independent_and_leaves_it_trainable():
    from raydd.models import build
    torch.manual_seed(0)
    net = build("convnet_bn:width=8", 1, 10, 8)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    net.eval()
    with torch.no_grad():
        expected = (net(x).argmax(1) == y).float().mean().item()
    net.train()
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    assert accuracy(net, tensor_batches((x, y), 16), "cpu") == pytest.approx(expected)
    # channels-last is for the test pass only: same values, default layout and train mode afterwards
    assert net.training and all(torch.equal(weights[k], v) for k, v in net.state_dict().items())
    assert all(p.is_contiguous() for p in net.parameters())
    train_classifier(net, (x, y), epochs=1, lr=0.01, batch_size=32)


def test_resolve_device_and_threads():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(RayddError, match="'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(RayddError, match="no CUDA GPU"):
            resolve_device("cuda")
    before = torch.get_num_threads()
    try:
        set_threads(0.5)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_tensor_batches_cover_everything_once():
    x = torch.arange(10)
    out = torch.cat([b for (b,) in tensor_batches((x,), 3, shuffle=True,
                                                  generator=torch.Generator().manual_seed(0))])
    assert sorted(out.tolist()) == list(range(10)) and out.tolist() != list(range(10))


def test_freed_memory_is_kept_in_the_heap_once_per_process():
    import subprocess
    import sys
    code = ("import ctypes, torch; from raydd.train import keep_freed_memory as k; "
            "a = k(); b = k(); print(a, b)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True"]          # glibc (Linux CI): applied, and asking again changes nothing
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "RAYDD_KEEP_HEAP": "0"}).stdout.split()
    assert off == ["False", "False"]
    assert isinstance(keep_freed_memory(), bool)


def test_bf16_training_keeps_fp32_weights_and_learns_like_fp32():
    x, y = blobs()
    runs = {}
    for precision in ("fp32", "bf16"):
        net = small_net()
        hist = train_classifier(net, (x, y), epochs=30, lr=0.1, batch_size=50, precision=precision,
                                generator=torch.Generator().manual_seed(0))
        assert all(p.dtype == torch.float32 for p in net.parameters())
        runs[precision] = (hist, accuracy(net, [(x, y)]), net)
    (h32, a32, n32), (h16, a16, n16) = runs["fp32"], runs["bf16"]
    assert a16 >= 0.95 and abs(a16 - a32) <= 0.03
    assert not torch.equal(n32[1].weight, n16[1].weight)      # bf16 really ran: rounding differs
    assert h16[-1] < h16[0] * 0.5
    # the test pass of a bf16 trial runs under autocast too, and agrees with the fp32 pass here
    seen = []
    n16.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    assert accuracy(n16, [(x, y)], precision="bf16") == pytest.approx(runs["bf16"][1], abs=0.03)
    accuracy(n16, [(x, y)])
    assert seen == [torch.bfloat16, torch.float32]


def test_bf16_without_hardware_support_is_said_once(monkeypatch, capsys):
    import raydd.train as train
    monkeypatch.setattr(train, "_bf16_warned", False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert train.bf16_native("cpu") is False
    with autocast("cpu", "fp32"):
        pass
    assert capsys.readouterr().err == ""            # fp32 asks for nothing
    for _ in range(3):
        with autocast("cpu", "bf16"):
            assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.bfloat16   # still bf16
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "precision bf16 on a CPU without AVX512-BF16 or AMX" in err
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert train.bf16_native("cpu") is True


@pytest.mark.parametrize("norm, channels_last", [("batch", True), ("instance", False), ("group", False)])
def test_accuracy_runs_channels_last_only_without_groupnorm(norm, channels_last):
    from raydd.models import build
    net = build(f"convnet:width=8,depth=1,norm={norm}", 3, 10, 8)
    seen = []
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    acc = accuracy(net, [(x, y)], "cpu")
    net.eval()
    assert seen == [channels_last] and acc == (net(x).argmax(1) == y).float().mean().item()
    assert all(p.is_contiguous() for p in net.parameters())   # back in the default layout


@pytest.mark.parametrize("norm, channels_last", [("batch", True), ("instance", False)])
def test_training_runs_channels_last_only_without_groupnorm_and_learns_the_same(norm, channels_last, monkeypatch):
    import raydd.train as train
    from raydd.models import build
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))

    def run():
        torch.manual_seed(0)
        net = build(f"convnet:width=8,depth=1,norm={norm}", 3, 10, 8)
        seen = []
        conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
        hist = train_classifier(net, (x, y), epochs=4, lr=0.05, batch_size=16, dsa=DSA("color_crop_flip"),
                                generator=torch.Generator().manual_seed(0))
        assert all(p.is_contiguous() for p in net.parameters())   # back in the default layout
        return hist, net, seen

    hist, net, seen = run()
    assert seen == [channels_last] * 8
    monkeypatch.setattr(train, "channels_last_pays", lambda model, device: False)
    hist0, net0, seen0 = run()
    assert seen0 == [False] * 8
    # the same training up to the convolutions' rounding order
    assert hist == pytest.approx(hist0, rel=1e-4)
    for p, p0 in zip(net.parameters(), net0.parameters()):
        torch.testing.assert_close(p, p0, rtol=1e-4, atol=1e-5)
