"""Pass infrastructure (modelled on onnx-ir's ``_pass_infra`` and torch.fx ``passes/infra``).

A pass is a class with ``call(gm) -> PassResult``.  ``PassResult.modified`` is
honest: running the same pass again on its own output returns ``False``.
Analysis passes (:class:`AnalysisPass`) only write ``node.meta["relucomp"]``.

:class:`PassManager` runs a list of passes and, after each one,

1. lints the graph (``fx.Graph.lint`` plus relucomp's own checks),
2. for passes that declare ``preserves_semantics``, compares the module's
   output on a calibration batch with the output before the pass,
3. records wall time and the pass's stats,

and raises :class:`~relucomp.errors.PassError` naming the failing pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import fx

from .errors import PassError
from . import verify


@dataclass
class PassResult:
    gm: fx.GraphModule
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class of a graph transform.

    Subclasses implement :meth:`call`.  ``preserves_semantics`` tells the
    PassManager to check numerical equivalence after the pass; ``requires`` and
    ``ensures`` are optional pre/post-condition checks that raise on failure.
    """

    preserves_semantics: bool = True
    #: absolute/relative tolerances for the equivalence check (float32 refolding
    #: changes rounding, never values)
    atol: float = 1e-4
    rtol: float = 1e-4

    @property
    def name(self) -> str:
        return type(self).__name__

    def requires(self, gm: fx.GraphModule) -> None:  # pragma: no cover - default no-op
        """Raise if ``gm`` does not satisfy this pass's preconditions."""

    def ensures(self, gm: fx.GraphModule) -> None:  # pragma: no cover - default no-op
        """Raise if the pass's postconditions do not hold on ``gm``."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        self.requires(gm)
        result = self.call(gm)
        if not isinstance(result, PassResult):
            raise PassError(self.name, f"call() returned {type(result).__name__}, expected PassResult")
        if result.modified:
            result.gm.graph.lint()
            result.gm.recompile()
        self.ensures(result.gm)
        return result


class AnalysisPass(Pass):
    """A pass that only writes metadata; it never modifies the graph."""

    preserves_semantics = True

    def analyze(self, gm: fx.GraphModule) -> dict[str, Any]:
        raise NotImplementedError

    def call(self, gm: fx.GraphModule) -> PassResult:
        return PassResult(gm, False, self.analyze(gm) or {})


@dataclass
class PassRecord:
    name: str
    modified: bool
    seconds: float
    stats: dict[str, Any]
    max_abs_diff: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "pass": self.name,
            "modified": self.modified,
            "seconds": round(self.seconds, 4),
            "max_abs_diff": self.max_abs_diff,
            "stats": self.stats,
        }


class PassManager:
    """Run passes in order, lint and verify after each.

    ``calibration`` is an input batch (a tensor or a tuple of tensors) used for
    the equivalence check; without it only linting is done.
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        calibration: torch.Tensor | tuple | None = None,
        check: bool = True,
        on_pass: Callable[[PassRecord], None] | None = None,
    ):
        self.passes = list(passes)
        self.calibration = calibration
        self.check = check
        self.on_pass = on_pass
        self.records: list[PassRecord] = []

    def _outputs(self, gm: fx.GraphModule):
        return verify.run_eval(gm, self.calibration)

    def run(self, gm: fx.GraphModule) -> PassResult:
        any_modified = False
        last = None  # outputs after the previous checked pass: the next pass's reference
        for p in self.passes:
            reference = None
            if self.check and self.calibration is not None and p.preserves_semantics:
                reference = last if last is not None else self._outputs(gm)
            last = None
            t0 = time.perf_counter()
            try:
                result = p(gm)
            except PassError:
                raise
            except Exception as exc:  # noqa: BLE001 - wrap with the failing pass's name
                if getattr(exc, "cause", None) is not None:  # a RelucompError: user input
                    raise
                raise PassError(p.name, f"{type(exc).__name__}: {exc}") from exc
            seconds = time.perf_counter() - t0
            gm = result.gm
            diff = None
            if self.check:
                problems = verify.lint(gm)
                if problems:
                    raise PassError(p.name, "graph lint failed: " + "; ".join(problems))
                # checked even when the pass reports modified=False: an in-place weight
                # change behind a dishonest flag is exactly what this check is for
                if reference is not None:
                    after = self._outputs(gm)
                    ok, diff = verify.allclose(reference, after, atol=p.atol, rtol=p.rtol)
                    if not ok:
                        raise PassError(
                            p.name,
                            f"output changed on the calibration batch (max |diff| = {diff:.3g}, "
                            f"atol={p.atol}, rtol={p.rtol})",
                        )
                    last = after
            rec = PassRecord(p.name, result.modified, seconds, result.stats, diff)
            self.records.append(rec)
            if self.on_pass:
                self.on_pass(rec)
            any_modified |= result.modified
        return PassResult(gm, any_modified, {"passes": [r.to_dict() for r in self.records]})
