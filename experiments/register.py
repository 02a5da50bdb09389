"""Task 2: HyperMorph — unsupervised 2D registration of brain MRI slices, conditioned on lambda.

A small U-Net predicts a displacement field from (moving, fixed); a spatial
transformer warps the moving image; the loss is (1 - lambda) * MSE(warped,
fixed) / sigma^2 + lambda * |grad u|^2 (sigma = 0.1), with lambda drawn per step as the
hypernetwork input (all layers but the final flow layer are predicted): uniform on [0, 1], with the
end points lambda = 0 and 1 oversampled as HyperMorph does (``hl.sample(..., ends=0.2)``: 10 % each).
The plain network (no hypernetwork) is trained at one fixed lambda (``plain_lambda``).
Pairs: slices up to 3 slices (6 mm) apart, each deformed by its own random smooth warp. Metrics on held-out slices: Dice of
the warped tissue labels and the percentage of folding pixels (Jacobian <= 0),
both as a function of lambda.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import hyperloom as hl

from .brain import BrainSlices, dice_per_class, load_brain_slices, one_hot, random_smooth_warp, warp
from .common import build_variant, flat_weights, grad_norm_by_condition, is_plain, set_seed, trace_probe, train_and_evaluate


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.LeakyReLU(0.2))


class RegUNet(nn.Module):
    """A VoxelMorph-style 2D U-Net: (moving, fixed) -> displacement (2 channels, normalised units)."""

    def __init__(self, ch: tuple[int, ...] = (8, 16, 16)) -> None:
        super().__init__()
        self.down = nn.ModuleList()
        cin = 2
        for c in ch:
            self.down.append(_block(cin, c))
            cin = c
        self.bottom = _block(cin, cin)
        self.up = nn.ModuleList()
        for c in reversed(ch):
            self.up.append(_block(cin + c, c))
            cin = c
        self.flow = nn.Conv2d(cin, 2, 3, padding=1)
        with torch.no_grad():  # VoxelMorph: a near-zero initial flow
            self.flow.weight.normal_(0.0, 1e-5)
            self.flow.bias.zero_()

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        x = torch.cat([moving, fixed], 1)
        skips = []
        for blk in self.down:
            x = blk(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottom(x)
        for blk in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = blk(torch.cat([x, skip], 1))
        return self.flow(x)


def reg_loss(model: nn.Module, mov: torch.Tensor, fix: torch.Tensor, lam: Any, sigma: float) -> torch.Tensor:
    """(1 - lambda) * MSE(warped, fixed) / sigma^2 + lambda * |grad u|^2."""
    disp = model(mov, fix, lam=lam)
    return (1 - lam) * F.mse_loss(warp(mov, disp), fix) / sigma**2 + lam * smoothness(disp)


def smoothness(disp: torch.Tensor) -> torch.Tensor:
    """Mean squared finite-difference gradient of the displacement, in pixel units."""
    s = disp.shape[-1]
    u = disp * (s - 1) / 2  # normalised -> pixels
    dx = u[..., 1:, :] - u[..., :-1, :]
    dy = u[..., :, 1:] - u[..., :, :-1]
    return dx.pow(2).mean() + dy.pow(2).mean()


def folding_fraction(disp: torch.Tensor) -> torch.Tensor:
    """Fraction of pixels whose deformation x + u(x) has Jacobian determinant <= 0, per sample."""
    s = disp.shape[-1]
    u = disp * (s - 1) / 2
    ux, uy = u[:, 0], u[:, 1]  # x = width direction (last dim), y = height direction
    dux_dx = ux[:, 1:-1, 2:] / 2 - ux[:, 1:-1, :-2] / 2
    dux_dy = ux[:, 2:, 1:-1] / 2 - ux[:, :-2, 1:-1] / 2
    duy_dx = uy[:, 1:-1, 2:] / 2 - uy[:, 1:-1, :-2] / 2
    duy_dy = uy[:, 2:, 1:-1] / 2 - uy[:, :-2, 1:-1] / 2
    jac = (1 + dux_dx) * (1 + duy_dy) - dux_dy * duy_dx
    return (jac <= 0).float().mean((1, 2))


#: Largest distance between the two slices of a registration pair (3 slices of the 2 mm sampling).
MAX_PAIR_MM = 6.0


def pair_partners(z: torch.Tensor, i: torch.Tensor, gen: torch.Generator, max_mm: float = MAX_PAIR_MM) -> torch.Tensor:
    """For each slice index in ``i``, a partner drawn uniformly among the slices at most ``max_mm`` away (itself included).

    Distances are measured in mm on the slices' own positions ``z``, so gaps between the blocks of a split
    never make a pair: the partner of a slice at a block's edge comes from its own block.
    """
    near = ((z[:, None] - z[None, :]).abs() <= max_mm).to(torch.float64)
    return torch.multinomial(near[i], 1, generator=gen).squeeze(1)


def make_pairs(
    data: BrainSlices, n: int, gen: torch.Generator, *, test: bool, warp_strength: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` (moving, fixed, moving labels, fixed labels) from slices at most 6 mm apart, each warped."""
    x, y = (data.x_test, data.y_test) if test else (data.x_train, data.y_train)
    z = data.z_test if test else data.z_train
    i = torch.randint(0, len(x), (n,), generator=gen)
    if z is None:  # positions unknown: neighbouring indices
        j = (i + torch.randint(-3, 4, (n,), generator=gen)).clamp(0, len(x) - 1)
    else:
        j = pair_partners(z, i, gen)
    s = x.shape[-1]
    dm = random_smooth_warp(n, s, warp_strength, gen)
    df = random_smooth_warp(n, s, warp_strength, gen)
    mov, fix = warp(x[i], dm), warp(x[j], df)
    ym = warp(one_hot(y[i]), dm).argmax(1)
    yf = warp(one_hot(y[j]), df).argmax(1)
    return mov, fix, ym, yf


