"""The one exception class camkit raises for bad input or unsupported models, and how it warns."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

__all__ = ["CamkitError", "warn_at_caller"]

_PACKAGE = str(Path(__file__).resolve().parent) + os.sep


class CamkitError(ValueError):
    """Raised when camkit is given input it cannot use.

    The message always says what was given, what was expected, and how to
    find a valid value. It subclasses :class:`ValueError` so that code which
    already catches ``ValueError`` keeps working.
    """


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """Warn at the first frame outside camkit: the user's line, however deep the call.

    Python's default filter then shows a warning once per line of the user's code, so a
    loop (or :func:`camkit.dataset.explain_dataset` over many batches) warns once.
    """
    frame, level = sys._getframe(1), 2  # level 2: this function's caller
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(
        _PACKAGE
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
