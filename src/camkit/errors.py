"""The one exception class camkit raises for bad input or unsupported models."""

from __future__ import annotations

__all__ = ["CamkitError"]


class CamkitError(ValueError):
    """Raised when camkit is given input it cannot use.

    The message always says what was given, what was expected, and how to
    find a valid value. It subclasses :class:`ValueError` so that code which
    already catches ``ValueError`` keeps working.
    """
