import pytest
import torch

from raydd.augment import DSA, OPS, validate_strategy
from raydd.data.zca import ZCA
from raydd.errors import ConfigError, RayddError
from raydd.io import load_tensors, save_tensors


def gen(seed):
    return torch.Generator().manual_seed(seed)


def images(n=4, c=3, h=12, w=10, seed=0):
    return torch.randn(n, c, h, w, generator=gen(seed))


def test_validate_strategy_splits_and_names_the_key():
    assert validate_strategy("color_crop_flip", "data.dsa_strategy") == ["color", "crop", "flip"]
    with pytest.raises(ConfigError) as e:
        validate_strategy("color_blur", "data.dsa_strategy")
    msg = str(e.value)
    assert "data.dsa_strategy" in msg and "'blur'" in msg and "\n" not in msg
    assert all(op in msg for op in OPS)
    with pytest.raises(ConfigError, match="distill.x"):
        validate_strategy("", "distill.x")


@pytest.mark.parametrize("op", sorted(OPS))
def test_each_op_preserves_shape_and_is_differentiable(op):
    x = images().requires_grad_(True)
    weights = torch.randn(x.shape, generator=gen(9))
    # Several seeds so that the non-identity branch (e.g. flip) is exercised too.
    for seed in range(6):
        y = DSA(op)(x, gen(seed))
        assert y.shape == x.shape and torch.isfinite(y).all()
        x.grad = None
        (y * weights).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("op", sorted(OPS))
def test_same_parameters_for_every_image_of_the_batch(op):
    x = images(n=3)
    batch = DSA(op)(x, gen(5))
    # The same generator state applied to each image alone gives the same result,
    # so the parameters are drawn once per batch, not per image.
    for i in range(3):
        alone = DSA(op)(x[i:i + 1], gen(5))
        torch.testing.assert_close(batch[i:i + 1], alone)
    same = DSA(op)(x[:1].expand(3, -1, -1, -1).contiguous(), gen(11))
    torch.testing.assert_close(same[0], same[2])


def test_generator_makes_it_reproducible_and_seeds_differ():
    dsa = DSA()
    x = images()
    torch.testing.assert_close(dsa(x, gen(3)), dsa(x, gen(3)))
    outs = [dsa(x, gen(s)) for s in range(8)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])


def test_crop_is_an_exact_integer_shift_with_zero_fill():
    x = images(n=2, c=1, h=16, w=16)
    for seed in range(10):
        y = DSA("crop")(x, gen(seed))
        matches = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                ref = torch.zeros_like(x)
                src = x[:, :, max(dy, 0):16 + min(dy, 0), max(dx, 0):16 + min(dx, 0)]
                ref[:, :, max(-dy, 0):16 + min(-dy, 0), max(-dx, 0):16 + min(-dx, 0)] = src
                matches.append(torch.allclose(y, ref, atol=1e-5))
        assert sum(matches) == 1


def test_flip_and_cutout_semantics():
    x = images(n=2, c=2, h=8, w=8)
    flips = {bool(torch.equal(DSA("flip")(x, gen(s)), x.flip(3))) for s in range(10)}
    assert flips == {True, False}
    for seed in range(10):
        y = DSA("cutout")(x, gen(seed))
        hole = (y == 0) & (x != 0)
        assert torch.equal(hole[0], hole[1]) and torch.equal(hole[:, 0], hole[:, 1])
        assert 0 < hole[0, 0].sum() <= 16  # at most a 4×4 block (half of each side)
        kept = ~hole
        torch.testing.assert_close(y[kept], x[kept])


def test_color_on_single_channel_and_rotate_keeps_the_centre():
    x = images(n=2, c=1, h=9, w=9)
    y = DSA("color")(x, gen(1))
    assert not torch.allclose(x, y)
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
