"""The one exception type hyperloom raises for user errors."""

from __future__ import annotations


class HyperloomError(ValueError):
    """Raised for every user error detected by hyperloom.

    Messages name the offending key and show the expected versus the actual
    value (shape, dtype, device, range), or list the valid options.

    Example:
        >>> import hyperloom as hl
        >>> try:
        ...     hl.Input(1.0, 0.0)
        ... except hl.HyperloomError as e:
        ...     print(e)
        Input range must satisfy low < high, got low=1.0, high=0.0
    """


def short_repr(x: object, limit: int = 60) -> str:
    """``repr(x)`` cut to ``limit`` characters, for error messages."""
    r = repr(x)
    return r if len(r) <= limit else r[: limit - 3] + "..."
