import math

import numpy as np
import pytest
import torch

from experiments import brain, register, segment
from experiments.brain import DataUnavailable, colin27_available, dice_per_class, kmeans_1d, load_brain_slices, random_smooth_warp, warp
from experiments.register import folding_fraction, smoothness

NO_COLIN = "Colin27 test subject needs Debian mricron-data (apt-get install mricron-data)"
needs_colin = pytest.mark.skipif(not colin27_available(), reason=NO_COLIN)


@pytest.fixture(scope="module")
def data():
    return load_brain_slices(64)


@pytest.fixture(scope="module")
def colin():
    if not colin27_available():
        pytest.skip(NO_COLIN)
    return load_brain_slices(64, test="colin27")


@pytest.fixture(scope="module")
def slab():
    return load_brain_slices(64, test="slab")


def test_slices_are_real_and_split(data):
    _check_shapes(data)
    assert data.test_subject == ("Colin27" if colin27_available() else "MNI152 (held-out slab)")


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


@pytest.mark.parametrize("split", ["colin27", "slab"])
def test_registration_pairs_are_at_most_6_mm_apart_in_both_splits(split):
    # the partner is drawn among slices within 6 mm by position, never by index in the gapped split arrays
    from experiments.register import MAX_PAIR_MM, pair_partners

    if split == "colin27" and not colin27_available():
        pytest.skip(NO_COLIN)
    data = load_brain_slices(64, test=split)
    g = torch.Generator().manual_seed(0)
    for z in (data.z_train, data.z_test):
        i = torch.randint(0, len(z), (4000,), generator=g)
        j = pair_partners(z, i, g)
        d = (z[i] - z[j]).abs()
        assert float(d.max()) <= MAX_PAIR_MM
        assert float((d > 0).double().mean()) > 0.5  # most pairs are two different slices
    if split == "slab":
        # the index-offset rule this replaces pairs training slices across the gap left by the slab
        i = torch.arange(len(data.z_train))
        j = (i[:, None] + torch.arange(-3, 4)[None, :]).clamp(0, len(data.z_train) - 1)
        assert float((data.z_train[i][:, None] - data.z_train[j]).abs().max()) > MAX_PAIR_MM


def _check_shapes(d):
    for x, y in ((d.x_train, d.y_train), (d.x_test, d.y_test)):
        assert x.ndim == 4 and x.shape[1:] == (1, 64, 64) and x.dtype == torch.float32
        assert y.shape == (len(x), 64, 64) and y.dtype == torch.int64
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.max()) > 0.9
        assert set(y.unique().tolist()) == {0, 1, 2, 3}
    assert len(d.z_train) == len(d.x_train) and len(d.z_test) == len(d.x_test)
    # held-out slices are not copies of training slices
    assert float(torch.cdist(d.x_test.flatten(1), d.x_train.flatten(1)).min()) > 0


@needs_colin
def test_colin27_split_is_another_subject_at_the_same_positions(colin):
    _check_shapes(colin)
    assert (colin.train_subject, colin.test_subject) == ("MNI152", "Colin27")
    assert "Colin27" in colin.source and "MNI152" in colin.source and "intensity-based" in colin.source
    # every MNI152 training slice has its Colin27 counterpart at the same MNI z (mm), every 2 mm
    assert torch.equal(colin.z_test, colin.z_train) and len(colin.z_test) == 60
    assert torch.all(torch.diff(colin.z_test) == 2) and float(colin.z_test[0]) == -48 and float(colin.z_test[-1]) == 70
    # a different brain: the images at the same z differ clearly, not just by a resampling
    assert float((colin.x_test - colin.x_train).abs().mean()) > 0.05
    # the same intensity scale: brain-tissue medians agree (measured 0.773 MNI152, 0.771 Colin27)
    med = [float(x[:, 0][y > 0].median()) for x, y in ((colin.x_train, colin.y_train), (colin.x_test, colin.y_test))]
    assert abs(med[0] - med[1]) < 0.05


