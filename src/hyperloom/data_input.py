"""Data as conditioning: a learned encoder reads an image, a set or a client's data set.

``hl.Data(encoder, per=..., pool=..., norm=..., dim=...)`` declares a conditioning
input whose value is *data* (any tensor, or a tuple / dict of tensors such as
``(images, labels)``) passed at call time. ``encoder`` (any ``nn.Module``) maps it
to a code vector of size ``dim``; the code joins the hypernetwork's trunk input
like a :class:`~hyperloom.Task` embedding does (``[E(gamma), e_task..., code...]``).
The encoder becomes an ordinary submodule of the :class:`~hyperloom.HyperNetwork`
(``data.<name>.encoder``; not copied: moved and cast with it), trained with it by
default, saved with it, and frozen like any module (``encoder.requires_grad_(False)``
for a pretrained encoder).

**Placement**, always explicit (``per`` has no default):

* ``per="sample"``: one datum per sample of the batch (Ha et al.'s dynamic
  hypernetworks, HyperStyle: the sample's own image). The value's leading dimension
  is the batch ``B``; the encoder maps it to ``(B, dim)``; each sample gets its own
  weights (per-sample mode, ``vmap`` or loop). ``pool`` defaults to ``None``.
* ``per="set"``: one set for the whole call (a few-shot episode's support set,
  a federated client's data): one weight set shared by the batch. The value's
  leading dimension is the set size ``n``; ``pool`` defaults to ``"mean"``.

**Sets** (``pool`` not ``None``) are permutation-invariant: the encoder maps every
element (``(n, ...) -> (n, dim)``, elements batched along the first dimension),
then ``pool`` reduces over the set: ``"mean"``, or ``"attention"`` (Set Transformer's
pooling by multi-head attention: a learned seed vector attends over the elements,
``s + MHA(s, H, H)`` followed by a residual ReLU layer). With ``per="sample"`` and a
pool, every sample has a set of its own: a tensor ``(B, n, ...)``, a list of ``B``
sets of different sizes, or :class:`Masked` ``(value, mask)`` with a boolean mask
``(B, n)`` (``(n,)`` for ``per="set"``) marking the valid elements. With
``pool=None`` and ``per="set"`` the value is one datum and the encoder's output is
``(dim,)`` or ``(1, dim)``.

**Magnitude invariance** (MIP applied to a learned code, as for ``hl.Task``): a
code's magnitude is free to drift, and with a positively homogeneous hypernetwork
the generated weights scale with it. ``norm="unit"`` (default) divides the pooled
code by its norm (a point on the unit sphere, weighing as much as one cos|sin
coordinate); ``norm=None`` is the plain code (the ablation).

**Checks** (eager, before the trunk runs): every leaf a tensor of a real dtype on
the hypernetwork's device, leading dimensions that agree, no empty set, finite data
(the valid elements of a masked set) and a finite code, an encoder output of shape
``(elements, dim)``; an exception inside the encoder is re-raised as a
:class:`~hyperloom.HyperloomError` naming the input and the shapes it was given.
Checks that read values are skipped under ``torch.compile`` and ``torch.func.vmap``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .errors import HyperloomError, short_repr

DataPer = Literal["set", "sample"]
DataPool = Literal["mean", "attention"] | None
DataNorm = Literal["unit"] | None
_DEFAULT: Any = object()


def _infer_dim(encoder: nn.Module) -> int | None:
    """The code size from the encoder's last module with ``out_features`` (``nn.Linear``) or ``embedding_dim``."""
    for m in reversed(list(encoder.modules())):
        for attr in ("out_features", "embedding_dim"):
            v = getattr(m, attr, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


@dataclass(frozen=True, eq=False)
class Data:
    """Declaration of a data input: a learned encoder maps the data passed at call time to a code.

    Args:
        encoder: An ``nn.Module`` mapping data to codes: ``(N, ...) -> (N, dim)`` (``N``
            the set's elements or the batch's samples; a tuple value is passed as
            ``encoder(*value)``, a dict as ``encoder(**value)``).
        per: ``"sample"`` (one datum, or one set, per sample: per-sample weights) or
            ``"set"`` (one set for the call: one weight set for the batch). Required.
        pool: ``"mean"``, ``"attention"`` (Set Transformer pooling with a learned seed)
            or ``None`` (no set: one datum per sample, or one datum for the call).
            Default: ``"mean"`` for ``per="set"``, ``None`` for ``per="sample"``.
        norm: ``"unit"`` (default, MIP): the code is divided by its norm; ``None``: the plain code.
        dim: Size of the code; default: the ``out_features`` of the encoder's last
            ``nn.Linear`` (or ``embedding_dim`` of its last ``nn.Embedding``).

    Example:
        >>> import torch, hyperloom as hl
        >>> from torch import nn
        >>> enc = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 8))
        >>> hnet = hl.hypernetize(nn.Linear(3, 2), inputs={"support": hl.Data(enc, per="set")}, hidden=(8,))
        >>> x, support = torch.randn(5, 3), torch.randn(20, 3)  # a batch, and a set of 20 elements
        >>> hnet(x, support=support).shape
        torch.Size([5, 2])
        >>> hnet(x, support=support[torch.randperm(20)]).allclose(hnet(x, support=support), atol=1e-6)
        True

    Raises:
        HyperloomError: On an encoder that is not an ``nn.Module``, a missing or
            unknown ``per``, an unknown ``pool`` or ``norm``, or a ``dim`` that is not an
            integer ``>= 1`` (or cannot be inferred).
    """

    encoder: nn.Module
    per: DataPer = field(default=_DEFAULT, kw_only=True)
    pool: DataPool = field(default=_DEFAULT, kw_only=True)
    norm: DataNorm = field(default="unit", kw_only=True)
    dim: int = field(default=_DEFAULT, kw_only=True)

    def __post_init__(self) -> None:
        if not isinstance(self.encoder, nn.Module):
            raise HyperloomError(f"Data: encoder must be an nn.Module, got {type(self.encoder).__name__} {short_repr(self.encoder)}")
        if self.per is _DEFAULT:
            raise HyperloomError("Data: choose per='sample' (one datum per sample: per-sample weights) or per='set' (one set per call)")
        if self.per not in ("set", "sample"):
            raise HyperloomError(f"Data per must be one of 'set', 'sample', got {short_repr(self.per)}")
        pool = ("mean" if self.per == "set" else None) if self.pool is _DEFAULT else self.pool
        if pool not in ("mean", "attention", None):
            raise HyperloomError(f"Data pool must be one of 'mean', 'attention', None, got {short_repr(pool)}")
        if self.norm not in ("unit", None):
            raise HyperloomError(f"Data norm must be one of 'unit', None, got {short_repr(self.norm)}")
        if self.dim is _DEFAULT or self.dim is None:
            dim = _infer_dim(self.encoder)
            object.__setattr__(self, "_dim_inferred", True)  # for the messages on a mismatched encoder output
            if dim is None:
                raise HyperloomError(
                    f"Data: cannot infer the code size of {type(self.encoder).__name__} (no nn.Linear/nn.Embedding in it); pass dim=<int>"
                )
        else:
            dim = self.dim
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
                raise HyperloomError(f"Data dim must be an integer >= 1, got {short_repr(self.dim)}")
        object.__setattr__(self, "pool", pool)
        object.__setattr__(self, "dim", int(dim))

    @property
    def embedding_norm(self) -> str:
        """``norm`` as a string (``"unit"`` or ``"none"``), as checkpoints record and compare it."""
        return "none" if self.norm is None else str(self.norm)

    @property
    def pooling(self) -> str:
        """``pool`` as a string (``"mean"``, ``"attention"`` or ``"none"``), as checkpoints record it."""
        return "none" if self.pool is None else str(self.pool)

    @property
    def encoder_class(self) -> str:
        """The encoder's class name, as checkpoints record and compare it (its weights are in the ``state_dict``)."""
        return type(self.encoder).__name__

    def midpoint(self) -> float:
        """The code used where an input needs a representative value (zeros: for shape checks only)."""
        return 0.0

    def config(self) -> dict[str, Any]:
        """The declaration as JSON, as checkpoints record and check it.

        The encoder is recorded by its class name; its weights are in the ``state_dict``.

        Example:
            >>> from torch import nn
            >>> Data(nn.Linear(3, 4), per="set").config()
            {'kind': 'Data', 'encoder': 'Linear', 'per': 'set', 'pool': 'mean', 'norm': 'unit', 'dim': 4}
        """
        return {
            "kind": "Data",
            "encoder": type(self.encoder).__name__,
            "per": self.per,
            "pool": self.pool,
            "norm": self.norm,
            "dim": self.dim,
        }

    def __repr__(self) -> str:
        return f"Data({type(self.encoder).__name__}, per={self.per!r}, pool={self.pool!r}, norm={self.norm!r}, dim={self.dim})"


@dataclass(frozen=True)
class Masked:
    """Sets of different sizes as one padded value and a boolean mask of the valid elements.

    Args:
        value: A tensor (or tuple / dict of tensors) ``(B, n, ...)`` for ``per="sample"``
            (``(n, ...)`` for ``per="set"``); masked elements are never read: only the valid
            ones are encoded (under ``torch.func.vmap`` all are, and the pooling ignores the
            masked ones).
        mask: Boolean ``(B, n)`` (``(n,)``): ``True`` marks a valid element; every set needs one.

    Example:
        >>> import torch, hyperloom as hl
        >>> from torch import nn
        >>> spec = hl.Data(nn.Linear(3, 4), per="sample", pool="mean")
        >>> hnet = hl.hypernetize(nn.Linear(3, 2), inputs={"ctx": spec}, hidden=(8,))
        >>> sets, mask = torch.randn(2, 5, 3), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
        >>> hnet(torch.randn(2, 3), ctx=hl.Masked(sets, mask)).shape
        torch.Size([2, 2])
    """

    value: Any
    mask: torch.Tensor


class DataCode:
    """A data input's code as the input set stacks it: ``(1, dim)`` (shared) or ``(B, dim)`` (per sample)."""

    def __init__(self, code: torch.Tensor, per_sample: bool) -> None:
        self.code = code
        self.per_sample = per_sample


class AttentionPool(nn.Module):
    """Set Transformer pooling (PMA, one seed): ``h = s + MHA(s, H, H)``, then ``h + relu(W h)``.

    Permutation-invariant over the set; masked elements get no attention.

    Example:
        >>> pool = AttentionPool(8)
        >>> h = torch.randn(2, 5, 8)
        >>> torch.allclose(pool(h, None), pool(h[:, torch.randperm(5)], None), atol=1e-6)
        True
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        heads = next(h for h in (4, 2, 1) if dim % h == 0)
        self.seed = nn.Parameter(torch.randn(1, 1, dim) / math.sqrt(dim))
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ff = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Pool ``(B, n, dim)`` codes (``mask``: ``(B, n)`` valid elements, or ``None``) to ``(B, dim)``."""
        s = self.seed.expand(h.shape[0], 1, h.shape[2])
        pad = None if mask is None else ~mask
        a, _ = self.attention(s, h, h, key_padding_mask=pad, need_weights=False)
        out = (s + a)[:, 0]
        return out + torch.relu(self.ff(out))


def mean_pool(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the set dimension of ``(B, n, dim)`` codes, over the valid elements only."""
    if mask is None:
        return h.mean(dim=1)
    m = mask.unsqueeze(-1)
    total = torch.where(m, h, torch.zeros((), dtype=h.dtype, device=h.device)).sum(dim=1)
    return total / m.sum(dim=1).clamp_min(1).to(h.dtype)


class DataEncoder(nn.Module):
    """The learned part of one :class:`Data` input: the user's encoder and the set pooling.

    Attributes:
        encoder: The user's encoder (the same object, not a copy).
        pool: :class:`AttentionPool` for ``pool="attention"``; absent otherwise.

    Args:
        name: The input's name (for messages).
        spec: The declaration.
    """

    def __init__(self, name: str, spec: Data) -> None:
        super().__init__()
        self.name = name
        self.spec = spec
        self.encoder = spec.encoder
        if spec.pool == "attention":
            self.pool = AttentionPool(spec.dim)

    # -- validation -----------------------------------------------------------------------
    def _expected(self) -> str:
        s = self.spec
        if s.per == "sample":
            if s.pool is None:
                return "a tensor (or tuple/dict of tensors) of shape (B, ...): one datum per sample"
            return "sets of shape (B, n, ...), a list of B sets (n_i, ...) or hl.Masked(value (B, n, ...), mask (B, n))"
        if s.pool is None:
            return "one datum: a tensor (or tuple/dict of tensors)"
        return "a set of shape (n, ...) (or a tuple/dict of such tensors) or hl.Masked(value (n, ...), mask (n,))"

    def _leaves(self, value: Any, device: torch.device, what: str = "") -> list[torch.Tensor]:
        leaves, _ = tree_flatten(value)
        if not leaves or isinstance(value, (int, float, bool)) or not all(isinstance(t, torch.Tensor) for t in leaves):
            kinds = sorted({type(t).__name__ for t in leaves}) or [type(value).__name__]
            raise HyperloomError(f"Data input {self.name!r}: expected {self._expected()}, got {what}{'/'.join(kinds)} {short_repr(value)}")
        for t in leaves:
            if t.dtype is torch.bool or t.dtype.is_complex:
                raise HyperloomError(f"Data input {self.name!r}: expected real-valued tensors, got {what}dtype {t.dtype}")
            if t.device != device:
                raise HyperloomError(f"Data input {self.name!r} is on {t.device} but the hypernetwork is on {device}")
        return leaves

    def _lead(self, leaves: list[torch.Tensor], dims: int, what: str, value_what: str = "") -> tuple[int, ...]:
        """The leading ``dims`` sizes shared by every leaf (``(B,)``, ``(n,)`` or ``(B, n)``)."""
        shapes = [tuple(t.shape) for t in leaves]
        if any(len(s) < dims for s in shapes):
            raise HyperloomError(f"Data input {self.name!r}: expected {self._expected()}, got {value_what}shape(s) {shapes}")
        lead = {s[:dims] for s in shapes}
        if len(lead) > 1:
            raise HyperloomError(
                f"Data input {self.name!r}: the tensors of {value_what or 'the value'} disagree on their {what}: shapes {shapes}"
            )
        return shapes[0][:dims]

    def _check_finite(self, leaves: list[torch.Tensor], what: str) -> None:
        for j, t in enumerate(leaves):
            if t.dtype.is_floating_point and t.numel() and not bool(torch.isfinite(t).all()):
                idx = tuple((~torch.isfinite(t)).nonzero()[0].tolist())
                where = f" (tensor {j})" if len(leaves) > 1 else ""
                raise HyperloomError(
                    f"Data input {self.name!r}: non-finite value {t[idx].item()} at index {idx} of {what}{where} of shape {tuple(t.shape)}"
                )

    def _dtype_hint(self, value: Any) -> str:
        """After an encoder failure: the floating data's dtype against the encoder's parameters' (data is passed as given)."""
        expected = next((p.dtype for p in self.encoder.parameters() if p.is_floating_point()), None)
        got = sorted({str(t.dtype) for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()})
        if expected is None or not got or got == [str(expected)]:
            return ""
        return f"; the data is {'/'.join(got)} but the encoder's parameters are {expected}: cast the data (.to({expected}))"

    # -- encoding -----------------------------------------------------------------------------
    def _call(self, value: Any, n: int, described: str) -> torch.Tensor:
        """Run the encoder on ``n`` elements (or one datum, ``n = 0``); return ``(n, dim)`` (``(1, dim)``)."""
        try:
            if isinstance(value, tuple):
                out = self.encoder(*value)
            elif isinstance(value, Mapping):
                out = self.encoder(**value)
            else:
                out = self.encoder(value)
        except HyperloomError:
            raise
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise HyperloomError(
                f"Data input {self.name!r}: the encoder {type(self.encoder).__name__} failed on {described} "
                f"({type(e).__name__}: {msg}); it must map {self._expected()} to codes of shape (N, {self.spec.dim})"
                + self._dtype_hint(value)
            ) from e
        k = self.spec.dim
        if not isinstance(out, torch.Tensor):
            raise HyperloomError(f"Data input {self.name!r}: the encoder returned a {type(out).__name__}, expected a tensor of codes")
        if not out.dtype.is_floating_point:
            raise HyperloomError(f"Data input {self.name!r}: the encoder's output has dtype {out.dtype}, expected a floating dtype")
        inferred = (
            f" (dim={k} inferred from {type(self.encoder).__name__}'s last nn.Linear/nn.Embedding registered: pass hl.Data(..., dim=))"
            if getattr(self.spec, "_dim_inferred", False)
            else ""
        )
        if n == 0:  # one datum
            if tuple(out.shape) not in ((k,), (1, k)):
                raise HyperloomError(
                    f"Data input {self.name!r}: the encoder's output for one datum has shape {tuple(out.shape)}, "
                    f"expected ({k},) or (1, {k}){inferred}"
                )
            return out.reshape(1, k)
        if tuple(out.shape) != (n, k):
            raise HyperloomError(
                f"Data input {self.name!r}: the encoder's output for {described} has shape {tuple(out.shape)}, expected ({n}, {k})"
                + inferred
            )
        return out

    def encode(self, value: Any, *, dtype: torch.dtype, device: torch.device, check: bool = True) -> DataCode:
        """Validate ``value``, encode, pool and normalise it: the code ``(1, dim)`` (per set) or ``(B, dim)`` (per sample).

        Raises:
            HyperloomError: Naming the input, on a wrong type, dtype, device or shape, an empty
                set, non-finite data or codes, or an encoder that fails or returns the wrong shape.
        """
        s = self.spec
        check = check and device.type != "meta"  # a meta tensor has no values to check
        mask: torch.Tensor | None = None
        if isinstance(value, Masked):
            if s.pool is None:
                raise HyperloomError(
                    f"Data input {self.name!r}: hl.Masked is for sets (pool='mean' or 'attention'), this input has pool=None"
                )
            value, mask = value.value, value.mask
            if not isinstance(mask, torch.Tensor) or mask.dtype is not torch.bool:
                raise HyperloomError(f"Data input {self.name!r}: the mask must be a bool tensor, got {short_repr(mask)}")
            if mask.device != device:
                raise HyperloomError(f"Data input {self.name!r}: the mask is on {mask.device} but the hypernetwork is on {device}")
        if isinstance(value, list):
            if not (s.per == "sample" and s.pool is not None):
                raise HyperloomError(
                    f"Data input {self.name!r}: a list holds one set per sample (per='sample' with a pool); expected {self._expected()}"
                )
            if mask is not None:
                raise HyperloomError(f"Data input {self.name!r}: give either a list of sets or hl.Masked, not both")
            code = self._encode_list(value, device=device, check=check)
        elif s.pool is None:
            leaves = self._leaves(value, device)
            if check:
                self._check_finite(leaves, "the data")
            if s.per == "sample":
                (b,) = self._lead(leaves, 1, "batch size (first dimension)")
                if b == 0:
                    raise HyperloomError(f"Data input {self.name!r}: an empty batch (0 samples): {_shapes(leaves)}")
                code = self._call(value, b, f"a batch of {_shapes(leaves)}")
            else:
                code = self._call(value, 0, f"one datum of {_shapes(leaves)}")
        else:
            leaves = self._leaves(value, device)
            dims = 2 if s.per == "sample" else 1
            lead = self._lead(leaves, dims, "set size" if dims == 1 else "batch and set sizes (first two dimensions)")
            if math.prod(lead) == 0:
                raise HyperloomError(f"Data input {self.name!r}: an empty set: {_shapes(leaves)}, expected {self._expected()}")
            if mask is not None and tuple(mask.shape) != lead:
                raise HyperloomError(f"Data input {self.name!r}: the mask has shape {tuple(mask.shape)}, expected {lead} (the data's)")
            if check and mask is not None:
                empty = ~mask.reshape(-1, lead[-1]).any(dim=1)
                if bool(empty.any()):
                    i = int(empty.nonzero()[0])
                    where = f"the set of sample {i}" if s.per == "sample" else "the set"
                    raise HyperloomError(f"Data input {self.name!r}: {where} is empty (its mask has no True)")
            m = math.prod(lead)
            flat = tree_map(lambda t: t.reshape(m, *t.shape[dims:]), value)
            if mask is not None and device.type != "meta" and not _under_vmap():
                # only the valid elements go through the encoder: padding must not reach a BatchNorm's batch
                # statistics (or its running ones), and its values, finite or not, are never read
                keep = mask.reshape(m)
                valid = tree_map(lambda t: t[keep], flat)
                if check:
                    self._check_finite(tree_flatten(valid)[0], "the data (its valid elements)")
                n_valid = tree_flatten(valid)[0][0].shape[0]  # not keep.sum().item(): no graph break under compile
                h_valid = self._call(valid, n_valid, f"{n_valid} valid set elements stacked as {_shapes(tree_flatten(valid)[0])}")
                h = h_valid.new_zeros((m, s.dim)).masked_scatter(keep[:, None], h_valid)
            else:
                if check:
                    self._check_finite(leaves, "the data")
                h = self._call(flat, m, f"{m} set elements stacked as {_shapes(tree_flatten(flat)[0])}")
            h = h.reshape(*((1,) if dims == 1 else ()), *lead, s.dim)
            code = self._pool(h, None if mask is None else mask.reshape(h.shape[:2]))
        if s.norm == "unit":  # in at least float32: a float16 norm overflows above 65504 and underflows below 6e-5
            wide = code.to(torch.promote_types(code.dtype, torch.float32))
            code = wide / wide.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(wide.dtype).tiny)
        code = code.to(dtype)
        if check and not bool(torch.isfinite(code).all()):
            raise HyperloomError(f"Data input {self.name!r}: the encoder produced a non-finite code (shape {tuple(code.shape)})")
        return DataCode(code, s.per == "sample")

    def _encode_list(self, sets: list[Any], *, device: torch.device, check: bool) -> torch.Tensor:
        """``B`` sets of different sizes: encoded together, padded, pooled over the valid elements."""
        if not sets:
            raise HyperloomError(f"Data input {self.name!r}: an empty list (0 samples); expected {self._expected()}")
        specs = []
        flat_sets: list[list[torch.Tensor]] = []
        sizes: list[int] = []
        for i, one in enumerate(sets):
            leaves, spec = tree_flatten(one)
            leaves = self._leaves(one, device, what=f"set {i}: ")
            (n,) = self._lead(leaves, 1, "set size", value_what=f"set {i}'s ")
            if n == 0:
                raise HyperloomError(f"Data input {self.name!r}: set {i} is empty ({_shapes(leaves)})")
            if check:
                self._check_finite(leaves, f"set {i}")
            specs.append(spec)
            flat_sets.append(leaves)
            sizes.append(n)
        for i, (spec, leaves) in enumerate(zip(specs, flat_sets)):
            if spec != specs[0]:
                raise HyperloomError(
                    f"Data input {self.name!r}: set {i} is a {_structure(sets[i])} but set 0 is a {_structure(sets[0])} "
                    "(every set must have the same structure; only the set sizes may differ)"
                )
            same = spec == specs[0] and all(t.shape[1:] == r.shape[1:] and t.dtype == r.dtype for t, r in zip(leaves, flat_sets[0]))
            if not same:
                raise HyperloomError(
                    f"Data input {self.name!r}: set {i}'s elements {_shapes(leaves)} differ from set 0's {_shapes(flat_sets[0])} "
                    "(only the set sizes may differ)"
                )
        cat = [torch.cat([ls[j] for ls in flat_sets]) for j in range(len(flat_sets[0]))]
        total = sum(sizes)
        value = tree_unflatten(cat, specs[0])
        h = self._call(value, total, f"{total} set elements stacked as {_shapes(cat)}")
        parts = list(torch.split(h, sizes))
        padded = torch.nn.utils.rnn.pad_sequence(parts, batch_first=True)
        arange = torch.arange(max(sizes), device=h.device)
        mask = arange[None, :] < torch.tensor(sizes, device=h.device)[:, None]
        return self._pool(padded, mask)

    def _pool(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.spec.pool == "attention":
            out: torch.Tensor = self.pool(h, mask)
            return out
        return mean_pool(h, mask)

    def extra_repr(self) -> str:
        s = self.spec
        return f"name={self.name!r}, per={s.per!r}, pool={s.pool!r}, norm={s.norm!r}, dim={s.dim}"


def _under_vmap() -> bool:
    """Whether a ``torch.func.vmap`` is active.

    There a boolean selection of the valid elements is not possible (their number would differ per vmapped
    sample), so the padding is encoded, then ignored by the pooling.
    """
    from .hypernetwork import _under_vmap as active  # the hypernetwork module imports this one

    return active()


def _per_sample_data_hint(specs: Mapping[str, Any]) -> str:
    """For a refusal of per-sample conditioning: the per='sample' Data inputs, whose codes are always per sample."""
    names = [k for k, s in specs.items() if isinstance(s, Data) and s.per == "sample"]
    if not names:
        return ""
    return (
        f"; Data input(s) {names} are per='sample': their codes are per sample even for one datum. For the weights of one "
        "datum, declare the input per='set', pool=None in a model of the same architecture and load this one's state_dict"
    )


def _structure(value: Any) -> str:
    """``tensor``, ``tuple of 2`` or ``dict with keys ['a', 'b']``: a set's container, as messages name it."""
    if isinstance(value, Mapping):
        return f"dict with keys {list(value)}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def _shapes(leaves: list[torch.Tensor]) -> str:
    """``(4, 3) float32`` for one tensor, ``[(4, 3) float32, (4,) int64]`` for several."""
    parts = [f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in leaves]
    return parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"


__all__ = ["AttentionPool", "Data", "DataCode", "DataEncoder", "DataNorm", "DataPer", "DataPool", "Masked", "mean_pool"]
