"""Task 3: scale-space hypernetwork — segmentation U-Net with a continuous internal rescaling factor.

Between U-Net levels the features are resized by the factor (1 - phi) instead of
a fixed 2x pooling, with phi ~ U(0, 0.5) sampled per step: phi = 0.5 is the usual
U-Net, phi -> 0 keeps full resolution (more compute). Every variant's
hypernetwork gets the same input u = 2 phi in [0, 1], so the variants differ
only in encoding and output (the variant ``default-rawphi`` keeps the raw phi
in [0, 0.5] the quick reproduction first used). Task: tissue segmentation
(background, CSF, grey matter, white matter) of MNI152 slices under random
smooth warps and intensity jitter; loss: soft Dice; metric: hard Dice on
held-out slices as a function of phi.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .brain import NUM_LABELS, BrainSlices, dice_per_class, load_brain_slices, one_hot, random_smooth_warp, warp
from .common import VARIANTS, build_variant, flat_weights, grad_norm_by_condition, set_seed, trace_probe, train_and_evaluate


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.LeakyReLU(0.2))


class ScaleUNet(nn.Module):
    """U-Net whose levels are resized by ``scale`` (a float in [0.5, 1]) rather than by 2."""

    def __init__(self, ch: tuple[int, ...] = (8, 16, 16), classes: int = NUM_LABELS) -> None:
        super().__init__()
        self.down = nn.ModuleList()
        cin = 1
        for c in ch:
            self.down.append(_block(cin, c))
            cin = c
        self.bottom = _block(cin, cin)
        self.up = nn.ModuleList()
        for c in reversed(ch):
            self.up.append(_block(cin + c, c))
            cin = c
        self.out = nn.Conv2d(cin, classes, 1)

    def forward(self, x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
        skips = []
        for blk in self.down:
            x = blk(x)
            skips.append(x)
            size = [max(2, round(s * scale)) for s in x.shape[-2:]]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        x = self.bottom(x)
        for blk in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = blk(torch.cat([x, skip], 1))
        return self.out(x)


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    p = logits.softmax(1)
    t = one_hot(labels)
    inter = (p * t).sum((2, 3))
    denom = p.sum((2, 3)) + t.sum((2, 3))
    return 1 - ((2 * inter + 1e-5) / (denom + 1e-5)).mean()


def seg_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str = "soft_dice") -> torch.Tensor:
    """The training loss: ``"soft_dice"`` (the paper's) or ``"dice_ce"`` (soft Dice + cross-entropy, the usual
    remedy for a class that the soft Dice lets collapse)."""
    if kind == "soft_dice":
        return soft_dice_loss(logits, labels)
    if kind == "dice_ce":
        return soft_dice_loss(logits, labels) + F.cross_entropy(logits, labels)
    raise ValueError(f"Unknown segmentation loss {kind!r}; choose 'soft_dice' or 'dice_ce'")


def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    d = random_smooth_warp(x.shape[0], x.shape[-1], strength, gen)
    xw = warp(x, d)
    yw = warp(one_hot(y), d).argmax(1)
    gain = 1 + 0.2 * (torch.rand(x.shape[0], 1, 1, 1, generator=gen) - 0.5)
    noise = 0.02 * torch.randn(xw.shape, generator=gen)
    return (xw * gain + noise).clamp(0, 1), yw


DEFAULTS: dict[str, Any] = {
    "steps": 300,
    "batch": 8,
    "optimizer": "adam",
    "lr": 1e-3,
    "hidden": [16, 64, 128],
    "activation": "leaky_relu",
    "size": 64,
    "warp_strength": 0.04,
    "phis": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
    "encoding": None,
    "theta0": "init",  # the method's theta0 init (Kaiming fan-in weights, zero biases); "model": PyTorch's
    "probes": 10,  # trace points over training
    # the test subject's slices in blocks of 4, alternately validation (choose a learning rate) and test (report)
    "val_split": "blocks4",
}

SIZES: dict[str, dict[str, Any]] = {
    "quick": {"steps": 150, "probes": 5},
    "full": {"steps": 750},  # 5x quick
}


def load_data(args: Any) -> BrainSlices:
    return load_brain_slices(DEFAULTS["size"])


def build(variant: str, cfg: dict[str, Any]) -> nn.Module:
    """The scale-space U-Net of one variant (call it with ``scale=1 - phi, **conditioning(variant, phi)``)."""
    cfg = {**DEFAULTS, **cfg}
    inputs = {"phi": (0.0, 0.5)} if VARIANTS[variant].get("raw_input") else {"u": (0.0, 1.0)}
    return build_variant(variant, cfg, ScaleUNet(), inputs)


def conditioning(variant: str, phi: Any) -> dict[str, Any]:
    """The hypernetwork's input for ``phi``: ``u = 2 phi`` for every variant but ``default-rawphi``."""
    return {"phi": phi} if VARIANTS[variant].get("raw_input") else {"u": 2 * phi}


