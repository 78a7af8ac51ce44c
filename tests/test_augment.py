import math

import pytest
import torch

from raydd.augment import DSA, OPS, crop_shift, cutout_size, validate_strategy
from raydd.data.zca import ZCA
from raydd.errors import ConfigError, RayddError
from raydd.io import load_tensors, save_tensors


def gen(seed):
    return torch.Generator().manual_seed(seed)


def images(n=4, c=3, h=12, w=10, seed=0):
    return torch.randn(n, c, h, w, generator=gen(seed))


def copies(n=64, c=3, h=12, w=10):
    """n copies of one asymmetric image, so any two different transforms give different outputs."""
    return images(n=1, c=c, h=h, w=w, seed=7).expand(n, -1, -1, -1).contiguous()


def ks_uniform(values, low, high):
    """Kolmogorov-Smirnov distance between the sample and U(low, high)."""
    v = ((values.double() - low) / (high - low)).sort().values
    n = len(v)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max(float((i / n - v).max()), float((v - (i - 1) / n).max()))


def ks_limit(n, alpha=1e-3):
    return math.sqrt(-math.log(alpha / 2) / 2) / math.sqrt(n)


def assert_discrete_uniform(values, low, high):
    """Every integer of [low, high] appears and none other; each count within 5 σ of n/k."""
    n, k = len(values), high - low + 1
    counts = torch.bincount(values - low, minlength=k)
    assert values.min() == low and values.max() == high and len(counts) == k
    sigma = math.sqrt(n * (1 / k) * (1 - 1 / k))
    assert (counts.double() - n / k).abs().max() < 5 * sigma, counts


def test_validate_strategy_splits_and_names_the_key():
    assert validate_strategy("color_crop_flip", "data.dsa_strategy") == ["color", "crop", "flip"]
    with pytest.raises(ConfigError) as e:
        validate_strategy("color_blur", "data.dsa_strategy")
    msg = str(e.value)
    assert "data.dsa_strategy" in msg and "'blur'" in msg and "\n" not in msg
    assert all(op in msg for op in OPS)
    with pytest.raises(ConfigError, match="distill.x"):
        validate_strategy("", "distill.x")


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("op", sorted(OPS))
def test_each_op_preserves_shape_and_is_differentiable(op, shared):
    x = images().requires_grad_(True)
    weights = torch.randn(x.shape, generator=gen(9))
    # Several seeds so that the non-identity branch (e.g. flip) is exercised too.
    for seed in range(6):
        y = DSA(op, shared=shared)(x, gen(seed))
        assert y.shape == x.shape and torch.isfinite(y).all()
        x.grad = None
        (y * weights).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("op", sorted(OPS))
def test_per_image_by_default_and_one_transform_when_shared(op):
    x = copies()
    y = DSA(op)(x, gen(5))
    distinct = {tuple(y[i].flatten().tolist()) for i in range(len(y))}
    assert len(distinct) > 1  # copies of one image come out differently
    _, params = DSA(op).draw(x, gen(5))
    assert params.shape[0] == 64 and len(torch.unique(params, dim=0)) > 1
    for seed in range(3):
        s = DSA(op, shared=True)(x, gen(seed))
        assert torch.equal(s, s[:1].expand_as(s))
        assert torch.equal(DSA(op)(x, gen(seed), shared=True), s)  # per-call switch


@pytest.mark.parametrize("op", sorted(OPS))
def test_batched_apply_equals_applying_each_row_alone(op):
    x = images(n=6)
    dsa = DSA(op)
    name, params = dsa.draw(x, gen(3))
    y = dsa.apply(x, name, params)
    for i in range(len(x)):
        torch.testing.assert_close(y[i:i + 1], dsa.apply(x[i:i + 1], name, params[i:i + 1]))


