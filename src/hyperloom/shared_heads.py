r"""Shared heads: one generator for many tensors, so the hypernetwork does not grow with the target.

The dense and low-rank heads (:mod:`hyperloom.heads`) hold one block of output units per predicted
tensor, so their size grows with the number and size of the predicted tensors. The two heads here
generate every tensor with **one shared generator** keyed by a learned embedding:

* :class:`ChunkedHead` (``head="chunked"`` or ``head=hl.Chunked(...)``; hypnettorch's chunked
  hypernetwork): the predicted tensors are flattened and concatenated in order, the flat vector is cut
  into chunks of ``chunk_size`` values, each chunk has a learned embedding, and one generator maps
  (trunk features, chunk embedding) to the chunk. When ``chunk_size`` does not divide the total, the
  last chunk is generated in full and its tail is dropped (padding: at most ``chunk_size - 1`` values
  are computed and not used).
* :class:`StructuredHead` (``head="structured"`` or ``head=hl.Structured(...)``; Ha, Dai and Le's
  static hypernetwork): each tensor is seen as a matrix ``(m, n)`` (``m = shape[0]``, ``n`` the rest;
  vectors as ``(1, m)``), cut into blocks of ``min(block, m) x min(block, n)`` (a side that the block
  does not divide is padded: its edge blocks are generated in full and cropped), and the blocks are
  grouped by shape; each block has a learned
  embedding and each group **one generator** that maps (features, embedding) to a whole block; large
  kernels are assembled from their generated blocks. With ``block=None`` (the default) every tensor is
  one block, so tensors of equal shape (the same projection in every layer, the ``A`` and ``B`` factors
  of every LoRA adapter) share a generator and differ only by their embedding — in LoRA mode that
  embedding is the (layer, module, factor) embedding of Text-to-LoRA. A group with a single member still
  works (a per-tensor low-rank generator); a head where *no* group has two members shares nothing and
  is refused.

How features and embeddings combine (``combine``): with ``h`` the trunk's features ``(H,)`` and
``e`` a chunk's or block's embedding ``(d,)``,

* ``"product"`` (default; FiLM-style, multiplicative): ``z = (U h) * (V e)``, ``out = W z``. The output
  is linear in ``h``, like the dense head's ``W h``: it is a rank-``width`` factorisation of the dense
  head's weight tensor, so the magnitude behaviour that MIP addresses is the same as the dense head's.
* ``"concat"``: ``z = leaky_relu(U h + V e + c)``, ``out = W z`` (the concatenation ``[h, e]`` through
  one hidden layer of ``width`` units, computed without forming the concatenation). Its output is not
  proportional to ``|h|``, so its gains are calibrated once, at the midpoint of the declared inputs.

Which is better was measured, not assumed (``python -m experiments heads``; docs/guides/heads.md).

Initialisation: every predicted tensor has a learned output gain ``s_t`` (one scalar per tensor), set
so that at the start each tensor's ``Delta`` has the scale the dense head's split init gives it
(``gain / sqrt(numel)`` times ``|h|``), whatever the other tensors' sizes; biases' gains start at 0
(their ``Delta`` starts at 0, as the dense head's zero bias rows), and ``zero_init`` zeroes every gain
(``Delta = 0`` at the start; the gains receive gradients, the generator follows). The shared heads have
no per-value output bias: such a bias would be a full copy of the predicted tensors (what ``theta0`` is
with an additive output).

Intermediates: a call with ``N`` conditioning rows holds ``(N, blocks, width)`` features beside the
``(N, blocks, block size)`` output; ``width`` is capped at the block (chunk) size so that no
intermediate is larger than the output, which is the size of the dense head's output.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import HyperloomError
from .heads import is_bias_name

COMBINES = ("product", "concat")
_CONCAT_SLOPE = 0.01  # leaky_relu's default negative slope


def _positive_int(owner: str, name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HyperloomError(f"{owner}: {name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class Chunked:
    """Options of the chunked head (``head=hl.Chunked(...)``; ``head="chunked"`` takes these defaults).

    Args:
        chunk_size: Values per chunk (the generator's output size). A total that it does not divide is
            padded: the last chunk is generated in full and its tail dropped.
        dim: Width of the learned chunk embeddings (``>= 1``).
        width: Width ``G`` of the generator's hidden features (capped at ``chunk_size``).
        combine: ``"product"`` or ``"concat"`` (see :mod:`hyperloom.shared_heads`).

    Example:
        >>> Chunked(chunk_size=256).to_json()
        {'kind': 'chunked', 'chunk_size': 256, 'dim': 8, 'width': 64, 'combine': 'product'}

    Raises:
        HyperloomError: On a size that is not an integer ``>= 1`` or an unknown ``combine``.
    """

    chunk_size: int = 1024
    dim: int = 8
    width: int = 64
    combine: str = "product"

    def __post_init__(self) -> None:
        for f in ("chunk_size", "dim", "width"):
            _positive_int("Chunked head", f, getattr(self, f))
        if self.combine not in COMBINES:
            raise HyperloomError(f"Chunked head: unknown combine {self.combine!r}; valid options are {list(COMBINES)}")

    def to_json(self) -> dict[str, Any]:
        """The options as a JSON-able dict with ``kind``."""
        return {"kind": "chunked", **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Structured:
    """Options of the structured head (``head=hl.Structured(...)``; ``head="structured"`` takes these defaults).

    Args:
        block: Side of the square blocks that tensors are cut into (a side shorter than ``block`` is one
            block; a longer side that it does not divide is padded and cropped); ``None``: every tensor is one
            block (tensors of equal shape share a generator).
        dim: Width of the learned block embeddings (``>= 1``).
        width: Width ``G`` of each generator's hidden features (capped at the block size).
        combine: ``"product"`` or ``"concat"`` (see :mod:`hyperloom.shared_heads`).

    Example:
        >>> Structured(block=32).to_json()
        {'kind': 'structured', 'block': 32, 'dim': 8, 'width': 64, 'combine': 'product'}

    Raises:
        HyperloomError: On a size that is not an integer ``>= 1`` or an unknown ``combine``.
    """

    block: int | None = None
    dim: int = 8
    width: int = 64
    combine: str = "product"

    def __post_init__(self) -> None:
        _positive_int("Structured head", "block", self.block, allow_none=True)
        for f in ("dim", "width"):
            _positive_int("Structured head", f, getattr(self, f))
        if self.combine not in COMBINES:
            raise HyperloomError(f"Structured head: unknown combine {self.combine!r}; valid options are {list(COMBINES)}")

    def to_json(self) -> dict[str, Any]:
        """The options as a JSON-able dict with ``kind``."""
        return {"kind": "structured", **dataclasses.asdict(self)}


SharedHeadSpec = Chunked | Structured


def head_spec(head: Any) -> str | SharedHeadSpec:
    """Normalise a ``head=`` argument: ``"dense"``, ``"lowrank"``, or the options of a shared head.

    Accepts the names ``"chunked"`` / ``"structured"`` (default options), a :class:`Chunked` /
    :class:`Structured`, or their JSON form (a dict with ``kind``, as written to checkpoints).

    Example:
        >>> head_spec("chunked")
        Chunked(chunk_size=1024, dim=8, width=64, combine='product')
        >>> head_spec({"kind": "structured", "block": 16})
        Structured(block=16, dim=8, width=64, combine='product')

    Raises:
        HyperloomError: On an unknown head or malformed options.
    """
    if isinstance(head, Chunked | Structured):
        return head
    if head == "chunked":
        return Chunked()
    if head == "structured":
        return Structured()
    if isinstance(head, str):
        if head in ("dense", "lowrank"):
            return head
        raise HyperloomError(f"Unknown head {head!r}; valid options are ['dense', 'lowrank', 'chunked', 'structured']")
    if isinstance(head, Mapping):
        opts = dict(head)
        kind = opts.pop("kind", None)
        kinds: dict[str, type[Chunked] | type[Structured]] = {"chunked": Chunked, "structured": Structured}
        cls = kinds.get(str(kind))
        if cls is None:
            raise HyperloomError(f"Head options {dict(head)!r}: 'kind' must be 'chunked' or 'structured'")
        try:
            built: Chunked | Structured = cls(**opts)
            return built
        except TypeError as e:
            raise HyperloomError(f"Head options {dict(head)!r}: {e}") from None
    raise HyperloomError(f"head must be a name or hl.Chunked / hl.Structured options, got {type(head).__name__}")


def _as_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], int(math.prod(shape[1:]))


def _on_cpu(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU; on the meta device (no values: counting parameters) ones of its shape."""
    return torch.ones(t.shape) if t.is_meta else t.detach().cpu()


class _Generator(nn.Module):
    """One shared generator: ``(N, H)`` features and ``(E, d)`` embeddings -> ``(N, E, K)``."""

    def __init__(
        self, in_features: int, num: int, size: int, *, dim: int, width: int, combine: str, dtype: torch.dtype | None, device: Any
    ) -> None:
        super().__init__()
        g = min(width, size)
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.combine = combine
        self.embedding = nn.Parameter(torch.randn(num, dim, **kw))
        self.feature = nn.Parameter(torch.randn(g, in_features, **kw) / math.sqrt(max(in_features, 1)))
        self.key = nn.Parameter(torch.randn(g, dim, **kw) / math.sqrt(dim))
        self.key_bias = nn.Parameter(torch.zeros(g, **kw)) if combine == "concat" else None
        self.out = nn.Parameter(torch.randn(size, g, **kw) / math.sqrt(g))

    def codes(self) -> torch.Tensor:
        """The embeddings' projections ``(E, G)`` (``V e``, plus ``c`` for concat)."""
        c = F.linear(self.embedding, self.key)
        return c + self.key_bias if self.key_bias is not None else c

    def second_moment(self) -> torch.Tensor:
        """Per embedding: the expected ``mean(out**2)`` at init divided by ``|h|**2 / H`` (for the gains)."""
        with torch.no_grad():
            c = self.codes()
            if self.combine == "product":
                return c.pow(2).mean(dim=1)
            # concat: E[act(a + c)^2] with a ~ N(0, |h|^2 / H); taken at |h|^2 = H (a of unit variance)
            return (1.0 + c.pow(2)).mean(dim=1) * (1.0 + _CONCAT_SLOPE**2) / 2.0

    def forward(self, h: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, H)`` -> ``(N, E, K)``; ``scale`` ``(E,)`` multiplies each embedding's output.

        The scale is applied to the ``(N, E, G)`` features, not to the output (the same values, since the
        output layer is linear): one fewer tensor of the output's size per call.
        """
        a = F.linear(h, self.feature)  # (N, G)
        c = self.codes()  # (E, G)
        if self.combine == "product":
            if scale is not None:
                c = c * scale.unsqueeze(-1)  # (E, G): the cheapest place for it
            z = a.unsqueeze(1) * c  # (N, E, G)
        else:
            z = F.leaky_relu(a.unsqueeze(1) + c, _CONCAT_SLOPE)
            if scale is not None:
                z = z * scale.unsqueeze(-1)
        return F.linear(z, self.out)  # (N, E, K)


class _SharedHead(nn.Module):
    """Common part: the per-tensor gains, their initialisation, zeroing, and the interface of the heads."""

    gains: nn.Parameter
    shapes: dict[str, tuple[int, ...]]
    _sizes: torch.Tensor

    def _init_gains(
        self, in_features: int, moments: dict[str, float], *, init: str, gain: float, zero_init: bool, dtype: Any, device: Any
    ) -> None:
        self._gain = gain
        values = []
        for name, shape in self.shapes.items():
            n = max(int(math.prod(shape)), 1)
            if zero_init or is_bias_name(name):
                values.append(0.0)
            else:
                values.append(gain * math.sqrt(in_features / (n * max(moments[name], 1e-12))))
        self.gains = nn.Parameter(torch.tensor(values, dtype=dtype or torch.get_default_dtype(), device=device))
        self._index = {name: i for i, name in enumerate(self.shapes)}

    @torch.no_grad()
    def calibrate(self, h: torch.Tensor) -> None:
        """Rescale the non-zero gains so that at features ``h`` ``(1, H)`` each tensor's ``Delta`` has the dense head's scale.

        The dense head's split init gives tensor ``t`` an RMS of ``gain |h| / sqrt(numel)``. The
        ``"product"`` generator is linear in ``h`` and its gains are set analytically; the ``"concat"``
        generator is not, and :class:`~hyperloom.HyperNetwork` calibrates it once at the midpoint of the
        declared inputs (no random draw).
        """
        target = self._gain * float(h.norm())
        if target == 0.0:  # no signal to calibrate at: keep the analytic gains rather than zero them all
            return
        out = self(h)
        for name, t in out.items():
            i = self._index[name]
            rms = float(t.pow(2).mean().sqrt()) if t.numel() else 0.0
            if float(self.gains[i]) != 0.0 and rms > 0.0:
                self.gains[i] *= target / math.sqrt(t[0].numel()) / rms

    @property
    def num_outputs(self) -> int:
        """Number of values the head generates per conditioning row (the predicted values, padding excluded)."""
        return sum(int(math.prod(s)) for s in self.shapes.values())

    @property
    def _block_names(self) -> list[str]:
        return list(self.shapes)

    def _zero_blocks(self, names: set[str]) -> None:
        """Zero the gains of ``names``: their ``Delta`` is 0 (exactly) until the gains learn."""
        with torch.no_grad():
            for name in names:
                self.gains[self._index[name]] = 0.0

    def _flat(self, h: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        lead = tuple(h.shape[:-1])
        return h.reshape(-1, h.shape[-1]), lead


class ChunkedHead(_SharedHead):
    """Chunked head: the flattened targets in chunks, each generated from its embedding by one generator.

    Args:
        in_features: Trunk output size ``H``.
        shapes: Mapping ``name -> shape`` of the predicted tensors.
        options: :class:`Chunked` options.
        init: ``mip`` or ``torch`` (both use the shared heads' initialisation, see the module).
        gain: The dense head's split-init gain that the per-tensor gains reproduce.
        zero_init: Start every gain at 0 (``Delta = 0``).

    Shapes:
        ``(*, H)`` -> ``{name: (*, *shape)}``.

    Example:
        >>> head = ChunkedHead(8, {"w": (300, 200), "b": (300,)}, Chunked(chunk_size=1024, width=16))
        >>> head.num_chunks, sum(p.numel() for p in head.parameters()), 300 * 201  # 60,300 values from 17,114
        (59, 17114, 60300)
        >>> {k: tuple(v.shape) for k, v in head(torch.rand(4, 8)).items()}
        {'w': (4, 300, 200), 'b': (4, 300)}

    Raises:
        HyperloomError: On invalid options (see :class:`Chunked`).
    """

    def __init__(
        self,
        in_features: int,
        shapes: Mapping[str, Sequence[int]],
        options: Chunked | None = None,
        *,
        init: str = "mip",
        gain: float = math.sqrt(2.0),
        zero_init: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        opts = options or Chunked()
        self.options = opts
        self.shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        self.sizes = [int(math.prod(s)) for s in self.shapes.values()]
        self.total = sum(self.sizes)
        self.num_chunks = max(1, -(-self.total // opts.chunk_size))
        self.generator = _Generator(
            in_features, self.num_chunks, opts.chunk_size, dim=opts.dim, width=opts.width, combine=opts.combine, dtype=dtype, device=device
        )
        m2 = _on_cpu(self.generator.second_moment())
        moments: dict[str, float] = {}
        start = 0
        for name, n in zip(self.shapes, self.sizes):
            first, last = start // opts.chunk_size, max(start, start + n - 1) // opts.chunk_size
            moments[name] = float(m2[first : last + 1].mean())
            start += n
        self._init_gains(in_features, moments, init=init, gain=gain, zero_init=zero_init, dtype=dtype, device=device)
        self.register_buffer("_sizes", torch.tensor(self.sizes, dtype=torch.int64, device=device), persistent=False)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        flat_h, lead = self._flat(h)
        out = self.generator(flat_h).reshape(flat_h.shape[0], -1)[:, : self.total]  # (N, total)
        out = out * self.gains.repeat_interleave(self._sizes, output_size=self.total)
        return {name: block.reshape((*lead, *shape)) for (name, shape), block in zip(self.shapes.items(), out.split(self.sizes, dim=1))}


class StructuredHead(_SharedHead):
    """Structured head (static hypernetwork): blocks grouped by shape, one generator per group.

    Args:
        in_features: Trunk output size ``H``.
        shapes: Mapping ``name -> shape`` of the predicted tensors.
        options: :class:`Structured` options.
        init: ``mip`` or ``torch`` (both use the shared heads' initialisation, see the module).
        gain: The dense head's split-init gain that the per-tensor gains reproduce.
        zero_init: Start every gain at 0 (``Delta = 0``).

    Attributes:
        groups: Per generator: ``(block_rows, block_cols)`` and the member tensors' names.

    Shapes:
        ``(*, H)`` -> ``{name: (*, *shape)}``.

    Example:
        >>> shapes = {f"layer{i}.w": (64, 64) for i in range(8)}
        >>> head = StructuredHead(8, shapes, Structured(block=16, width=8))
        >>> len(head.groups), sum(p.numel() for p in head.parameters()), 8 * 64 * 64  # one generator for 128 blocks
        (1, 3208, 32768)
        >>> tuple(head(torch.rand(2, 8))["layer3.w"].shape)
        (2, 64, 64)

    Raises:
        HyperloomError: On invalid options, or targets of which no two blocks share a shape (nothing to
            share: use ``block=`` or the chunked head).
    """

    def __init__(
        self,
        in_features: int,
        shapes: Mapping[str, Sequence[int]],
        options: Structured | None = None,
        *,
        init: str = "mip",
        gain: float = math.sqrt(2.0),
        zero_init: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        opts = options or Structured()
        self.options = opts
        self.shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        # name -> (m, n, bm, bn); group key (bm, bn) -> members in order
        self._layout: dict[str, tuple[int, int, int, int]] = {}
        members: dict[tuple[int, int], list[str]] = {}
        for name, shape in self.shapes.items():
            m, n = _as_matrix(shape)
            b = opts.block
            bm = min(b, m) if b is not None else m
            bn = min(b, n) if b is not None else n
            self._layout[name] = (m, n, bm, bn)
            members.setdefault((bm, bn), []).append(name)
        blocks = {key: sum(self._nblocks(k) for k in names) for key, names in members.items()}
        if len(self.shapes) > 0 and all(v == 1 for v in blocks.values()) and len(self.shapes) == len(blocks):
            detail = ", ".join(f"{k}: {s}" for k, s in list(self.shapes.items())[:6])
            raise HyperloomError(
                f"Structured head: no two predicted tensors (or blocks) share a shape ({detail}{', ...' if len(self.shapes) > 6 else ''}), "
                "so one generator per group would share nothing; pass hl.Structured(block=<int>) to cut tensors into "
                "blocks, or use head='chunked'"
            )
        self.groups: list[tuple[tuple[int, int], list[str]]] = list(members.items())
        self.generators = nn.ModuleList(
            _Generator(
                in_features, blocks[key], key[0] * key[1], dim=opts.dim, width=opts.width, combine=opts.combine, dtype=dtype, device=device
            )
            for key, _ in self.groups
        )
        moments: dict[str, float] = {}
        for gen, (_, names) in zip(self.generators, self.groups):
            assert isinstance(gen, _Generator)
            m2 = _on_cpu(gen.second_moment())
            start = 0
            for name in names:
                k = self._nblocks(name)
                moments[name] = float(m2[start : start + k].mean())
                start += k
        self._init_gains(in_features, moments, init=init, gain=gain, zero_init=zero_init, dtype=dtype, device=device)
        owners = [[self._index[name] for name in names for _ in range(self._nblocks(name))] for _, names in self.groups]
        for i, own in enumerate(owners):
            self.register_buffer(f"_owner{i}", torch.tensor(own, dtype=torch.int64, device=device), persistent=False)

    def _nblocks(self, name: str) -> int:
        m, n, bm, bn = self._layout[name]
        return -(-m // bm) * -(-n // bn)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        flat_h, lead = self._flat(h)
        rows = flat_h.shape[0]
        out: dict[str, torch.Tensor] = {}
        for i, (gen, (_, names)) in enumerate(zip(self.generators, self.groups)):
            owner = getattr(self, f"_owner{i}")
            g = gen(flat_h, self.gains.index_select(0, owner))  # (N, E, bm * bn), each block times its tensor's gain
            # one split (its backward is one concatenation), not a slice per tensor (each slice's backward
            # would allocate a zero tensor of the whole group's size)
            for name, piece in zip(names, g.split([self._nblocks(k) for k in names], dim=1)):
                m, n, bm, bn = self._layout[name]
                k = self._nblocks(name)
                if k > 1:
                    mb, nb = -(-m // bm), -(-n // bn)
                    piece = piece.reshape(rows, mb, nb, bm, bn).transpose(2, 3).reshape(rows, mb * bm, nb * bn)
                    if mb * bm != m or nb * bn != n:
                        piece = piece[:, :m, :n]  # the edge blocks' padding
                out[name] = piece.reshape((*lead, *self.shapes[name]))
        return {name: out[name] for name in self.shapes}


def build_shared_head(
    spec: SharedHeadSpec,
    in_features: int,
    shapes: Mapping[str, Sequence[int]],
    *,
    init: str,
    gain: float,
    zero_init: bool,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> ChunkedHead | StructuredHead:
    """The head for ``spec`` (what :class:`~hyperloom.HyperNetwork` calls).

    Raises:
        HyperloomError: As the head's constructor.
    """
    if isinstance(spec, Chunked):
        return ChunkedHead(in_features, shapes, spec, init=init, gain=gain, zero_init=zero_init, dtype=dtype, device=device)
    return StructuredHead(in_features, shapes, spec, init=init, gain=gain, zero_init=zero_init, dtype=dtype, device=device)


__all__ = ["COMBINES", "Chunked", "ChunkedHead", "SharedHeadSpec", "Structured", "StructuredHead", "build_shared_head", "head_spec"]
