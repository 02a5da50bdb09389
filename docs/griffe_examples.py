"""A griffe extension for the API reference: Google-style ``Example:`` sections render as code.

griffe's Google parser recognises the plural ``Examples:`` as a section of ``>>>`` code and renders
the singular ``Example:`` (which the docstrings here use, and ruff's google convention accepts) as an
admonition of plain text. This reads the singular as the plural, in the documentation build only.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SINGULAR = re.compile(r"^(\s*)Example:\s*$", flags=re.M)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _SINGULAR.sub(r"\1Examples:", obj.docstring.value)
