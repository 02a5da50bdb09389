import math

import pytest
import torch

from experiments import register, segment
from experiments.brain import dice_per_class, load_mni152_slices, random_smooth_warp, warp
from experiments.register import folding_fraction, smoothness


@pytest.fixture(scope="module")
def data():
    return load_mni152_slices(64)


def test_slices_are_real_and_split(data):
    assert data.x_train.shape[1:] == (1, 64, 64) and len(data.x_test) > 0
    assert set(data.y_train.unique().tolist()) == {0, 1, 2, 3}
    # held-out slices are not copies of training slices
    d = torch.cdist(data.x_test.flatten(1), data.x_train.flatten(1))
    assert float(d.min()) > 0


def test_warp_identity_and_dice(data):
    x = data.x_train[:2]
    assert torch.allclose(warp(x, torch.zeros(2, 2, 64, 64)), x, atol=1e-5)
    y = data.y_train[:2]
    assert torch.allclose(dice_per_class(y, y), torch.ones(3))


def test_folding_and_smoothness_reference_values():
    zero = torch.zeros(1, 2, 16, 16)
    assert float(folding_fraction(zero)) == 0.0 and float(smoothness(zero)) == 0.0
    # a reflection x -> -x folds everywhere: u_x = -2x (normalised units)
    xs = torch.linspace(-1, 1, 16)
    refl = torch.zeros(1, 2, 16, 16)
    refl[0, 0] = -2 * xs.expand(16, 16)
    assert float(folding_fraction(refl)) == 1.0
    g = torch.Generator().manual_seed(0)
    assert float(folding_fraction(random_smooth_warp(4, 64, 0.01, g)).max()) == 0.0


@pytest.mark.parametrize("task", [register, segment])
@pytest.mark.parametrize("variant", ["default", "mip"])
def test_task_smoke(data, task, variant):
    res = task.run(variant, 0, data, {"steps": 3, "n_eval": 4} if task is register else {"steps": 3})
    m = res["metrics"]
    assert len(res["curve"]) == 3 and all(math.isfinite(v) for v in res["curve"])
    assert 0.0 <= m["dice"] <= 1.0
    assert len(m["grad_norm_by_gamma"]) == 5 and all(math.isfinite(g) for g in m["grad_norm_by_gamma"])


def test_scale_unet_changes_resolution():
    net = segment.ScaleUNet()
    x = torch.rand(1, 1, 64, 64)
    assert net(x, scale=1.0).shape == net(x, scale=0.5).shape == (1, 4, 64, 64)
    assert not torch.allclose(net(x, scale=1.0), net(x, scale=0.5))


def test_registration_pairs_are_at_most_6_mm_apart_in_both_splits(data):
    # the partner is drawn among slices within 6 mm by position, never by index in the gapped split arrays
    from experiments.register import MAX_PAIR_MM, pair_partners

    g = torch.Generator().manual_seed(0)
    for z in (data.z_train, data.z_test):
        i = torch.randint(0, len(z), (4000,), generator=g)
        j = pair_partners(z, i, g)
        d = (z[i] - z[j]).abs()
        assert float(d.max()) <= MAX_PAIR_MM
        assert float((d > 0).double().mean()) > 0.5  # most pairs are two different slices
    # the index-offset rule this replaces paired test slices up to 30 mm apart
    i = torch.arange(len(data.z_test))
    j = (i[:, None] + torch.arange(-3, 4)[None, :]).clamp(0, len(data.z_test) - 1)
    assert float((data.z_test[i][:, None] - data.z_test[j]).abs().max()) > MAX_PAIR_MM
