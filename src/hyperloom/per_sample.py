"""Per-sample execution: running a model with one generated weight set per sample.

:class:`~hyperloom.HyperModel` hands the per-sample weights ``{name: (B, *shape)}``
and the call's arguments to :func:`run_per_sample`, which runs the model
either under :func:`torch.func.vmap` (one batched call) or in a Python loop
over samples (for modules with no batching rule, e.g. ``nn.GRU``).

Which arguments carry the batch (the rule, as for ``vmap``'s ``in_dims``):
every tensor argument, positional or keyword, and every tensor inside a
nested argument (a tuple, a dict, ...) is batched along ``batch_dim``,
unless ``in_dims`` says otherwise for that argument: ``in_dims`` maps a
positional index (``int``) or an argument name (``str``) to the argument's
batch dimension, or to ``None`` for an argument shared by all samples (a
causal mask, a lookup table), which is passed unchanged. An entry applies
however the argument is passed (by name or by position), and keys that are
not arguments of the model's ``forward`` are refused when wrapping. Every batched tensor must
have exactly ``B`` entries along its batch dimension, ``B`` being the number
of per-sample conditioning values; anything else raises
:class:`~hyperloom.HyperloomError` naming the argument. Non-tensor arguments
pass unchanged. Each sample is run as a batch of one (the batch dimension is
kept, with size 1).

What comes back (outputs are pytrees: tensors, tuples, lists, dicts,
namedtuples, Hugging Face ``ModelOutput`` ...): the same structure as a
shared call, with

* tensor leaves stacked along ``out_dims`` (default ``batch_dim``; an int for
  every leaf or a prefix tree of ints matching the output): in every
  single-sample call that dimension must have size 1 (the sample);
* tensor leaves that are 0-d in every single-sample call (a loss computed
  from ``labels=``) stacked into shape ``(B,)``: the per-sample values;
* plain constants (``None``, numbers, strings, dtypes) kept as they are when
  every sample gives the same one, else a list of the per-sample values;
* a Hugging Face key/value cache (a ``transformers`` ``Cache``, e.g. the
  ``DynamicCache`` GPT-2 returns as ``past_key_values``) replaced by
  ``None``: it cannot be stacked, and under ``vmap`` it would hold tensors
  that are only valid inside the call;
* any other object raises :class:`~hyperloom.HyperloomError` naming the
  output and its type (register the type as a pytree node, e.g. with
  ``torch.utils._pytree.register_dataclass``, and its tensors are stacked).

The first per-sample call with a new argument layout (argument structure,
ranks and dtypes, flag values, ``B``, train/eval mode) also checks the
stacked output shapes against a shared call of the same batch, so an output
whose sample dimension is not ``out_dims`` (``nn.GRU``'s ``h_n`` is
``(layers, B, H)``) raises instead of coming back silently transposed. That
call runs without gradients, on copies of the buffers, with torch's, Python's
and numpy's random states restored; forward hooks see it, and a model that
writes into its inputs in place does so once more. It is skipped for
``B = 1`` (a batch of one cannot tell the sample dimension apart), when no
argument is batched, and under ``torch.compile``; ``hnet.check_outputs =
False`` turns it off.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.utils._pytree import TreeSpec, _broadcast_to_and_flatten, tree_flatten, tree_unflatten

from .buffers import BufferState
from .errors import HyperloomError
from .recompute import checkpoint_culprit, refuse_per_sample
from .types import ParamDict

#: ``in_dims``: positional index or keyword name -> batch dimension (``None``: shared by all samples).
InDims = Mapping[Union[int, str], Union[int, None]]
#: ``out_dims``: one sample dimension for every output tensor, or a prefix tree of them.
OutDims = Union[int, tuple[Any, ...], list[Any], dict[str, Any]]

_CONSTANTS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size, type(Ellipsis))

_VMAP_HINT = (
    "vmap cannot batch models with data-dependent control flow (`if tensor:`, `.item()`, `.all()` on an input, as "
    "Hugging Face masking code does), in-place updates of unbatched tensors that are not buffers in forward, "
    "spectral_norm; pass per_sample='loop' to hypernetize (one call per sample), or use shared "
    "conditioning (one value per input)"
)


def batchnorm_hint(e: BaseException) -> str:
    """A hint for BatchNorm on a batch of one (empty if ``e`` is something else)."""
    if "Expected more than 1 value per channel" not in str(e):
        return ""
    return (
        "; in per-sample mode every sample is a batch of one, and BatchNorm in training mode cannot normalise "
        "one value per channel: use eval mode, shared conditioning, or another normalisation"
    )


def validate_in_dims(
    in_dims: InDims | None, input_names: Sequence[str], signature: inspect.Signature | None = None
) -> dict[int | str, int | None]:
    """Check an ``in_dims`` mapping when wrapping; return it keyed both ways.

    With the model's ``forward`` signature, an entry given by name also applies when that argument is
    passed by position and vice versa, and keys that are not arguments of ``forward`` are refused.

    Raises:
        HyperloomError: On a key that is not a positional index or an argument name of ``forward``, a key
            that is a conditioning input, a value that is not an int or None, or one argument given twice.
    """
    if in_dims is None:
        return {}
    if not isinstance(in_dims, Mapping):
        raise HyperloomError(
            f"in_dims must be a mapping from positional index or keyword name to a batch dimension or None, got {in_dims!r}"
        )
    out: dict[int | str, int | None] = {}
    for k, v in in_dims.items():
        if isinstance(k, bool) or not isinstance(k, (int, str)) or (isinstance(k, int) and k < 0):
            raise HyperloomError(f"in_dims key {k!r}: expected a positional index (int >= 0) or a keyword argument name (str)")
        if isinstance(k, str) and k in input_names:
            raise HyperloomError(f"in_dims key {k!r} is a conditioning input, not an argument of the model")
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise HyperloomError(f"in_dims[{k!r}]: expected an int (the batch dimension) or None (shared), got {v!r}")
        out[k] = v
    if signature is None:
        return out
    params = list(signature.parameters.values())
    var_pos = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    positional = [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    named = [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    both: dict[int | str, int | None] = {}
    for k, v in out.items():
        if isinstance(k, str) and k not in named and not var_kw:
            raise HyperloomError(f"in_dims key {k!r} is not an argument of forward{signature}; its arguments are {named}")
        if isinstance(k, int) and k >= len(positional) and not var_pos:
            raise HyperloomError(f"in_dims key {k}: forward{signature} takes {len(positional)} positional argument(s)")
        alias: int | str | None = None
        if isinstance(k, str) and k in positional:
            alias = positional.index(k)
        elif isinstance(k, int) and k < len(positional) and positional[k] in named:
            alias = positional[k]
        for key in (k, alias):
            if key is None:
                continue
            if key in both and both[key] != v:
                raise HyperloomError(
                    f"in_dims gives argument {positional[k] if isinstance(k, int) else k!r} twice: {both[key]!r} and {v!r}"
                )
            both[key] = v
    return both


def _describe_arg(key: int | str) -> str:
    return f"positional argument {key}" if isinstance(key, int) else f"keyword argument {key!r}"


@dataclass
class _Plan:
    """The call's arguments flattened to leaves, with each leaf's batch dimension (``None``: passed unchanged)."""

    leaves: list[Any]
    dims: list[int | None]
    spec: TreeSpec
    signature: Hashable


def plan_arguments(
    args: Sequence[Any], kwargs: Mapping[str, Any], *, n: int, batch_dim: int, in_dims: Mapping[int | str, int | None]
) -> _Plan:
    """Decide, by the documented rule, which tensor leaves carry the batch; check each has ``n`` samples.

    Raises:
        HyperloomError: Naming the argument, if a batched tensor has no batch dimension or a batch of
            another size than ``n``.
    """
    leaves: list[Any] = []
    dims: list[int | None] = []
    sig: list[Any] = []
    keyed: list[tuple[int | str, Any]] = [*enumerate(args), *kwargs.items()]
    for key, value in keyed:
        d = in_dims.get(key, batch_dim)
        if d is not None and isinstance(value, nn.utils.rnn.PackedSequence):
            raise HyperloomError(
                f"Per-sample mode cannot split the PackedSequence {_describe_arg(key)}: its data is packed across samples, "
                "time step by time step, so no dimension holds one sample. Pass the padded batch (B, T, ...) and the "
                "lengths (a tensor of B values) and pack inside the model (torch.nn.utils.rnn.pack_padded_sequence with "
                "enforce_sorted=False), or use shared conditioning (one value per input), which accepts a PackedSequence"
            )
        sub, sub_spec = tree_flatten(value)
        sig.append((key, sub_spec))
        for j, leaf in enumerate(sub):
            leaves.append(leaf)
            if not isinstance(leaf, torch.Tensor) or d is None:
                dims.append(None)
                # a flag such as return_state=True can change the output's structure: it is part of the layout
                sig.append(leaf if isinstance(leaf, (type(None), bool, int, str)) else type(leaf).__name__)
                continue
            where = _describe_arg(key) + (f" (tensor {j} inside it)" if len(sub) > 1 or not isinstance(value, torch.Tensor) else "")
            dd = d + leaf.dim() if d < 0 else d
            if not 0 <= dd < leaf.dim():
                raise HyperloomError(
                    f"Per-sample mode: {where} of shape {tuple(leaf.shape)} has no batch dimension {d}; pass in_dims={{{key!r}: None}} "
                    f"to hypernetize if it is shared by all samples, or in_dims={{{key!r}: <dim>}} if its samples lie along "
                    "another dimension"
                )
            if leaf.shape[dd] != n:
                m = leaf.shape[dd]
                raise HyperloomError(
                    f"The conditioning has {n} per-sample value(s) but {where} of shape {tuple(leaf.shape)} has {m} "
                    f"samples along its batch dimension {d}. For one weight set shared by the whole batch, pass each "
                    "conditioning input as a number or a 0-d tensor (e.g. lam=0.3 or torch.tensor(0.3), not shape (1,)); "
                    f"for one weight set per sample, pass {m} values per input. Only if {where} is not a batch (shared "
                    f"by all samples) pass in_dims={{{key!r}: None}} to hypernetize, or in_dims={{{key!r}: <dim>}} if its "
                    "samples lie along another dimension"
                )
            dims.append(dd)
            sig.append((dd, leaf.dim(), leaf.dtype))
    spec = tree_flatten((tuple(args), dict(kwargs)))[1]
    return _Plan(leaves, dims, spec, tuple(sig))


def _unflatten_call(plan: _Plan, leaves: list[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    a, kw = tree_unflatten(leaves, plan.spec)
    return tuple(a), dict(kw)


def _out_dims_per_leaf(out_dims: OutDims, out_spec: TreeSpec, n_leaves: int) -> list[int]:
    if isinstance(out_dims, int) and not isinstance(out_dims, bool):
        return [out_dims] * n_leaves
    flat = _broadcast_to_and_flatten(out_dims, out_spec)
    if flat is None or any(isinstance(d, bool) or not isinstance(d, int) for d in flat):
        raise HyperloomError(
            f"out_dims={out_dims!r} does not match the model's output structure {out_spec}: give one int for every output "
            "tensor, or a tuple/list/dict of ints shaped like the output"
        )
    return [int(d) for d in flat]


def _leaf_path(out_spec: TreeSpec, i: int) -> str:
    """A readable name for leaf ``i`` of an output (``logits``, ``[1]``, ...)."""
    try:
        from torch.utils._pytree import keystr, tree_flatten_with_path

        paths = tree_flatten_with_path(tree_unflatten(list(range(out_spec.num_leaves)), out_spec))[0]
        key = keystr(paths[i][0])
    except Exception:  # pragma: no cover - older torch without paths
        key = f"leaf {i}"
    return f"Per-sample output {key}" if key else "The per-sample output"


def _sample_dim(t: torch.Tensor, od: int, out_spec: TreeSpec, i: int) -> int | None:
    """Normalised sample dimension of a single-sample output tensor (``None``: a 0-d per-sample value)."""
    if t.dim() == 0:
        return None
    d = od + t.dim() if od < 0 else od
    if not 0 <= d < t.dim() or t.shape[d] != 1:
        raise HyperloomError(
            f"{_leaf_path(out_spec, i)} has shape {tuple(t.shape)} for a single sample: its dimension "
            f"{od} is not the sample (size 1); pass out_dims to hypernetize with the sample dimension of each output "
            "(an int, or a tuple/dict shaped like the output)"
        )
    return d


@dataclass
class _OutPlan:
    spec: TreeSpec
    kinds: list[str]  # "tensor" | "scalar" (0-d per sample) | "const" | "other"
    dims: list[int | None]
    consts: list[Any]


def _is_constant(x: Any) -> bool:
    return isinstance(x, _CONSTANTS)


def _same_constant(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and a != a:
        return b != b  # NaN equals NaN here
    return bool(a == b)


def is_dropped_cache(x: Any) -> bool:
    """Whether an output object is a Hugging Face key/value cache (``transformers.Cache``), which per-sample mode drops."""
    return any(c.__name__ == "Cache" and c.__module__.startswith("transformers") for c in type(x).__mro__)


def _other_leaf(x: Any, spec: TreeSpec, i: int) -> None:
    """The rule for output leaves that are neither tensors nor constants: a cache becomes None, anything else raises."""
    if is_dropped_cache(x):
        return None
    hint = (
        "register it with torch.utils._pytree.register_dataclass"
        if dataclasses.is_dataclass(x)
        else "register its type with torch.utils._pytree.register_pytree_node"
    )
    raise HyperloomError(
        f"{_leaf_path(spec, i)} is a {type(x).__module__}.{type(x).__qualname__}, which per-sample mode cannot stack "
        f"(it is not a tensor, a constant or a pytree node): {hint} so that its tensors are stacked, or return tensors"
    )


def run_vmap(primary: nn.Module, theta: ParamDict, state: BufferState, plan: _Plan, out_dims: OutDims) -> tuple[list[Any], _OutPlan]:
    """One ``vmap`` call; returns the output leaves (tensors stacked at dim 0) and how to rebuild them.

    The buffers travel as ``state`` (see :mod:`hyperloom.buffers`): the buffers the forward reassigns come
    back as extra outputs and are recorded in ``state``; nothing is written into the module here.
    """
    info: dict[str, Any] = {}

    def one(params: ParamDict, bufs: ParamDict, *leaves: Any) -> tuple[torch.Tensor, ...]:
        unsq = [x.unsqueeze(d) if d is not None else x for x, d in zip(leaves, plan.dims)]
        a, kw = _unflatten_call(plan, unsq)
        given = {**bufs, **state.shared}
        used = {**params, **given}
        out = functional_call(primary, used, a, kw, tie_weights=False, strict=False)
        reassigned = state.reassigned_in_vmap(given, used)
        flat, spec = tree_flatten(out)
        ods = _out_dims_per_leaf(out_dims, spec, len(flat))
        kinds: list[str] = []
        dims: list[int | None] = []
        consts: list[Any] = []
        tensors: list[torch.Tensor] = []
        for i, (x, od) in enumerate(zip(flat, ods)):
            if isinstance(x, torch.Tensor):
                d = _sample_dim(x, od, spec, i)
                kinds.append("tensor" if d is not None else "scalar")
                dims.append(d)
                consts.append(None)
                tensors.append(x.squeeze(d) if d is not None else x)
            else:
                kinds.append("const" if _is_constant(x) else "other")
                dims.append(None)
                if not _is_constant(x):
                    _other_leaf(x, spec, i)  # a cache is dropped (None); anything else raises
                consts.append(x if _is_constant(x) else None)
        info["plan"] = _OutPlan(spec, kinds, dims, consts)
        info["reassigned"] = reassigned
        for k in reassigned:
            if not isinstance(used[k], torch.Tensor):
                state.after_vmap({k: used[k]})  # raises, naming the buffer
        return (*tensors, *(used[k] for k in reassigned))

    in_dims = (0, 0, *plan.dims)
    try:
        try:
            stacked = vmap(one, in_dims=in_dims, out_dims=0, randomness="different")(theta, state.batched, *plan.leaves)
        finally:
            state.restore_attributes()
    except HyperloomError:
        raise
    except Exception as e:
        culprit = checkpoint_culprit(primary, e)
        if culprit is not None:  # reentrant torch.utils.checkpoint: it cannot start under vmap
            raise refuse_per_sample(culprit) from e
        raise _vmap_failure(primary, e) from e
    names: list[str] = info["reassigned"]
    outs = list(stacked)
    k = len(outs) - len(names)
    state.after_vmap(dict(zip(names, outs[k:])))
    return outs[:k], info["plan"]


def _vmap_failure(primary: nn.Module, e: Exception) -> HyperloomError:
    """What went wrong under ``vmap`` and the ways out (the model's own switches for Hugging Face models)."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    hf = ""
    if "attn_mask" in msg and "not differentiable" in msg:  # SDPA on CPU with a predicted attention bias (T5's block 0)
        hf = (
            "; here the attention mask carries a predicted tensor (e.g. T5's relative_attention_bias, in block 0) and "
            "CPU scaled-dot-product attention cannot differentiate through it under vmap: build the model with "
            "attn_implementation='eager', predict other blocks, or pass per_sample='loop'"
        )
    elif type(primary).__module__.startswith("transformers"):
        hf = (
            "; in Hugging Face models a 2-D attention_mask leads to such a branch: causal models run under vmap "
            "with attn_implementation='eager', encoders (BERT) with a prepared additive float mask of shape "
            "(B, 1, 1, L) and attn_implementation='eager'"
        )
    return HyperloomError(
        f"Per-sample mode could not run {type(primary).__name__} under torch.func.vmap "
        f"({type(e).__name__}: {msg}){batchnorm_hint(e)}; {_VMAP_HINT}{hf}"
    )


def rebuild_vmap(stacked: list[torch.Tensor], op: _OutPlan) -> Any:
    it = iter(stacked)
    leaves: list[Any] = []
    for kind, d, c in zip(op.kinds, op.dims, op.consts):
        if kind == "tensor":
            assert d is not None
            leaves.append(next(it).movedim(0, d))
        elif kind == "scalar":
            leaves.append(next(it))
        else:
            leaves.append(c)
    return tree_unflatten(leaves, op.spec)


def run_loop(primary: nn.Module, theta: ParamDict, state: BufferState, plan: _Plan, out_dims: OutDims, n: int) -> Any:
    """A Python loop over samples, each a call with a batch of one; outputs combined by the module's rule.

    Each sample gets its own copy of the buffers from ``state`` (see :mod:`hyperloom.buffers`).
    """
    outs: list[list[Any]] = []
    spec: TreeSpec | None = None
    for i in range(n):
        given = state.sample(i)
        tensors = {k: v[i] for k, v in theta.items()}
        tensors.update(given)
        leaves = [x.narrow(d, i, 1) if d is not None else x for x, d in zip(plan.leaves, plan.dims)]
        a, kw = _unflatten_call(plan, leaves)
        try:
            out = functional_call(primary, tensors, a, kw, tie_weights=False, strict=False)
        except HyperloomError:
            raise
        except Exception as e:
            raise HyperloomError(
                f"Per-sample call {i} of {n} of {type(primary).__name__} failed: {type(e).__name__}: {e}{batchnorm_hint(e)}"
            ) from e
        state.after_sample(i, given, tensors)
        flat, s = tree_flatten(out)
        if spec is None:
            spec = s
        elif s != spec:
            raise HyperloomError(f"Per-sample calls of {type(primary).__name__} returned different output structures: {spec} and {s}")
        outs.append(flat)
    assert spec is not None
    ods = _out_dims_per_leaf(out_dims, spec, spec.num_leaves)
    combined: list[Any] = []
    for j, od in enumerate(ods):
        col = [o[j] for o in outs]
        first = col[0]
        if any(isinstance(c, torch.Tensor) for c in col):
            if not all(isinstance(c, torch.Tensor) for c in col):
                kinds = sorted({type(c).__name__ for c in col})
                raise HyperloomError(f"{_leaf_path(spec, j)} is a tensor for some samples and not for others ({kinds})")
            d = _sample_dim(first, od, spec, j)
            for c in col[1:]:
                same = c.dim() == first.dim() and all(a == b for k, (a, b) in enumerate(zip(c.shape, first.shape)) if k != d)
                if not same:
                    raise HyperloomError(
                        f"{_leaf_path(spec, j)} has shapes {tuple(first.shape)} and {tuple(c.shape)} for different samples: "
                        "per-sample outputs can only be stacked when they agree outside the sample dimension"
                    )
                _sample_dim(c, od, spec, j)
            combined.append(torch.stack(col) if d is None else torch.cat(col, dim=d))
        elif all(_is_constant(c) for c in col):
            combined.append(first if all(_same_constant(c, first) for c in col) else list(col))
        else:
            for c in col:
                if not _is_constant(c):
                    _other_leaf(c, spec, j)
            combined.append(None)
    return tree_unflatten(combined, spec)


SharedCall = Callable[[ParamDict, tuple[Any, ...], dict[str, Any]], Any]


def check_against_shared(theta: ParamDict, plan: _Plan, per_sample_out: Any, run_shared: SharedCall) -> None:
    """Compare stacked per-sample output shapes with a shared call's (see the module docstring).

    Raises:
        HyperloomError: Naming the output whose sample dimension is not the one ``out_dims`` says.
    """
    a, kw = _unflatten_call(plan, plan.leaves)
    try:
        with torch.no_grad():
            ref = run_shared({k: v[0] for k, v in theta.items()}, a, kw)
    except Exception:  # the model may only work per sample; nothing to compare with then
        return
    got_flat, got_spec = tree_flatten(per_sample_out)
    ref_flat, ref_spec = tree_flatten(ref)
    if got_spec != ref_spec:
        return
    for i, (g, r) in enumerate(zip(got_flat, ref_flat)):
        if not (isinstance(g, torch.Tensor) and isinstance(r, torch.Tensor)):
            continue
        if r.dim() == 0 and g.dim() == 1:
            continue  # a per-sample scalar (a loss): (B,) per sample, () shared
        if tuple(g.shape) != tuple(r.shape):
            raise HyperloomError(
                f"{_leaf_path(got_spec, i)} came out as {tuple(g.shape)} but a shared call of the same batch "
                f"gives {tuple(r.shape)}: its sample dimension is not the one out_dims says; pass out_dims to hypernetize "
                "with the sample dimension of each output (e.g. out_dims=(0, 1) for nn.GRU's (output, h_n) with batch_first=True)"
            )


__all__ = [
    "InDims",
    "OutDims",
    "SharedCall",
    "batchnorm_hint",
    "check_against_shared",
    "plan_arguments",
    "rebuild_vmap",
    "run_loop",
    "run_vmap",
    "validate_in_dims",
]
