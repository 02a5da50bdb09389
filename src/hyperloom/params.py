"""A parameter container keyed by ``state_dict`` dotted names.

``nn.ParameterDict`` refuses dots in keys; :class:`ParamStore` nests plain
containers instead, so ``store["enc.0.weight"]`` lives at
``store.enc[0].weight`` and its ``state_dict`` key is ``"enc.0.weight"``,
exactly the primary network's name.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from .errors import HyperloomError


class ParamStore(nn.Module):
    """Named, freezable parameters keyed like the primary network's ``state_dict``.

    Args:
        tensors: Mapping ``dotted name -> initial value`` (values are copied).
        requires_grad: Whether the parameters are trainable at first.

    Example:
        >>> store = ParamStore({"conv1.weight": torch.zeros(4, 1, 3, 3), "conv1.bias": torch.zeros(4)})
        >>> list(store.state_dict())
        ['conv1.weight', 'conv1.bias']
        >>> store.freeze("conv1.bias")
        >>> store["conv1.bias"].requires_grad
        False

    Raises:
        HyperloomError: On an empty or duplicate name, or a name that is both
            a parameter and a prefix of another (``"a"`` and ``"a.b"``).
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], *, requires_grad: bool = True) -> None:
        super().__init__()
        self._names: list[str] = []
        for name, value in tensors.items():
            self._add(name, nn.Parameter(value.detach().clone(), requires_grad=requires_grad))

    def _add(self, name: str, param: nn.Parameter) -> None:
        parts = name.split(".")
        if not name or any(not p for p in parts):
            raise HyperloomError(f"Invalid parameter name {name!r}")
        if name in self._names:
            raise HyperloomError(f"Parameter {name!r} added twice")
        # Entries go straight into ``_modules`` / ``_parameters``: a name such as ``keys``, ``values``
        # or ``freeze`` (common in attention code) must not collide with this container's methods.
        # Attribute access (``store.keys``) still finds the method; items are reached with ``store[name]``.
        node: nn.Module = self
        for part in parts[:-1]:
            if part in node._parameters:
                raise HyperloomError(f"Cannot store parameter {name!r}: {part!r} is already a parameter, not a module")
            child = node._modules.get(part)
            if child is None:
                child = nn.Module()
                node._modules[part] = child
            node = child
        if parts[-1] in node._modules:
            raise HyperloomError(f"Cannot store parameter {name!r}: {parts[-1]!r} already holds other parameters")
        node._parameters[parts[-1]] = param
        self._names.append(name)

    def __getitem__(self, name: str) -> nn.Parameter:
        if name not in self._names:
            raise KeyError(f"{name!r} is not a stored parameter; stored: {self._names}")
        node: nn.Module = self
        *path, leaf = name.split(".")
        for part in path:
            node = node._modules[part]  # type: ignore[assignment]
        return node._parameters[leaf]  # type: ignore[return-value]

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def keys(self) -> list[str]:
        """Stored names in insertion order."""
        return list(self._names)

    def items(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` pairs in insertion order."""
        return [(k, self[k]) for k in self._names]

    def values(self) -> list[nn.Parameter]:
        """Parameters in insertion order."""
        return [self[k] for k in self._names]

    def _select(self, names: Iterable[str]) -> list[str]:
        chosen = list(names) or self._names
        bad = [n for n in chosen if n not in self._names]
        if bad:
            raise HyperloomError(f"Unknown parameter name(s) {bad}; stored: {self._names}")
        return chosen

    def freeze(self, *names: str) -> None:
        """Stop training the named parameters (all when no name is given).

        Raises:
            HyperloomError: On a name that is not stored.
        """
        for n in self._select(names):
            self[n].requires_grad_(False)

    def unfreeze(self, *names: str) -> None:
        """Train the named parameters again (all when no name is given).

        Raises:
            HyperloomError: On a name that is not stored.
        """
        for n in self._select(names):
            self[n].requires_grad_(True)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}: {tuple(self[k].shape)}" for k in self._names)


__all__ = ["ParamStore"]
