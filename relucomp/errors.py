"""All user-facing errors, and the one class of internal failures.

Every error a user can cause is a :class:`RelucompError` carrying a one-line
``cause`` and a ``fix``.  The CLI prints ``error: <cause>\n  fix: <fix>`` and
exits with status :data:`USER_ERROR_EXIT` (2) instead of showing a traceback
from deep inside torch.

A failure that is relucomp's fault (a pass that broke the graph, an export
that disagrees with torch) is an :class:`InternalError`; the CLI says it is a
bug, how to report it, and exits with :data:`INTERNAL_ERROR_EXIT` (3).
"""

from __future__ import annotations

USER_ERROR_EXIT = 2
INTERNAL_ERROR_EXIT = 3
INTERRUPTED_EXIT = 130
BUG_REPORT = ("this is a relucomp bug: please report it with the command, OUT/config.toml and the model "
              "(relucomp issue tracker)")


class RelucompError(Exception):
    """An error caused by the user's input, with the fix spelled out."""

    def __init__(self, cause: str, fix: str | None = None):
        self.cause = cause
        self.fix = fix
        super().__init__(cause if fix is None else f"{cause} (fix: {fix})")


class ConfigError(RelucompError, ValueError):
    """An option (flag, keyword or config-file field) that is invalid; raised before any work."""


class BudgetError(RelucompError, ValueError):
    """A ReLU / MAC budget that cannot be parsed or met."""


class ModelLoadError(RelucompError):
    """A model spec, architecture name or checkpoint that cannot be loaded."""


class TraceError(RelucompError):
    """A model torch.fx cannot trace."""


class DataError(RelucompError, ValueError):
    """A data spec, folder, column or group that is missing or malformed."""


class FairConfigError(RelucompError, ValueError):
    """Invalid fairness settings (method, tolerance, groups)."""


class ExportError(RelucompError):
    """The ONNX model cannot be written (e.g. unwritable directory); nothing was written."""


class Interrupted(RelucompError):
    """Training stopped by Ctrl-C (after saving a resumable checkpoint when there is an output directory)."""


class AlreadyFinished(RelucompError):
    """``--resume`` on an output directory whose run already finished."""


class InternalError(RuntimeError):
    """A relucomp bug (not bad input).  The CLI exits with status 3 and says how to report it."""

    def __init__(self, message: str):
        self.cause = message
        self.fix = BUG_REPORT
        super().__init__(message)


class PassError(InternalError):
    """A compiler pass broke the graph (lint) or changed its numerics.

    This is a bug in relucomp (or in a user-supplied pass), not bad input; the
    message names the failing pass.
    """

    def __init__(self, pass_name: str, message: str):
        self.pass_name = pass_name
        super().__init__(f"pass {pass_name!r} failed: {message}")


class ExportCheckError(InternalError, ExportError):
    """The exported graph failed a check (onnxruntime disagrees with torch, ReLUs above the budget): a bug."""

    def __init__(self, cause: str, fix: str | None = None):
        InternalError.__init__(self, cause)
        self.fix = fix or BUG_REPORT
