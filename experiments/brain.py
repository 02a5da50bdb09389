"""2D axial brain MRI slices with tissue labels: train on one brain, test on another (or on a held-out slab).

Training subject: the MNI ICBM152 2009a template shipped in PyPI ``nilearn`` (skull-stripped: every voxel
outside its brain mask is 0). All axial slices every ``step`` mm whose brain area exceeds 25 % of the
largest are used, cropped to a square around the brain mask and resized. Labels: 0 background, 1 CSF
(brain mask minus grey and white matter), 2 grey matter, 3 white matter, the argmax of the template's
probability maps.

Test subject, ``load_brain_slices(test="colin27")`` (the default ``"auto"`` picks it when installed):
Colin27 (``ch2.nii.gz`` masked by the skull-stripped ``ch2bet.nii.gz`` > 0, from Debian ``mricron-data``,
181 x 217 x 181, 1 mm, MNI space), resampled linearly onto the MNI152 1 mm grid through the two NIfTI
affines, at the same MNI z positions as the training slices, with the same crop and resize. Both subjects'
intensities are divided by the 99th percentile of their brain-mask voxels and clamped to [0, 1]; on the
64 x 64 slices the brain-tissue percentiles (1, 5, 25, 50, 75, 95, 99) are MNI152 0.36 0.49 0.68 0.77
0.88 0.96 0.99 and Colin27 0.30 0.44 0.67 0.77 0.89 0.97 0.99.

Colin27 tissue labels are intensity based, deterministic: 3-class 1-D k-means on the T1 intensities inside
``ch2bet > 0`` (centres started at the 10/50/90th percentiles; centres 53.5 / 85.0 / 109.3, thresholds
69.3 and 97.1 in raw ch2 units), darkest cluster CSF, middle GM, brightest WM, background outside the mask.
The class maps are resampled like the image and argmaxed after the resize, like the MNI152 probability
maps. Measured agreement (size 64, step 2, 60 slices z in [-48, 70] mm):

* AAL atlas (``aal.nii.gz`` > 0, grey-matter regions): 53 % of its voxels are labelled GM, 29 % WM
  (deep nuclei and the bright cerebellar cortex), 9 % CSF, 10 % outside ``ch2bet``.
* Brain-mask Dice Colin27 vs MNI152 (3-D, same grid): 0.94.
* Per-class slice Dice Colin27 labels vs MNI152 labels at the same z: CSF 0.29, GM 0.67, WM 0.65.
* Label-definition shift, measured on MNI152 alone (the same k-means labelling of its own T1 vs its
  probability-map labels): slice Dice CSF 0.54, GM 0.89, WM 0.91; brain fractions CSF/GM/WM are
  8 / 58 / 34 % (probability maps) vs 15 / 48 / 38 % (k-means). Colin27's k-means labels are 11 / 48 / 40 %:
  the intensity labels call more voxels CSF and WM and fewer GM than the probability maps, so part of
  any test-Dice drop is this definition shift, not a failure to generalise to new anatomy.

``test="slab"`` (and ``"auto"`` without mricron-data): a contiguous held-out MNI152 slab (20 % of the
slices, starting 55 % of the way up: z in [18, 40] mm at step 2) is the test set; training slices are
more than 6 mm from every test slice. Either way ``BrainSlices.source`` says what was used.

Random smooth warps (a coarse Gaussian displacement grid, upsampled) make registration pairs and augment
segmentation.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import DataUnavailable

NUM_LABELS = 4
LABEL_NAMES = ("background", "CSF", "grey matter", "white matter")
MRICRON_DIR = "/usr/share/mricron/templates"
#: Training slices of the slab split are more than this far (mm) from every test slice.
SLAB_MARGIN_MM = 6.0
#: The slab split holds out this fraction of the selected slices, starting at ``SLAB_START`` of the way up.
SLAB_FRACTION, SLAB_START = 0.2, 0.55
_INTENSITY_PCT = 99.0
_TESTS = ("auto", "colin27", "slab")


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
    train_subject: str = "MNI152"
    test_subject: str = "MNI152"


@dataclass
class _Volume:
    """A brain on the MNI152 1 mm grid: intensities in [0, 1], per-class label maps ``(4, X, Y, Z)``."""

    t1: np.ndarray
    probs: np.ndarray
    mask: np.ndarray
    affine: np.ndarray


#: Finished slices only (the 3-D volumes, ~0.2 GB each, are not kept).
_CACHE: dict[tuple[int, int, str, str], BrainSlices] = {}


def mricron_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Where the Colin27 templates are looked for: ``root``, then ``$HYPERLOOM_MRICRON``, then the Debian path."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get("HYPERLOOM_MRICRON") or MRICRON_DIR)


def colin27_available(root: str | os.PathLike[str] | None = None) -> bool:
    d = mricron_root(root)
    return (d / "ch2.nii.gz").is_file() and (d / "ch2bet.nii.gz").is_file()


def _normalise(t1: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Divide by the 99th percentile of the brain-mask intensities, clamp to [0, 1]; zero outside the mask."""
    scale = float(np.percentile(t1[mask], _INTENSITY_PCT))
    return np.asarray(np.clip(t1 / scale, 0.0, 1.0) * mask, dtype=np.float32)


