"""What every stage shares: the run state the driver threads through the stages, and the Stage record.

A stage is a module of :mod:`relucomp.stages` with ``NAME``, an output
dataclass, and ``run(st: RunState) -> Output`` (plus, optionally,
``when(st) -> bool`` to skip it).  The driver (:func:`relucomp.stages.run`)
times each stage (``phases_seconds``) and stores its output in
``st.results[NAME]``; later stages read earlier outputs with ``st[NAME]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import CompileConfig
from ..train import Checkpointer


@dataclass
class Hooks:
    """What a run needs that is not configuration: Python objects and callbacks (never written to config.toml)."""

    model: Any = None                    # an nn.Module given as an object (deep-copied)
    data: Any = None                     # a relucomp.data.DataBundle given as an object
    leaf_modules: Sequence[type] = ()
    search_snapshots: Sequence[int] = ()
    on_snapshot: Callable[[int, dict], None] | None = None
    search_state: dict | None = None     # warm start (budget sweeps): a searched gated state
    log: Callable[[str], None] | None = None


HOOK_NAMES = ("leaf_modules", "search_snapshots", "on_snapshot", "search_state", "log")


@dataclass
class RunState:
    cfg: CompileConfig
    hooks: Hooks
    out: Path | None = None
    ckpt: Checkpointer = field(default_factory=lambda: Checkpointer(None))
    resume_state: dict[str, Any] | None = None
    phases: dict[str, float] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    progress: Any = None                 # a rich Progress (or a no-op) shared by the training stages

    def __getitem__(self, name: str) -> Any:
        return self.results[name]

    def say(self, msg: str) -> None:
        from ..distributed import is_main

        if self.hooks.log is not None and is_main():  # multi-process: rank 0 logs
            self.hooks.log(msg)

    def resuming(self, phase: str) -> dict[str, Any] | None:
        """The checkpoint to continue if the run was interrupted in ``phase``."""
        s = self.resume_state
        return s if s is not None and s.get("phase") == phase else None


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[RunState], Any]
    when: Callable[[RunState], bool] = lambda st: True
