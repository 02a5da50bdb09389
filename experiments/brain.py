"""2D brain MRI slices with tissue labels, from the MNI ICBM152 2009a template shipped in PyPI ``nilearn``.

Labels: 0 background, 1 CSF (brain mask minus grey and white matter), 2 grey
matter, 3 white matter, from the template's probability maps (argmax). Train
and test slices come from interleaved blocks of axial slices, so test anatomy
is never seen in training. Random smooth warps (a coarse Gaussian displacement
grid, upsampled) make registration pairs and augment segmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .data import DataUnavailable

NUM_LABELS = 4
LABEL_NAMES = ("background", "CSF", "grey matter", "white matter")


@dataclass
class BrainSlices:
    """Images ``(N, 1, S, S)`` in [0, 1] and labels ``(N, S, S)`` for train and test slices."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: str
    #: Axial position of each slice in mm (``None``: unknown; pairs then fall back to index offsets).
    z_train: torch.Tensor | None = None
    z_test: torch.Tensor | None = None


_CACHE: dict[tuple[int, int], BrainSlices] = {}


def load_mni152_slices(size: int = 64, step: int = 2) -> BrainSlices:
    """Axial slices of the MNI152 template, cropped to the brain and resized to ``size x size``."""
    key = (size, step)
    if key in _CACHE:
        return _CACHE[key]
    try:
        from nilearn import datasets
    except ImportError as e:
        raise DataUnavailable("Brain MRI data needs 'pip install nilearn' (ships the MNI152 template)") from e
    t1 = np.asarray(datasets.load_mni152_template(resolution=1).get_fdata(), dtype=np.float32)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).get_fdata(), dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), dtype=np.float32)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=1).get_fdata(), dtype=np.float32)
    csf = np.clip(mask - gm - wm, 0.0, 1.0) * mask
    probs = np.stack([1.0 - mask, csf, gm * mask, wm * mask])  # (4, X, Y, Z)

    area = mask.sum((0, 1))
    zs = [z for z in range(0, mask.shape[2], step) if area[z] > 0.25 * area.max()]
    xs, ys = np.nonzero(mask.max(2) > 0)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    side = max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2

    def crop(a: np.ndarray) -> torch.Tensor:
        pad = [(0, 0)] * (a.ndim - 3) + [(side, side), (side, side), (0, 0)]
        a = np.pad(a, pad)
        sx, sy = cx + side - side // 2, cy + side - side // 2
        a = a[..., sx : sx + side, sy : sy + side, :]
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 0)))  # (Z, ..., side, side)

    img = crop(t1[..., zs]).unsqueeze(1)  # (Z, 1, side, side)
    pr = crop(probs[..., zs])  # (Z, 4, side, side)
    img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    pr = F.interpolate(pr, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    img = (img / img.amax()).clamp(0, 1)
    lab = pr.argmax(1)
    blocks = np.arange(len(zs)) // 4
    test = torch.from_numpy(blocks % 4 == 2)
    z = torch.tensor(zs, dtype=torch.float64)  # 1 mm voxels: slice index = position in mm
    out = BrainSlices(img[~test], lab[~test], img[test], lab[test], "MNI152 2009a (nilearn)", z[~test], z[test])
    _CACHE[key] = out
    return out


def random_smooth_warp(n: int, size: int, strength: float, gen: torch.Generator, grid: int = 5) -> torch.Tensor:
    """Random smooth displacement fields ``(n, 2, size, size)`` in normalised [-1, 1] units."""
    coarse = torch.randn(n, 2, grid, grid, generator=gen) * strength
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)


def identity_grid(n: int, size: int, device: torch.device | None = None) -> torch.Tensor:
    theta = torch.eye(2, 3, device=device).unsqueeze(0).expand(n, 2, 3)
    return F.affine_grid(theta, [n, 1, size, size], align_corners=True)


def warp(img: torch.Tensor, disp: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Warp ``img (N, C, S, S)`` by displacement ``disp (N, 2, S, S)`` (normalised units, channels x then y)."""
    grid = identity_grid(img.shape[0], img.shape[-1], img.device) + disp.permute(0, 2, 3, 1)
    return F.grid_sample(img, grid, mode=mode, padding_mode="border", align_corners=True)


def one_hot(labels: torch.Tensor) -> torch.Tensor:
    return F.one_hot(labels, NUM_LABELS).permute(0, 3, 1, 2).float()


def dice_per_class(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard Dice per foreground class, averaged over the batch: ``(NUM_LABELS - 1,)``."""
    out = []
    for c in range(1, NUM_LABELS):
        p, t = pred == c, target == c
        inter = (p & t).sum((1, 2)).float()
        denom = (p.sum((1, 2)) + t.sum((1, 2))).float()
        out.append(torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom)).mean())
    return torch.stack(out)