def test_siamese_pair_of_different_batch_sizes_sees_one_transform():
    """Two shared calls with equally seeded generators: real and synthetic batches, any sizes."""
    dsa = DSA(shared=True)
    real, syn = images(n=16, seed=1), images(n=3, seed=2)
    for seed in range(12):
        both = dsa(torch.cat([syn, real]), gen(seed))
        torch.testing.assert_close(dsa(real, gen(seed)), both[3:])
        torch.testing.assert_close(dsa(syn, gen(seed)), both[:3])
        op, params = dsa.draw(syn, gen(seed))
        assert params.shape[0] == 1
        torch.testing.assert_close(dsa.apply(real, op, params), both[3:])
    op, params = DSA().draw(syn, gen(0))
    with pytest.raises(RayddError, match="3 parameter rows for a batch of 16"):
        DSA.apply(real, op, params)


N = 20000
SIZE = (28, 40)  # unequal sides catch a swapped axis


def test_color_parameters_follow_the_reference_distributions():
    p = OPS["color"].sample(N, SIZE, gen(0))
    for col, (low, high) in enumerate([(-0.5, 0.5), (0.0, 2.0), (0.5, 1.5)]):
        v = p[:, col]
        assert v.min() >= low and v.max() < high
        assert ks_uniform(v, low, high) < ks_limit(N)
    assert abs(float(torch.corrcoef(p.T)[0, 1])) < 0.05  # independent draws


def test_scale_and_rotate_parameters_follow_the_reference_distributions():
    s = OPS["scale"].sample(N, SIZE, gen(1))
    for col in range(2):
        assert s[:, col].min() >= 1 / 1.2 and s[:, col].max() < 1.2
        assert ks_uniform(s[:, col], 1 / 1.2, 1.2) < ks_limit(N)
    assert abs(float(torch.corrcoef(s.T)[0, 1])) < 0.05  # sx and sy independent
    a = OPS["rotate"].sample(N, SIZE, gen(2))
    lim = math.radians(15)
    assert a.min() >= -lim and a.max() < lim
    assert ks_uniform(a, -lim, lim) < ks_limit(N)


def test_crop_cutout_flip_parameters_follow_the_reference_distributions():
    h, w = SIZE
    assert (crop_shift(28), crop_shift(32), crop_shift(8), crop_shift(12)) == (4, 4, 1, 2)
    assert (cutout_size(28), cutout_size(32), cutout_size(9)) == (14, 16, 5)
    c = OPS["crop"].sample(N, SIZE, gen(3))
    assert_discrete_uniform(c[:, 0], -4, 4)
    assert_discrete_uniform(c[:, 1], -5, 5)
    o = OPS["cutout"].sample(N, SIZE, gen(4))
    # Centres in [0, side + 1 - size % 2): one extra position for even hole sizes.
    assert_discrete_uniform(o[:, 0], 0, h)
    assert_discrete_uniform(o[:, 1], 0, w)
    odd = OPS["cutout"].sample(N, (9, 9), gen(5))
    assert_discrete_uniform(odd[:, 0], 0, 8)
    f = OPS["flip"].sample(N, SIZE, gen(6))
    assert f.dtype == torch.bool
    assert abs(float(f.double().mean()) - 0.5) < 5 * math.sqrt(0.25 / N)


def test_generator_makes_it_reproducible_and_seeds_differ():
    for shared in (False, True):
        dsa = DSA(shared=shared)
        x = images()
        torch.testing.assert_close(dsa(x, gen(3)), dsa(x, gen(3)))
        outs = [dsa(x, gen(s)) for s in range(8)]
        assert any(not torch.allclose(outs[0], o) for o in outs[1:])


def test_op_choice_is_uniform_over_the_strategy():
    dsa = DSA("crop_flip_scale")
    picks = [dsa.draw(images(n=1), gen(s))[0] for s in range(600)]
    assert {op: picks.count(op) for op in dsa.ops}.keys() == {"crop", "flip", "scale"}
    assert all(150 < picks.count(op) < 250 for op in dsa.ops)


def shifted(img, dy, dx):
    h, w = img.shape[-2:]
    out = torch.zeros_like(img)
    out[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)] = \
        img[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)]
    return out


