"""Derivatives of a :class:`~hyperloom.HyperModel`'s output with respect to its input.

Physics-informed training (PINNs) needs ``u`` and its Laplacian ``Δu`` at
collocation points, for a weight set per sample: one member of a PDE family
per conditioning value. :func:`laplacian` computes both in one batched call
with :mod:`torch.func` (``vmap`` over members and over points of a
per-point Hessian, ``jacrev(jacrev)``), not a Python loop; the result keeps its
autograd graph, so a loss built from it trains the hypernetwork.

The weights are generated once, outside the transforms, so the conditioning's
range checks see real values (inside a user's own ``vmap`` they are skipped
and the values clamped); only the primary network runs inside the transforms.
Calling the model itself inside one's own ``torch.func`` transforms works
too; this function is the one-call form for the common case.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.func import functional_call, jacrev, vmap

from .errors import HyperloomError
from .model import HyperModel
from .types import ParamDict


def laplacian(model: HyperModel, x: torch.Tensor, /, **conditioning: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Output ``u`` and its Laplacian ``Δu = Σ_i ∂²u/∂x_i²`` with respect to the input points.

    The primary network must map a batch of points ``(n, d)`` to ``(n, *out)``
    with every point treated on its own (an MLP, a Fourier-feature network;
    not BatchNorm in training mode, not dropout while training). Each output
    coordinate gets its own Laplacian.

    Args:
        model: A :class:`~hyperloom.HyperModel` (positional only).
        x: Points: ``(B, N, d)`` with per-sample conditioning (``B`` members,
            ``N`` points each), ``(N, d)`` with shared conditioning. Floating,
            on the model's device (positional only).
        **conditioning: Conditioning values by input name, as for
            ``model(...)``: numbers (shared) or ``(B,)`` / ``(B, k)`` tensors
            (one weight set per member).

    Returns:
        ``(u, lap)``, both ``(B, N, *out)`` per sample or ``(N, *out)`` shared,
        with autograd graphs to the hypernetwork's parameters and to ``x``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import hyperloom as hl
        >>> net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> hnet = hl.hypernetize(net, inputs={"k": (1.0, 4.0)}, hidden=(8,))
        >>> u, lap = hl.laplacian(hnet, torch.rand(3, 5, 2), k=torch.tensor([1.0, 2.0, 3.0]))
        >>> u.shape, lap.shape
        (torch.Size([3, 5, 1]), torch.Size([3, 5, 1]))

    Raises:
        HyperloomError: If ``model`` is not a HyperModel, ``x`` is not a
            floating tensor of the right rank, its number of members differs
            from the conditioning's, the conditioning is invalid, the primary
            network's output has no leading point dimension, or the primary
            network cannot run under :mod:`torch.func` (with the reason).
    """
    if not isinstance(model, HyperModel):
        raise HyperloomError(f"laplacian needs a HyperModel (from hl.hypernetize), got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = f"{x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
        raise HyperloomError(f"laplacian: x must be a floating tensor of points, got {got}")
    hyper = model.hypernet
    if x.device != hyper.device:
        raise HyperloomError(f"laplacian: x is on {x.device} but the model is on {hyper.device}")
    raw, per_sample = hyper.prepare(conditioning)
    want = 3 if per_sample else 2
    if x.dim() != want:
        layout = "(B, N, d) with per-sample conditioning" if per_sample else "(N, d) with shared conditioning"
        raise HyperloomError(f"laplacian: x must have shape {layout}, got {tuple(x.shape)}")
    if per_sample and x.shape[0] != raw.shape[0]:
        raise HyperloomError(f"laplacian: x holds {x.shape[0]} members (dim 0) but the conditioning has {raw.shape[0]} values")
    primary = model.primary

    def point(theta: ParamDict, xp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = functional_call(primary, theta, (xp.unsqueeze(0),), tie_weights=False, strict=False)
        if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != 1:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise HyperloomError(f"laplacian: the primary network maps one point (1, {xp.shape[0]}) to {shape}; expected (1, *out)")
        return out[0], out[0]

    def value_and_laplacian(theta: ParamDict, xp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def jac(th: ParamDict, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            j, u = jacrev(point, argnums=1, has_aux=True)(th, p)
            return j, u

        # reverse over reverse: jacfwd's first call imports torch's JIT-scripted jvp decompositions (a DeprecationWarning)
        hess, u = jacrev(jac, argnums=1, has_aux=True)(theta, xp)  # (*out, d, d)
        return u, hess.diagonal(dim1=-2, dim2=-1).sum(-1)

    over_points = vmap(value_and_laplacian, in_dims=(None, 0))
    try:
        if per_sample:
            theta = hyper.theta_from_raw(raw)
            return vmap(over_points, in_dims=(0, 0))(theta, x)  # type: ignore[no-any-return]
        return over_points(hyper.theta_shared(raw), x)  # type: ignore[no-any-return]
    except HyperloomError:
        raise
    except RuntimeError as e:
        raise HyperloomError(
            f"laplacian: the primary network {type(primary).__name__} could not run under torch.func "
            f"(vmap over members and points, jacrev(jacrev)): {e}"
        ) from e


__all__ = ["laplacian"]
