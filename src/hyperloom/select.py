r"""Choosing which parameters of a model the hypernetwork predicts.

A selector is one of:

* a module type (``nn.Conv2d``): every parameter directly owned by a module
  of that type, and the original tensors of its parametrized tensors
  (``torch.nn.utils.parametrizations.weight_norm``: ``weight`` is predicted as
  ``parametrizations.weight.original0`` / ``original1``);
* a string: an exact parameter name (``"conv1.weight"``), an exact module
  name (``"enc.0"``, all its parameters), or a glob (``"enc.*.conv.*"``,
  matched against parameter and module names with :mod:`fnmatch`);
* a compiled regular expression (``re.compile(r"dec\.\d+\.weight")``),
  full-matched against parameter and module names.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from typing import Union

from torch import nn

from .errors import HyperloomError

Selector = Union[type[nn.Module], str, "re.Pattern[str]"]

_GLOB_CHARS = set("*?[")


def _describe(sel: object) -> str:
    if isinstance(sel, type):
        return sel.__name__
    if isinstance(sel, re.Pattern):
        return f"re.compile({sel.pattern!r})"
    return repr(sel)


def _module_params(model: nn.Module, module_name: str) -> list[str]:
    prefix = module_name + "." if module_name else ""
    return [prefix + n for n, _ in model.get_submodule(module_name).named_parameters(remove_duplicate=False)]


def _parametrized_originals(mod: nn.Module, prefix: str) -> list[str]:
    """The original tensors of ``mod``'s parametrized tensors (``parametrizations.weight.original0`` ...).

    A module with ``torch.nn.utils.parametrize`` parametrizations (``parametrizations.weight_norm``,
    ``orthogonal``, ...) holds its weight as the originals; selecting the module by type predicts them (the
    parametrization then maps the generated originals as usual).
    """
    plists = getattr(mod, "parametrizations", None)
    if not isinstance(plists, nn.ModuleDict):
        return []
    return [
        f"{prefix}parametrizations.{t}.{n}"
        for t, plist in plists.items()
        for n, _ in plist.named_parameters(recurse=False, remove_duplicate=False)
    ]


def _match(model: nn.Module, sel: object, param_names: list[str]) -> list[str]:
    if isinstance(sel, type) and issubclass(sel, nn.Module):
        out = []
        for mname, mod in model.named_modules():
            if isinstance(mod, sel):
                prefix = mname + "." if mname else ""
                out += [prefix + n for n, _ in mod.named_parameters(recurse=False, remove_duplicate=False)]
                out += _parametrized_originals(mod, prefix)
        return out
    if isinstance(sel, str) or isinstance(sel, re.Pattern):
        if isinstance(sel, re.Pattern):
            pat: re.Pattern[str] = sel

            def hit(name: str) -> bool:
                return pat.fullmatch(name) is not None
        elif _GLOB_CHARS & set(sel):
            glob = sel

            def hit(name: str) -> bool:
                return fnmatch.fnmatchcase(name, glob)
        else:
            exact = sel

            def hit(name: str) -> bool:
                return name == exact

        out = [n for n in param_names if hit(n)]
        for mname, _ in model.named_modules():
            if mname and hit(mname):
                out += _module_params(model, mname)
        return out
    raise HyperloomError(
        f"Unsupported predict selector {sel!r}: use a module type (nn.Conv2d), a parameter or module name, "
        "a glob ('enc.*.weight') or a compiled regex"
    )


def select_parameters(model: nn.Module, predict: Selector | Sequence[Selector] | None = None) -> list[str]:
    """Names of the parameters of ``model`` matched by ``predict``.

    Args:
        model: The primary network.
        predict: A selector, a list of selectors, or ``None`` for every
            parameter.

    Returns:
        Matched parameter names, in ``model.named_parameters()`` order.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 10))
        >>> select_parameters(net, [nn.Conv2d])
        ['0.weight', '0.bias']
        >>> select_parameters(net, "*.bias")
        ['0.bias', '3.bias']

    Raises:
        HyperloomError: If a selector matches nothing (the message lists the
            model's parameter names and module types), two selectors match the
            same parameter, a selected parameter is tied to another name, or a
            selected parameter is not floating point or uninitialised.
    """
    # every name a parameter is reachable by, tied aliases included, so a selector that names the
    # second owner of a tied tensor (a Linear sharing an Embedding's weight) is refused, not skipped
    all_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    aliases: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    if not all_names:
        raise HyperloomError(f"The model {type(model).__name__} has no parameters to predict")
    if predict is None:
        selected = list(all_names)
    else:
        sels = list(predict) if isinstance(predict, (list, tuple)) else [predict]
        if not sels:
            raise HyperloomError("predict is an empty list; pass None to predict every parameter")
        owner: dict[str, object] = {}
        for sel in sels:
            names = _match(model, sel, all_names)
            if not names and not isinstance(sel, type):
                bufs = [n for n, _ in model.named_buffers()]
                hit = _match(nn.Module(), sel, bufs) if bufs else []
                if hit:
                    raise HyperloomError(
                        f"predict selector {_describe(sel)} matches buffer(s) {hit[:8]}, not parameters: buffers (running "
                        "statistics, masks, position ids) are not trained and cannot be predicted; select parameters "
                        f"(parameter names: {all_names[:12]})"
                    )
            if not names:
                types = sorted({type(m).__name__ for m in model.modules() if next(m.parameters(False), None) is not None})
                shown = all_names[:12] + (["..."] if len(all_names) > 12 else [])
                raise HyperloomError(
                    f"predict selector {_describe(sel)} matched no parameter; parameter names: {shown}; "
                    f"module types with parameters: {types}"
                )
            for n in dict.fromkeys(names):
                if n in owner:
                    raise HyperloomError(f"Parameter {n!r} is selected twice: by {_describe(owner[n])} and by {_describe(sel)}")
                owner[n] = sel
        selected = [n for n in all_names if n in owner]

    params = dict(model.named_parameters(remove_duplicate=False))
    for n in selected:
        p = params[n]
        if len(aliases[id(p)]) > 1:
            raise HyperloomError(
                f"Parameter {n!r} is tied to {aliases[id(p)]}: tied parameters cannot be predicted "
                "(untie them or leave them out of predict)"
            )
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise HyperloomError(f"Parameter {n!r} is uninitialised (lazy module): run one forward pass first")
        if not p.dtype.is_floating_point:
            raise HyperloomError(f"Parameter {n!r} has dtype {p.dtype}; only floating parameters can be predicted")
    return selected


__all__ = ["Selector", "select_parameters"]