def test_crop_is_an_exact_integer_shift_with_zero_fill_per_image():
    x = images(n=32, c=2, h=16, w=12)
    dsa = DSA("crop")
    op, params = dsa.draw(x, gen(0))
    y = dsa.apply(x, op, params)
    assert len(torch.unique(params, dim=0)) > 5
    for i, (dy, dx) in enumerate(params.tolist()):
        assert torch.equal(y[i], shifted(x[i], dy, dx))  # out[r, c] = x[r + dy, c + dx]


def test_flip_and_cutout_semantics_per_image():
    x = images(n=32, c=2, h=8, w=8)
    op, f = DSA("flip").draw(x, gen(1))
    y = DSA.apply(x, op, f)
    assert 0 < int(f.sum()) < 32
    for i in range(32):
        assert torch.equal(y[i], x[i].flip(-1) if f[i] else x[i])
    op, centres = DSA("cutout").draw(x, gen(2))
    y = DSA.apply(x, op, centres)
    rows, cols = torch.arange(8), torch.arange(8)
    for i, (cy, cx) in enumerate(centres.tolist()):
        # A 4×4 hole starting 2 before the centre, clipped at the border.
        hole = ((rows >= cy - 2) & (rows < cy + 2))[:, None] & ((cols >= cx - 2) & (cols < cx + 2))[None, :]
        assert 0 < hole.sum() <= 16
        assert torch.equal(y[i], x[i] * ~hole)
    assert len({tuple(c) for c in centres.tolist()}) > 5


def test_color_factors_use_the_reference_means():
    x = images(n=3, c=3, h=5, w=5)
    apply = OPS["color"].apply
    torch.testing.assert_close(apply(x, torch.tensor([[0.0, 1.0, 1.0]] * 3)), x)
    b = torch.tensor([[0.3, 1.0, 1.0], [-0.2, 1.0, 1.0], [0.0, 1.0, 1.0]])
    torch.testing.assert_close(apply(x, b), x + b[:, :1, None, None])
    grey = apply(x, torch.tensor([[0.0, 0.0, 1.0]] * 3))  # saturation 0: every channel = channel mean
    torch.testing.assert_close(grey, x.mean(1, keepdim=True).expand_as(x))
    c = apply(x, torch.tensor([[0.0, 1.0, 0.7]] * 3))  # contrast about the per-image mean
    torch.testing.assert_close(c.mean((1, 2, 3)), x.mean((1, 2, 3)))
    torch.testing.assert_close(c - c.mean((1, 2, 3), keepdim=True), 0.7 * (x - x.mean((1, 2, 3), keepdim=True)))
    y = DSA("color")(images(n=2, c=1, h=9, w=9), gen(1))  # single channel
    assert not torch.allclose(images(n=2, c=1, h=9, w=9), y)


def ramp(n, h, w, axis):
    """Images whose value is the normalised coordinate (align_corners=True) along ``axis``."""
    u = torch.linspace(-1, 1, w if axis == "x" else h)
    img = u.view(1, w).expand(h, w) if axis == "x" else u.view(h, 1).expand(h, w)
    return img.expand(n, 1, h, w).contiguous()


