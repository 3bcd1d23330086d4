"""``relucomp`` command line: one module per command group, all registered on :data:`app`.

* :mod:`.app` — the typer app, shared options, error handling (imported by every command module);
* :mod:`.compile` — ``compile``, ``inspect``, ``version``;
* :mod:`.evaluate` — ``evaluate`` (robustness of an existing compile output);
* :mod:`.sweep` — ``sweep``, ``report``;
* :mod:`.pi` — ``pi-bench``, ``estimate``.

Adding a command: a function in the group's module decorated with
``@app.command(...)`` (or a new module imported below).
"""

from __future__ import annotations

from . import compile as _compile  # noqa: F401  (registers the commands)
from . import evaluate as _evaluate  # noqa: F401
from . import pi as _pi  # noqa: F401
from . import sweep as _sweep  # noqa: F401
from .app import app

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover
    app()