def _mni152() -> _Volume:
    try:
        from nilearn import datasets  # type: ignore[import-untyped]
    except ImportError as e:
        raise DataUnavailable("Brain MRI data needs 'pip install nilearn' (ships the MNI152 template)") from e
    img = datasets.load_mni152_template(resolution=1)
    t1 = np.asarray(img.get_fdata(), dtype=np.float32)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).get_fdata(), dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), dtype=np.float32)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=1).get_fdata(), dtype=np.float32)
    csf = np.clip(mask - gm - wm, 0.0, 1.0) * mask
    probs = np.stack([1.0 - mask, csf, gm * mask, wm * mask])  # (4, X, Y, Z)
    return _Volume(_normalise(t1, mask > 0), probs, mask > 0, np.asarray(img.affine, dtype=np.float64))


def _resample(a: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """Resample ``a`` (voxel grid ``src_affine``) onto the grid ``dst_affine`` / ``shape`` through world (mm) space."""
    from scipy import ndimage  # type: ignore[import-untyped]

    m = np.linalg.inv(src_affine) @ dst_affine  # destination voxel -> source voxel
    out = ndimage.affine_transform(a, m[:3, :3], offset=m[:3, 3], output_shape=shape, order=order, mode="constant", cval=0.0)
    return np.asarray(out, dtype=np.float32)


def kmeans_1d(values: np.ndarray, k: int = 3, iters: int = 100) -> np.ndarray:
    """Deterministic 1-D k-means (Lloyd, centres started at evenly spaced percentiles); sorted centres."""
    v = np.asarray(values, dtype=np.float64)
    c = np.percentile(v, np.linspace(10, 90, k))
    for _ in range(iters):
        lab = np.abs(v[:, None] - c[None, :]).argmin(1)
        new = np.array([v[lab == i].mean() if (lab == i).any() else c[i] for i in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return np.sort(c)


def colin27_tissue_labels(t1: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels 0 background (outside ``mask``) / 1 CSF / 2 GM / 3 WM by 3-class 1-D k-means on T1 intensity.

    Returns the label volume and the two thresholds (midpoints between the sorted cluster centres).
    """
    c = kmeans_1d(t1[mask])
    thr = (c[:-1] + c[1:]) / 2
    lab = np.zeros(t1.shape, dtype=np.int64)
    lab[mask] = 1 + np.searchsorted(thr, t1[mask])
    return lab, thr


def _colin27(root: Path, grid: _Volume) -> _Volume:
    import nibabel as nib

    ch2, bet = nib.load(root / "ch2.nii.gz"), nib.load(root / "ch2bet.nii.gz")
    if not (isinstance(ch2, nib.Nifti1Image) and isinstance(bet, nib.Nifti1Image)):
        raise DataUnavailable(f"{root}: ch2.nii.gz / ch2bet.nii.gz are not NIfTI-1 images")
    t1 = np.asarray(ch2.get_fdata(), dtype=np.float32)
    mask = np.asarray(bet.get_fdata(), dtype=np.float32) > 0
    if not np.allclose(ch2.affine, bet.affine):
        raise ValueError("ch2 and ch2bet are on different grids")
    lab, _ = colin27_tissue_labels(t1, mask)
    src = np.asarray(ch2.affine, dtype=np.float64)
    shape = grid.mask.shape
    t1n = _resample(_normalise(t1, mask), src, grid.affine, shape, order=1)
    probs = np.stack([_resample((lab == c).astype(np.float32), src, grid.affine, shape, order=1) for c in range(NUM_LABELS)])
    outside = probs.sum(0) < 0.5  # outside Colin's field of view: background
    probs[0][outside] = 1.0
    return _Volume(t1n, probs, probs[0] < 0.5, grid.affine)


def _slices(vol: _Volume, zs: list[int], box: tuple[int, int, int], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial slices ``zs`` (voxel indices) cropped to the square ``box`` (centre x, centre y, side), resized to ``size``."""
    cx, cy, side = box

    def crop(a: np.ndarray) -> torch.Tensor:
        pad = [(0, 0)] * (a.ndim - 3) + [(side, side), (side, side), (0, 0)]
        a = np.pad(a, pad)
        sx, sy = cx + side - side // 2, cy + side - side // 2
        a = a[..., sx : sx + side, sy : sy + side, :]
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 0)))  # (Z, ..., side, side)

    img = crop(vol.t1[..., zs]).unsqueeze(1)  # (Z, 1, side, side)
    pr = crop(vol.probs[..., zs])  # (Z, 4, side, side)
    img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    pr = F.interpolate(pr, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return img, pr.argmax(1)


def load_brain_slices(size: int = 64, step: int = 2, test: str = "auto", root: str | os.PathLike[str] | None = None) -> BrainSlices:
    """Train on axial MNI152 slices; test on Colin27 at the same positions, or on a held-out MNI152 slab.

    ``test``: ``"colin27"`` (raises :class:`DataUnavailable` without Debian ``mricron-data``), ``"slab"``, or
    ``"auto"`` (Colin27 when installed, else the slab; ``source`` says which). ``root``: the mricron templates
    folder (default ``$HYPERLOOM_MRICRON``, then ``/usr/share/mricron/templates``). Positions ``z_*`` are MNI z in mm.
    """
    if test not in _TESTS:
        raise ValueError(f"test must be one of {_TESTS}, got {test!r}")
    where = mricron_root(root)
    note = ""
    if test == "auto":
        test = "colin27" if colin27_available(where) else "slab"
        if test == "slab":
            note = f" (Colin27 not found in {where}: 'apt-get install mricron-data'; fell back to the slab)"
    if test == "colin27" and not colin27_available(where):
        raise DataUnavailable(f"Colin27 test subject not found in {where} (ch2.nii.gz, ch2bet.nii.gz): 'apt-get install mricron-data'")
    key = (size, step, test, str(where.resolve()) if test == "colin27" else "")
    if key in _CACHE:
        out = _CACHE[key]
        return out if not note else dataclasses.replace(out, source=out.source + note)
    mni = _mni152()
    area = mni.mask.sum((0, 1))
    zs = [z for z in range(0, mni.mask.shape[2], step) if area[z] > 0.25 * area.max()]
    xs, ys = np.nonzero(mni.mask.max(2))
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    box = (int(x0 + x1) // 2, int(y0 + y1) // 2, int(max(x1 - x0, y1 - y0)))
    z_mm = torch.tensor([float(mni.affine[2, 2] * z + mni.affine[2, 3]) for z in zs], dtype=torch.float64)
    img, lab = _slices(mni, zs, box, size)
    train = f"train: MNI152 2009a (nilearn), {{n}} slices every {step} mm, z in [{{a:g}}, {{b:g}}] mm, probability-map tissue labels"
    if test == "colin27":
        cimg, clab = _slices(_colin27(where, mni), zs, box, size)
        src = train.format(n=len(zs), a=float(z_mm[0]), b=float(z_mm[-1]))
        src += f"; test: Colin27 ch2 masked by ch2bet (Debian mricron-data), {len(zs)} slices at the same z, intensity-based tissue labels"
        out = BrainSlices(img, lab, cimg, clab, src, z_mm, z_mm.clone(), "MNI152", "Colin27")
    else:
        n = len(zs)
        i0 = round(SLAB_START * n)
        held = torch.zeros(n, dtype=torch.bool)
        held[i0 : i0 + max(1, round(SLAB_FRACTION * n))] = True
        far = (z_mm[:, None] - z_mm[held][None, :]).abs().min(1).values > SLAB_MARGIN_MM
        a, b = float(z_mm[held].min()), float(z_mm[held].max())
        src = train.format(n=int(far.sum()), a=float(z_mm[far].min()), b=float(z_mm[far].max()))
        src += f"; test: contiguous held-out MNI152 slab z in [{a:g}, {b:g}] mm, {int(held.sum())} slices"
        src += f", train slices > {SLAB_MARGIN_MM:g} mm away"
        out = BrainSlices(img[far], lab[far], img[held], lab[held], src, z_mm[far], z_mm[held], "MNI152", "MNI152 (held-out slab)")
    _CACHE[key] = out
    return out if not note else dataclasses.replace(out, source=out.source + note)


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