def test_scale_stretches_the_sampling_grid_per_axis_and_image():
    n, h, w = 8, 9, 11
    p = OPS["scale"].sample(n, (h, w), gen(0))
    for axis, col, side in (("x", 0, w), ("y", 1, h)):
        y = OPS["scale"].apply(ramp(n, h, w, axis), p)
        u = torch.linspace(-1, 1, side)
        # Output at coordinate u samples the input at s·u; inside the frame the ramp gives s·u.
        inner = (u.abs() * 1.2 < 1)
        got = y[:, 0, h // 2, :] if axis == "x" else y[:, 0, :, w // 2]
        torch.testing.assert_close(got[:, inner], p[:, col:col + 1] * u[inner], atol=1e-5, rtol=0)


def test_rotate_turns_the_grid_per_image_and_keeps_the_centre():
    n, s = 8, 9
    a = OPS["rotate"].sample(n, (s, s), gen(0))
    y = OPS["rotate"].apply(ramp(n, s, s, "x"), a)
    u = torch.linspace(-1, 1, s)
    # Output (u, v) samples the input at u·cos a − v·sin a: a ramp's value there, inside the frame.
    for i in range(n):
        exp = u.view(1, s) * torch.cos(a[i]) - u.view(s, 1) * torch.sin(a[i])
        torch.testing.assert_close(y[i, 0, 2:-2, 2:-2], exp[2:-2, 2:-2], atol=1e-5, rtol=0)
    x = images(n=16, c=1, h=9, w=9)
    r = DSA("rotate")(x, gen(2))
    torch.testing.assert_close(r[:, :, 4, 4], x[:, :, 4, 4], atol=1e-5, rtol=0)


def test_zca_round_trip_whitening_and_state(tmp_path):
    g = gen(0)
    mix = torch.randn(48, 48, generator=g)
    x = (torch.randn(500, 48, generator=g) @ mix * 5 + 2).reshape(500, 3, 4, 4)
    zca = ZCA.fit(x)
    z = zca.transform(x)
    torch.testing.assert_close(zca.inverse(z), x, atol=1e-3, rtol=1e-4)
    flat = z.reshape(500, -1).double()
    cov = torch.cov(flat.T)
    # Directions with variance s become s/(s+0.1): close to 1 for this strongly scaled data.
    assert (cov.diagonal() - 1).abs().max() < 0.05
    assert (cov - torch.diag(cov.diagonal())).abs().max() < 0.05
    batched = ZCA.fit(iter(x.split(64)))
    torch.testing.assert_close(batched.transform(x[:5]), z[:5], atol=1e-4, rtol=1e-4)
    sha = save_tensors(tmp_path / "zca.safetensors", zca.state_dict())
    back = ZCA.from_state(load_tensors(tmp_path / "zca.safetensors", sha256=sha))
    torch.testing.assert_close(back.transform(x[:5]), z[:5])
    with pytest.raises(RayddError, match="ZCA was fitted on images of 48 values"):
        zca.transform(torch.zeros(2, 1, 4, 4))


def test_zca_whitens_raw_pixels_as_the_references():
    """Fitted on normalised images with the normalisation's std, the transform equals the
    references' ZCA of the raw [0, 1] pixels with eps 0.1, computed here directly in float64."""
    g = gen(3)
    mix = torch.rand(48, 48, generator=g) ** 4 / 12        # correlated pixels, mostly inside [0, 1]
    raw = (torch.rand(800, 48, generator=g) @ mix).clamp(0, 1).reshape(800, 3, 4, 4)
    assert 0.05 < raw.std() < 0.3 and (raw < 1).float().mean() > 0.95
    m, s = torch.tensor([0.4, 0.5, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    z = (raw - m[:, None, None]) / s[:, None, None]
    zca = ZCA.fit(z, reg=0.1, pixel_std=s.tolist())

    flat = raw.reshape(800, -1).double()
    centred = flat - flat.mean(0)
    ev, u = torch.linalg.eigh(centred.T @ centred / 799)
    direct = centred @ (u @ torch.diag((ev.clamp_min(0) + 0.1).rsqrt()) @ u.T)
    torch.testing.assert_close(zca.transform(z).reshape(800, -1).double(), direct, atol=2e-5, rtol=1e-4)
    # whitened covariance: s/(s + eps) along each eigen-direction, not the identity (eps matters)
    cov = torch.cov(direct.T)
    torch.testing.assert_close(u.T @ cov @ u, torch.diag(ev.clamp_min(0) / (ev.clamp_min(0) + 0.1)),
                               atol=1e-6, rtol=0)
    assert (ev / (ev + 0.1)).min() < 0.5            # the data has directions eps suppresses
    torch.testing.assert_close(zca.inverse(zca.transform(z)), z, atol=1e-3, rtol=1e-4)
    # fitting on the normalised pixels without their std is a different (weaker-eps) whitening
    assert (ZCA.fit(z, reg=0.1).transform(z) - zca.transform(z)).abs().max() > 0.1
