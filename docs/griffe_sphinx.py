"""A griffe extension for the API reference: the docstrings' Sphinx habits, rendered for Markdown.

* griffe's Google parser recognises the plural ``Examples:`` as a section of ``>>>`` code and renders the
  singular ``Example:`` (which the docstrings here use, and ruff's google convention accepts) as an admonition
  of plain text: the singular is read as the plural.
* Sphinx roles (``:func:`hypernetize```, ``:class:`~hyperloom.HyperNetwork```) become code spans (the ``~``
  form shows the last component, as Sphinx does).

Only the documentation build sees these changes; the source keeps its docstrings.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SINGULAR = re.compile(r"^(\s*)Example:\s*$", flags=re.M)
_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc|py:\w+):`(~?)([^`]+)`")


def _role(m: re.Match[str]) -> str:
    target = m.group(2)
    return f"`{target.rsplit('.', 1)[-1] if m.group(1) else target}`"


class SphinxHabits(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_role, _SINGULAR.sub(r"\1Examples:", obj.docstring.value))