DEFAULTS: dict[str, Any] = {
    "steps": 300,
    "batch": 8,
    "optimizer": "adam",
    "lr": 1e-3,
    "hidden": [16, 64, 128],
    "activation": "leaky_relu",
    "size": 64,
    "warp_strength": 0.04,
    "image_sigma": 0.1,  # similarity = MSE / sigma^2, as VoxelMorph's image_sigma
    "n_eval": 48,
    "lambdas": [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0],
    "encoding": None,
    "theta0": "init",  # the method's theta0 init (Kaiming fan-in weights, zero biases); "model": PyTorch's
    "lambda_ends": 0.2,  # probability of drawing lambda = 0 or 1 (half each), HyperMorph's oversampling
    "plain_lambda": 0.2,  # the fixed lambda of the plain network
    "probes": 10,  # trace points over training
    # the test subject's slices in blocks of 4, alternately validation (choose lambda) and test (report)
    "val_split": "blocks4",
}

SIZES: dict[str, dict[str, Any]] = {
    "quick": {"steps": 200, "n_eval": 32, "probes": 5},
    "full": {"steps": 1000, "n_eval": 128},  # 5x quick
}


def load_data(args: Any) -> BrainSlices:
    return load_brain_slices(DEFAULTS["size"])


def draw_lambda(variant: str, cfg: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
    """A training step's lambda: ``plain_lambda`` for the plain network; otherwise uniform on [0, 1] with
    probability ``lambda_ends`` on the end points (half each), HyperMorph's oversampling of the extremes."""
    if is_plain(variant):
        return torch.tensor(float(cfg["plain_lambda"]))
    return hl.sample({"lam": (0.0, 1.0)}, generator=gen, ends=cfg["lambda_ends"])["lam"]


def build(variant: str, cfg: dict[str, Any]) -> nn.Module:
    cfg = {**DEFAULTS, **cfg}
    # Every conv layer but the final flow layer is predicted: the flow layer keeps VoxelMorph's near-zero
    # init in all variants, so each starts from (almost) no displacement. Predicting it too starts MIP
    # with displacements that push the image out of the field of view, where grid_sample has no gradient.
    return build_variant(variant, cfg, RegUNet(), {"lam": (0.0, 1.0)}, predict=["down", "bottom", "up"])


def val_split(data: BrainSlices) -> tuple[BrainSlices, BrainSlices]:
    """(validation, test): the test subject's slices in blocks of 4, alternately (as ``experiments tune``)."""
    block = torch.arange(len(data.x_test)) // 4
    zt = data.z_test

    def mk(m: torch.Tensor) -> BrainSlices:
        return dataclasses.replace(data, x_test=data.x_test[m], y_test=data.y_test[m], z_test=None if zt is None else zt[m])

    return mk(block % 2 == 0), mk(block % 2 == 1)


@torch.no_grad()
def _dice_by_lambda(model: nn.Module, pairs: tuple[torch.Tensor, ...], lambdas: list[float]) -> list[float]:
    mov, fix, ym, yf = pairs
    return [float(dice_per_class(warp(one_hot(ym), model(mov, fix, lam=lam)).argmax(1), yf).mean()) for lam in lambdas]


@torch.no_grad()
def evaluate(model: nn.Module, data: BrainSlices, cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """Test metrics over lambda; ``dice_best`` is the test Dice at the lambda that is best on the validation
    slices (with ``cfg["val_split"]``; without, at the lambda best on the test pairs themselves, as before)."""
    val = None
    if cfg.get("val_split"):
        val, data = val_split(data)
    gen = torch.Generator().manual_seed(30_000 + seed)
    mov, fix, ym, yf = make_pairs(data, cfg["n_eval"], gen, test=True, warp_strength=cfg["warp_strength"])
    dice, fold, smooth = [], [], []
    for lam in cfg["lambdas"]:
        disp = model(mov, fix, lam=lam)
        warped_labels = warp(one_hot(ym), disp).argmax(1)
        dice.append(float(dice_per_class(warped_labels, yf).mean()))
        fold.append(100 * float(folding_fraction(disp).mean()))
        smooth.append(float(smoothness(disp)))
    oracle = max(range(len(dice)), key=dice.__getitem__)
    extra: dict[str, Any] = {}
    best = oracle
    if val is not None:
        vpairs = make_pairs(val, cfg["n_eval"], torch.Generator().manual_seed(35_000 + seed), test=True, warp_strength=cfg["warp_strength"])
        vdice = _dice_by_lambda(model, vpairs, cfg["lambdas"])
        best = max(range(len(vdice)), key=vdice.__getitem__)
        extra = {"val_dice_best": vdice[best], "val_dice_by_lambda": vdice, "dice_best_test_chosen": dice[oracle]}
    return {
        **extra,
        "dice": sum(dice) / len(dice),
        "dice_best": dice[best],
        "lambda_best": cfg["lambdas"][best],
        "folding_pct": sum(fold) / len(fold),
        "dice_by_lambda": dice,
        "dice_by_lambda_x": cfg["lambdas"],
        "folding_by_lambda": fold,
        "folding_by_lambda_x": cfg["lambdas"],
        "smoothness_by_lambda": smooth,
        "smoothness_by_lambda_x": cfg["lambdas"],
        "dice_unregistered": float(dice_per_class(ym, yf).mean()),
    }


def run(
    variant: str, seed: int, data: BrainSlices, cfg: dict[str, Any], *, desc: str = "", checkpoint: Path | None = None
) -> dict[str, Any]:
    cfg = {**DEFAULTS, **cfg}
    set_seed(seed)
    model = build(variant, cfg)

    def make_step_loss(gen: torch.Generator) -> Callable[[int], torch.Tensor]:
        def step_loss(step: int) -> torch.Tensor:
            mov, fix, _, _ = make_pairs(data, cfg["batch"], gen, test=False, warp_strength=cfg["warp_strength"])
            lam = draw_lambda(variant, cfg, gen)
            return reg_loss(model, mov, fix, lam, cfg["image_sigma"])

        return step_loss

    def evaluate_all() -> dict[str, Any]:
        metrics = evaluate(model, data, cfg, seed)
        pgen = torch.Generator().manual_seed(50_000 + seed)
        mov, fix, _, _ = make_pairs(data, 16, pgen, test=True, warp_strength=cfg["warp_strength"])
        bins = [0.1, 0.3, 0.5, 0.7, 0.9]
        metrics["grad_norm_by_gamma"] = grad_norm_by_condition(model, lambda lam: reg_loss(model, mov, fix, lam, cfg["image_sigma"]), bins)
        metrics["grad_norm_by_gamma_x"] = bins
        return metrics

    pmov, pfix, _, _ = make_pairs(data, 8, torch.Generator().manual_seed(60_000 + seed), test=False, warp_strength=cfg["warp_strength"])
    bins = [0.1, 0.3, 0.5, 0.7, 0.9]

    # the validation curve (the trace's "val"): the best Dice over lambda on 16 validation pairs (as
    # ``val_dice_best``, on fewer pairs); its own generator, so training is the same with or without it
    vpairs = None
    if cfg.get("val_split"):
        vgen = torch.Generator().manual_seed(36_000 + seed)
        vpairs = make_pairs(val_split(data)[0], 16, vgen, test=True, warp_strength=cfg["warp_strength"])

    def probe() -> dict[str, Any]:
        val = {} if vpairs is None else {"val": max(_dice_by_lambda(model, vpairs, cfg["lambdas"]))}
        return val | trace_probe(
            model,
            lambda lam: model(pmov, pfix, lam=lam),
            lambda lam: reg_loss(model, pmov, pfix, lam, cfg["image_sigma"]),
            lambda lam: {"lam": lam},
            bins,
        )

    weights = lambda: flat_weights(model, {"lam": 0.5})  # noqa: E731
    out = train_and_evaluate(model, cfg, seed, make_step_loss, evaluate_all, desc=desc, checkpoint=checkpoint, probe=probe, weights=weights)
    return {**out, "data": data.source}