@torch.no_grad()
def _dice(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: dict[str, Any], variant: str) -> tuple[list[float], list[float]]:
    """(Dice per phi averaged over classes, Dice per class averaged over phi)."""
    dice, per_class = [], torch.zeros(NUM_LABELS - 1)
    for phi in cfg["phis"]:
        pred = model(x, scale=1 - phi, **conditioning(variant, phi)).argmax(1)
        d = dice_per_class(pred, y)
        dice.append(float(d.mean()))
        per_class += d
    return dice, (per_class / len(cfg["phis"])).tolist()


@torch.no_grad()
def evaluate(model: nn.Module, data: BrainSlices, cfg: dict[str, Any], seed: int, variant: str = "mip") -> dict[str, Any]:
    """Test Dice per phi and per class; with ``cfg["val_split"]`` also the validation Dice (the test subject's
    other slices), on which a learning rate is chosen."""
    extra: dict[str, Any] = {}
    if cfg.get("val_split"):
        from .register import val_split

        val, data = val_split(data)
        vx, vy = augment(val.x_test, val.y_test, torch.Generator().manual_seed(45_000 + seed), cfg["warp_strength"])
        vdice, _ = _dice(model, vx, vy, cfg, variant)
        extra["val_dice"] = sum(vdice) / len(vdice)
    gen = torch.Generator().manual_seed(40_000 + seed)
    x, y = augment(data.x_test, data.y_test, gen, cfg["warp_strength"])
    dice, per_class = _dice(model, x, y, cfg, variant)
    return {
        **extra,
        "dice_by_class": per_class,
        "dice": sum(dice) / len(dice),
        "dice_spread": max(dice) - min(dice),
        "dice_by_phi": dice,
        "dice_by_phi_x": cfg["phis"],
    }


def run(
    variant: str, seed: int, data: BrainSlices, cfg: dict[str, Any], *, desc: str = "", checkpoint: Path | None = None
) -> dict[str, Any]:
    cfg = {**DEFAULTS, **cfg}
    set_seed(seed)
    model = build(variant, cfg)

    def make_step_loss(gen: torch.Generator) -> Callable[[int], torch.Tensor]:
        def step_loss(step: int) -> torch.Tensor:
            idx = torch.randint(0, len(data.x_train), (cfg["batch"],), generator=gen)
            x, y = augment(data.x_train[idx], data.y_train[idx], gen, cfg["warp_strength"])
            phi = 0.5 * float(torch.rand((), generator=gen))
            return seg_loss(model(x, scale=1 - phi, **conditioning(variant, phi)), y, cfg.get("loss", "soft_dice"))

        return step_loss

    def evaluate_all() -> dict[str, Any]:
        metrics = evaluate(model, data, cfg, seed, variant)
        x, y = augment(data.x_test, data.y_test, torch.Generator().manual_seed(50_000 + seed), cfg["warp_strength"])
        bins = [0.05, 0.15, 0.25, 0.35, 0.45]
        metrics["grad_norm_by_gamma"] = grad_norm_by_condition(
            model, lambda phi: soft_dice_loss(model(x, scale=1 - phi, **conditioning(variant, phi)), y), bins
        )
        metrics["grad_norm_by_gamma_x"] = bins
        return metrics

    # trace: a fixed batch of augmented training slices; the output variation holds the U-Net's
    # scale at 0.75 and varies only the hypernetwork's input, so it measures what the weights do with phi
    px, py = augment(data.x_train[:8], data.y_train[:8], torch.Generator().manual_seed(60_000 + seed), cfg["warp_strength"])
    bins = [0.05, 0.15, 0.25, 0.35, 0.45]

    # the validation curve (the trace's "val"): Dice on the validation slices at 3 phis (as ``val_dice``, at fewer
    # phis), with its per-class Dice; its own generator, so training is the same with or without it
    vxy = None
    if cfg.get("val_split"):
        from .register import val_split

        val = val_split(data)[0]
        vxy = augment(val.x_test, val.y_test, torch.Generator().manual_seed(46_000 + seed), cfg["warp_strength"])

    def probe() -> dict[str, Any]:
        vd: dict[str, Any] = {}
        if vxy is not None:
            with torch.no_grad():
                dice, per_class = _dice(model, *vxy, {**cfg, "phis": [0.05, 0.25, 0.45]}, variant)
            vd = {"val": sum(dice) / len(dice), "val_by_class": per_class}
        return vd | trace_probe(
            model,
            lambda phi: model(px, scale=0.75, **conditioning(variant, phi)),
            lambda phi: soft_dice_loss(model(px, scale=1 - phi, **conditioning(variant, phi)), py),
            lambda phi: conditioning(variant, phi),
            bins,
        )

    weights = lambda: flat_weights(model, conditioning(variant, 0.25))  # noqa: E731
    out = train_and_evaluate(model, cfg, seed, make_step_loss, evaluate_all, desc=desc, checkpoint=checkpoint, probe=probe, weights=weights)
    return {**out, "data": data.source}