@needs_colin
def test_colin27_labels_agree_with_mni152_labels_at_the_same_z(colin):
    # measured: CSF 0.29, GM 0.67, WM 0.65 (different anatomy and a different label definition)
    dice = dice_per_class(colin.y_test, colin.y_train)
    assert float(dice[0]) > 0.2 and float(dice[1]) > 0.55 and float(dice[2]) > 0.55
    # the floors catch swapped classes and misaligned slices
    swapped = colin.y_test.clone()
    swapped[colin.y_test == 2], swapped[colin.y_test == 3] = 3, 2
    assert float(dice_per_class(swapped, colin.y_train)[1:].max()) < 0.55
    assert float(dice_per_class(colin.y_test[5:], colin.y_train[:-5])[1:].min()) < 0.55  # 10 mm off in z
    # brain masks overlap well (one subject in the other's space, through the NIfTI affines)
    fg = (colin.y_test > 0) & (colin.y_train > 0)
    assert float(2 * fg.sum() / ((colin.y_test > 0).sum() + (colin.y_train > 0).sum())) > 0.9


def test_kmeans_labels_are_sorted_dark_to_bright():
    g = np.random.default_rng(0)
    v = np.concatenate([g.normal(m, 3.0, n) for m, n in ((50, 200), (85, 900), (110, 700))])
    assert np.allclose(kmeans_1d(v), [50, 85, 110], atol=2)
    lab, thr = brain.colin27_tissue_labels(np.array([[[0.0, 50, 85, 110]]]), np.array([[[False, True, True, True]]]))
    assert lab.tolist() == [[[0, 1, 2, 3]]] and thr[0] < thr[1]


def test_slab_split_holds_out_a_contiguous_slab_far_from_training(slab):
    _check_shapes(slab)
    assert slab.test_subject.startswith("MNI152") and "slab" in slab.source
    assert float((slab.z_train[:, None] - slab.z_test[None, :]).abs().min()) > brain.SLAB_MARGIN_MM
    assert torch.all(torch.diff(slab.z_test) == 2)  # contiguous, every 2 mm
    assert len(slab.z_test) >= 10 and len(slab.z_train) >= 30
    assert float(slab.z_test.min()) > float(slab.z_train.min()) and float(slab.z_test.max()) < float(slab.z_train.max())


def test_missing_colin27_raises_or_falls_back_to_the_slab(tmp_path, monkeypatch):
    with pytest.raises(DataUnavailable, match="mricron-data"):
        load_brain_slices(64, test="colin27", root=tmp_path)
    monkeypatch.setenv("HYPERLOOM_MRICRON", str(tmp_path))
    with pytest.raises(DataUnavailable, match="mricron-data"):
        load_brain_slices(64, test="colin27")
    d = load_brain_slices(64, test="auto")
    assert "fell back to the slab" in d.source and "mricron-data" in d.source and "held-out MNI152 slab" in d.source
    assert d.test_subject != "Colin27"
    assert torch.equal(d.z_test, load_brain_slices(64, test="slab").z_test)
    with pytest.raises(ValueError):
        load_brain_slices(64, test="colin")


def test_every_segmentation_variant_gets_the_same_mapped_input():
    """Design fix 2: default and encoding-only see the same u = 2 phi; only default-rawphi keeps raw phi."""
    from experiments.common import FORMULATIONS

    for v in FORMULATIONS:
        model = segment.build(v, {})
        assert list(model.inputs) == ["u"] and (model.inputs["u"].low, model.inputs["u"].high) == (0.0, 1.0)
        assert segment.conditioning(v, 0.2) == {"u": 0.4}
    raw = segment.build("default-rawphi", {})
    assert list(raw.inputs) == ["phi"] and segment.conditioning("default-rawphi", 0.2) == {"phi": 0.2}
    # same init: for phi = 0.2 the raw default's trunk sees 0.2, the mapped default's sees u = 0.4
    torch.manual_seed(0)
    mapped = segment.build("default", {})
    torch.manual_seed(0)
    raw = segment.build("default-rawphi", {})
    with torch.no_grad():
        d_raw, d_same, d_mapped = raw.delta(phi=0.2), mapped.delta(u=0.2), mapped.delta(**segment.conditioning("default", 0.2))
    assert all(torch.allclose(d_raw[k], d_same[k]) for k in d_raw)
    assert not any(torch.allclose(d_raw[k], d_mapped[k]) for k in d_raw if "weight" in k)


