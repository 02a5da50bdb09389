"""Output heads: from trunk features to one tensor per predicted parameter.

* :class:`DenseHead` - one linear layer whose output rows are split into the
  predicted tensors ("split init": every tensor's block of rows is initialised
  with its own ``fan_out`` scaling, so a huge tensor does not shrink the
  small ones; blocks of biases start at zero, as in the reference code).

With an additive output (MIP, ``theta = theta0 + Delta``) the heads are built
with ``bias=False``: ``theta0`` already is the conditioning-independent offset
of every predicted tensor, and a second trainable offset (the output layer's
bias) would receive exactly the same gradient, so under Adam the offset would
move about twice as fast as any other direction.
* :class:`LowRankHead` - predicts each weight matrix (``m x n``, convolution
  kernels flattened to ``out x rest``) as ``B @ A`` with ``B: m x r``,
  ``A: r x n``, so the head costs ``r (m + n)`` outputs instead of ``m n``.
  Vectors (biases, norms) and matrices with ``r >= min(m, n)`` stay dense.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .errors import HyperloomError

HEADS = ("dense", "lowrank")

_BIAS_NAME = re.compile(r"(^|[._])bias[^.]*$")


def is_bias_name(name: str) -> bool:
    """Whether a parameter name denotes a bias (``fc.bias``, ``in_proj_bias``, ``bias_ih_l0``).

    Example:
        >>> is_bias_name("attn.in_proj_bias"), is_bias_name("gru.bias_hh_l0"), is_bias_name("fc.weight")
        (True, True, False)
    """
    return _BIAS_NAME.search(name) is not None


def _numel(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


def available_memory(device: torch.device | None) -> int | None:
    """Bytes that can still be allocated on ``device`` (free CUDA memory, or ``MemAvailable`` on CPU); None if unknown."""
    if device is not None and device.type == "cuda":  # pragma: no cover - no GPU in CI
        return int(torch.cuda.mem_get_info(device)[0])
    if device is None or device.type == "cpu":
        # MemAvailable counts reclaimable page cache; free pages alone (SC_AVPHYS_PAGES) can be a
        # fraction of it on a machine that has read large files, and would refuse models that fit
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
            pass
        try:  # pragma: no cover - not Linux
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
        except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
            return None
    return None


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_head_memory(
    in_features: int, outputs: int, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> None:
    """Refuse, before allocating, an output layer that cannot fit in memory.

    Training needs about four copies of the layer (weights, gradients, two Adam moments); the check
    refuses a layer whose weights alone exceed the memory available now.

    Raises:
        HyperloomError: With the size needed and the ways out (a low-rank head, fewer predicted parameters).
    """
    dev = torch.device(device) if device is not None else None
    itemsize = torch.empty((), dtype=dtype or torch.get_default_dtype()).element_size()
    need = (in_features + 1) * outputs * itemsize
    have = available_memory(dev)
    if have is not None and need > have:
        raise HyperloomError(
            f"The hypernetwork's output layer would need {_fmt_bytes(need)} ({in_features + 1} x {outputs:,} "
            f"values) but only {_fmt_bytes(have)} is available on {dev or 'cpu'}; predict fewer parameters "
            "or use head='lowrank' with a small rank"
        )


def check_target_memory(
    shapes: Mapping[str, Sequence[int]], *, copies: int = 2, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> None:
    """Refuse, before allocating, predicted tensors that cannot fit in memory, whatever the head.

    A hypernetwork holds ``theta0`` and produces one generated weight set per call (``copies=2``;
    1 without ``theta0``); a low-rank head shrinks the output layer, not the generated tensors.

    Raises:
        HyperloomError: With the size needed and the size available.
    """
    dev = torch.device(device) if device is not None else None
    itemsize = torch.empty((), dtype=dtype or torch.get_default_dtype()).element_size()
    numel = sum(_numel(s) for s in shapes.values())
    need = copies * numel * itemsize
    have = available_memory(dev)
    if have is not None and need > have:
        biggest = max(shapes, key=lambda k: _numel(shapes[k]))
        what = "theta0 and one generated set" if copies == 2 else f"{copies} cop{'ies' if copies > 1 else 'y'}"
        raise HyperloomError(
            f"The predicted tensors hold {numel:,} values and need {_fmt_bytes(need)} ({what}; the largest is "
            f"{biggest!r} {tuple(shapes[biggest])}) but only {_fmt_bytes(have)} is available on {dev or 'cpu'}; "
            "predict fewer parameters"
        )


class SplitHead(nn.Module):
    """Base of the heads: one linear layer whose output is split into named blocks."""

    def __init__(
        self,
        in_features: int,
        blocks: list[tuple[str, int]],
        *,
        init: str,
        gain: float,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.block_sizes = [n for _, n in blocks]
        check_head_memory(in_features, sum(self.block_sizes), dtype=dtype, device=device)
        self.linear = nn.Linear(in_features, sum(self.block_sizes), bias=bias, dtype=dtype, device=device)
        if init == "mip":
            with torch.no_grad():
                start = 0
                for name, n in blocks:
                    rows = self.linear.weight[start : start + n]
                    if n == 0:
                        pass  # a zero-size tensor has no rows to initialise
                    elif is_bias_name(name.split("#")[0]):
                        rows.zero_()  # biases start at theta0 (zero by default), as in HyperLight
                    else:
                        rows.normal_(0.0, gain / math.sqrt(n))  # Kaiming normal with the block's own fan_out
                    start += n
                if self.linear.bias is not None:
                    self.linear.bias.zero_()
        self._block_names = [name for name, _ in blocks]

    @property
    def num_outputs(self) -> int:
        """Number of output units of the head."""
        return sum(self.block_sizes)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        """Map trunk features ``(N, H)`` to ``{name: (N, *shape)}``."""
        raise NotImplementedError

    def _zero_blocks(self, names: set[str]) -> None:
        with torch.no_grad():
            start = 0
            for name, n in zip(self._block_names, self.block_sizes):
                if name in names:
                    self.linear.weight[start : start + n].zero_()
                    if self.linear.bias is not None:
                        self.linear.bias[start : start + n].zero_()
                start += n

    def _split(self, h: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(self.linear(h), self.block_sizes, dim=-1))


class DenseHead(SplitHead):
    """Dense output layer with per-tensor split initialisation.

    Args:
        in_features: Trunk output size ``H``.
        shapes: Mapping ``name -> shape`` of the predicted tensors.
        init: ``mip`` (split Kaiming fan_out, zero bias) or ``torch``.
        gain: Kaiming gain for the split init.
        zero_init: Zero the whole layer so that every prediction is 0 at start.
        bias: Give the output layer a bias (``False`` for an additive output,
            where ``theta0`` is the offset).

    Shapes:
        ``(*, H)`` -> ``{name: (*, *shape)}`` (``*``: any leading dimensions, or none).

    Example:
        >>> head = DenseHead(8, {"w": (3, 2), "b": (3,)})
        >>> {k: tuple(v.shape) for k, v in head(torch.rand(4, 8)).items()}
        {'w': (4, 3, 2), 'b': (4, 3)}
    """

    def __init__(
        self,
        in_features: int,
        shapes: Mapping[str, Sequence[int]],
        *,
        init: str = "mip",
        gain: float = math.sqrt(2.0),
        zero_init: bool = False,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        blocks = [(k, _numel(s)) for k, s in self.shapes.items()]
        super().__init__(in_features, blocks, init=init, gain=gain, bias=bias, dtype=dtype, device=device)
        if zero_init:
            self._zero_blocks(set(self.shapes))

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        lead = h.shape[:-1]
        return {name: block.view((*lead, *shape)) for (name, shape), block in zip(self.shapes.items(), self._split(h))}


class LowRankHead(SplitHead):
    """Low-rank output head: ``Delta W = B @ A`` per weight matrix.

    Args:
        in_features: Trunk output size ``H``.
        shapes: Mapping ``name -> shape`` of the predicted tensors.
        rank: The rank ``r`` of every factorised matrix.
        init: ``mip`` (split Kaiming fan_out per factor block) or ``torch``.
        gain: Kaiming gain for the split init.
        zero_init: Zero the ``B`` factors (and dense blocks) so every
            prediction is 0 at start while ``A`` still receives gradients.
        bias: Give the output layer a bias (``False`` for an additive output).

    Shapes:
        ``(*, H)`` -> ``{name: (*, *shape)}``.

    Example:
        >>> head = LowRankHead(8, {"w": (30, 20), "b": (30,)}, rank=2)
        >>> head.num_outputs  # 2 * (30 + 20) + 30 instead of 630
        130

    Raises:
        HyperloomError: If ``rank < 1``.
    """

    def __init__(
        self,
        in_features: int,
        shapes: Mapping[str, Sequence[int]],
        *,
        rank: int,
        init: str = "mip",
        gain: float = math.sqrt(2.0),
        zero_init: bool = False,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise HyperloomError(f"Low-rank head needs an integer rank >= 1, got {rank!r}")
        self.shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        self.rank = rank
        self.factored: dict[str, tuple[int, int]] = {}
        blocks: list[tuple[str, int]] = []
        for name, shape in self.shapes.items():
            if len(shape) >= 2:
                m, n = shape[0], _numel(shape[1:])
                if rank < min(m, n):
                    self.factored[name] = (m, n)
                    blocks += [(name + "#B", m * rank), (name + "#A", rank * n)]
                    continue
            blocks.append((name, _numel(shape)))
        super().__init__(in_features, blocks, init=init, gain=gain, bias=bias, dtype=dtype, device=device)
        if zero_init:
            self._zero_blocks({b for b, _ in blocks if not b.endswith("#A")})

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        lead = h.shape[:-1]
        blocks = iter(self._split(h))
        out: dict[str, torch.Tensor] = {}
        for name, shape in self.shapes.items():
            if name in self.factored:
                m, k = self.factored[name]
                b = next(blocks).view((*lead, m, self.rank))
                a = next(blocks).view((*lead, self.rank, k))
                out[name] = torch.matmul(b, a).view((*lead, *shape))
            else:
                out[name] = next(blocks).view((*lead, *shape))
        return out


__all__ = ["HEADS", "DenseHead", "LowRankHead", "SplitHead", "available_memory", "check_head_memory", "check_target_memory", "is_bias_name"]
