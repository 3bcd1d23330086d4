"""User-facing errors.

Every error a user can cause is a :class:`RelucompError` carrying a one-line
``cause`` and a ``fix``.  The CLI prints ``error: <cause>\n  fix: <fix>`` and
exits with status 2 instead of showing a traceback from deep inside torch.
"""

from __future__ import annotations


class RelucompError(Exception):
    """An error caused by the user's input, with the fix spelled out."""

    def __init__(self, cause: str, fix: str | None = None):
        self.cause = cause
        self.fix = fix
        super().__init__(cause if fix is None else f"{cause} (fix: {fix})")


class BudgetError(RelucompError, ValueError):
    """A ReLU / MAC budget that cannot be parsed or met."""


class ModelLoadError(RelucompError):
    """A model spec, architecture name or checkpoint that cannot be loaded."""


class TraceError(RelucompError):
    """A model torch.fx cannot trace."""


class DataError(RelucompError, ValueError):
    """A data spec, folder, column or group that is missing or malformed."""


class PassError(RuntimeError):
    """A compiler pass broke the graph (lint) or changed its numerics.

    This is a bug in relucomp (or in a user-supplied pass), not bad input; the
    message names the failing pass.
    """

    def __init__(self, pass_name: str, message: str):
        self.pass_name = pass_name
        super().__init__(f"pass {pass_name!r} failed: {message}")