def test_registration_lambda_oversamples_the_ends_and_plain_uses_its_fixed_lambda():
    """Design fix 6: HyperMorph's oversampling of lambda = 0 and 1 (10 % each with ends=0.2)."""
    gen = torch.Generator().manual_seed(0)
    lam = torch.stack([register.draw_lambda("mip", register.DEFAULTS, gen) for _ in range(4000)])
    n = len(lam)
    for end in (0.0, 1.0):
        frac = float((lam == end).float().mean())
        assert abs(frac - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n), (end, frac)
    inner = lam[(lam > 0) & (lam < 1)]
    assert abs(float(inner.mean()) - 0.5) < 0.03 and float(inner.min()) < 0.05 and float(inner.max()) > 0.95
    assert float(register.draw_lambda("plain", {**register.DEFAULTS, "plain_lambda": 0.3}, gen)) == pytest.approx(0.3)


def test_registration_reports_dice_at_the_best_lambda(data):
    torch.manual_seed(0)
    model = register.build("mip", {})
    m = register.evaluate(model, data, {**register.DEFAULTS, "n_eval": 4, "val_split": None}, 0)
    best = max(range(len(m["dice_by_lambda"])), key=m["dice_by_lambda"].__getitem__)
    assert m["dice_best"] == max(m["dice_by_lambda"]) and m["lambda_best"] == register.DEFAULTS["lambdas"][best]
    assert len(m["smoothness_by_lambda"]) == len(register.DEFAULTS["lambdas"])
    assert "val_dice_best" not in m


def test_registration_chooses_lambda_on_validation_slices_and_reports_test_there(data):
    torch.manual_seed(0)
    model = register.build("mip", {})
    m = register.evaluate(model, data, {**register.DEFAULTS, "n_eval": 4}, 0)
    lams = register.DEFAULTS["lambdas"]
    vbest = max(range(len(lams)), key=m["val_dice_by_lambda"].__getitem__)
    assert m["lambda_best"] == lams[vbest] and m["val_dice_best"] == max(m["val_dice_by_lambda"])
    assert m["dice_best"] == m["dice_by_lambda"][vbest]  # test Dice at the validation choice
    assert m["dice_best_test_chosen"] == max(m["dice_by_lambda"]) >= m["dice_best"]
    val, test = register.val_split(data)
    assert len(val.x_test) + len(test.x_test) == len(data.x_test)
    assert set(val.z_test.tolist()).isdisjoint(test.z_test.tolist())  # no slice in both


def test_segmentation_records_per_class_and_validation_dice(data):
    torch.manual_seed(0)
    m = segment.evaluate(segment.build("mip", {}), data, {**segment.DEFAULTS, "phis": [0.0, 0.5]}, 0, "mip")
    assert len(m["dice_by_class"]) == 3 and 0.0 <= m["val_dice"] <= 1.0
    assert m["dice"] == pytest.approx(sum(m["dice_by_class"]) / 3, abs=1e-6)


def test_segmentation_loss_choice_and_relative_step(data):
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 4, 8, 8), torch.randint(0, 4, (2, 8, 8))
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert segment.seg_loss(logits, labels, "dice_ce") == pytest.approx(float(segment.soft_dice_loss(logits, labels) + ce))
    with pytest.raises(ValueError, match="dice_ce"):
        segment.seg_loss(logits, labels, "focal")
    res = segment.run("mip", 0, data, {"steps": 2, "loss": "dice_ce", "phis": [0.0]})
    assert 0.0 < res["metrics"]["rel_step_first10"] < 1.0


def test_attribution_and_full_lr_studies():
    from experiments.__main__ import study_runs

    runs = study_runs("segment", {"steps": 10, "lr": 1e-3}, ["segattr"])
    arms = {lv: (v, c) for _, _, lv, c, v in runs}
    assert len(arms) == 9 and arms["mip-lr2e-4"] == ("mip", {"steps": 10, "lr": 2e-4})
    assert arms["plain-dice_ce"][1]["loss"] == "dice_ce" and arms["mip-zeroinit"][1]["zero_init"] is True
    assert study_runs("classify", {"steps": 10}, ["segattr"]) == []
    lr = study_runs("register", {"steps": 10, "lr": 1e-3}, ["lrfull"])
    assert len(lr) == 25 and {c["lr"] for *_, c, _ in lr} == {1e-4, 3e-4, 1e-3, 3e-3, 1e-2}
