"""The typed compile report (``OUT/report.json``), built by the stages and read through this type.

:class:`CompileReport` is a dataclass with a schema version; ``to_dict()`` is
what ``report.json`` holds and ``from_dict()`` reads it back.  Dict-style
access (``rep["relus"]["after"]``, ``rep.get("pruning")``, ``"export" in rep``)
keeps working for users and tests; library code (CLI, sweep, HTML report) uses
the typed accessors below.  Adding a report section = one field here (default
``None`` / empty) filled by its stage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

SCHEMA_VERSION = 2
OPTIONAL = ("export", "exports", "sweep", "dp", "robustness")  # present in report.json only when set

__all__ = ["CompileReport", "DPReport", "SCHEMA_VERSION"]


@dataclass
class DPReport:
    """The ``dp`` section: what the DP-SGD finetune (:mod:`relucomp.dp`) spent and how.

    ``epsilon_target`` / ``epsilon_spent`` are ``None`` for ε = ∞ (``private``
    false: clipping without noise); ``epsilon_spent`` is the accountant's.
    """

    private: bool = True
    epsilon_target: float | None = None
    epsilon_spent: float | None = None
    delta: float = 0.0
    noise_multiplier: float = 0.0
    max_grad_norm: float = 1.0
    sample_rate: float = 0.0
    expected_batch_size: int = 0
    steps: int = 0
    epochs: int = 0
    accountant: str = "rdp"
    sampling: str = "poisson"
    phase: str = "finetune"
    n_train: int = 0
    ema_decay: float | None = None
    ema_warmup: bool | None = None
    kd: bool = False
    kd_weight: float = 0.0
    lr: float | None = None                                 # the DP optimizer's peak LR (unset: recipe.dp_finetune_lr)
    heldout_grad_norms: dict[str, Any] | None = None        # per-sample gradient norms on validation, share C clips
    augmult: int = 1                                        # augmentations averaged per sampled image
    conversion: list[str] = field(default_factory=list)     # BatchNorm folded / replaced, in-place ops
    phases: dict[str, Any] = field(default_factory=dict)    # DP phases: steps and ε after each (search, finetune)
    history: list[dict[str, Any]] = field(default_factory=list)
    covers: str = ""
    export_weights: str = "ema"
    fairness: dict[str, Any] | None = None  # CEAG under DP: held-out duals (relucomp.dp_fairness), else None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DPReport":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


@dataclass
class CompileReport:
    relucomp_version: str = ""
    model: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    pretrain: dict[str, Any] = field(default_factory=dict)
    relus: dict[str, int] = field(default_factory=dict)            # before, after, budget, gate_budget, hidden_*
    comparisons: dict[str, Any] = field(default_factory=dict)      # comparisons no gate controls (before/after)
    macs: dict[str, int] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    maxpool_comparisons: dict[str, int] = field(default_factory=dict)
    per_layer: list[dict[str, Any]] = field(default_factory=list)
    accuracy: dict[str, Any] = field(default_factory=dict)
    group_accuracy: dict[str, Any] = field(default_factory=dict)
    fairness: dict[str, Any] | None = None
    diagnostics: dict[str, Any] | None = None
    search: dict[str, Any] = field(default_factory=dict)
    search_history: list[dict[str, Any]] = field(default_factory=list)
    lambda_trace: list[Any] = field(default_factory=list)
    finetune_history: list[dict[str, Any]] = field(default_factory=list)
    passes: list[dict[str, Any]] = field(default_factory=list)
    pruning: dict[str, Any] | None = None
    phases_seconds: dict[str, float] = field(default_factory=dict)
    export: dict[str, Any] | None = None    # the pi export (OUT/model.onnx)
    exports: dict[str, dict[str, Any]] | None = None  # every export by target: {"pi": ..., "edge": ...}
    sweep: dict[str, Any] | None = None
    dp: DPReport | None = None
    robustness: dict[str, Any] | None = None                      # relucomp.robustness.RobustnessResult.to_dict()
    schema_version: int = SCHEMA_VERSION

    # -- dict form -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in OPTIONAL:
            if d[k] is None:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CompileReport":
        names = {f.name for f in fields(cls)}
        rep = cls(**{k: v for k, v in d.items() if k in names})
        if isinstance(rep.dp, dict):
            rep.dp = DPReport.from_dict(rep.dp)
        if "schema_version" not in d:
            rep.schema_version = 1  # written before the typed report
        return rep

    def __getitem__(self, key: str) -> Any:
        if key not in self:
            raise KeyError(key)
        return getattr(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in {f.name for f in fields(self)}:
            raise KeyError(f"CompileReport has no section {key!r} (add a field to relucomp/compile_report.py)")
        setattr(self, key, value)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and hasattr(self, key) and not (key in OPTIONAL and getattr(self, key) is None)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self else default

    def keys(self) -> list[str]:
        return list(self.to_dict())

    # -- typed accessors used by the CLI, sweep and the HTML report --------------------
    @property
    def relus_after(self) -> int:
        return int(self.relus["after"])

    @property
    def relus_before(self) -> int:
        return int(self.relus["before"])

    @property
    def budget(self) -> int:
        return int(self.relus["budget"])

    @property
    def gate_budget(self) -> int:
        """What the gates were given: the budget less the comparisons no gate controls."""
        return int(self.relus.get("gate_budget", self.relus["budget"]))

    @property
    def test_accuracy(self) -> tuple[float, float]:
        """(dense, compiled) test accuracy in points."""
        return float(self.accuracy["before"]["test"]), float(self.accuracy["after"]["test"])

    @property
    def group_names(self) -> list[str]:
        ga = self.group_accuracy or {}
        return list(ga.get("groups") or list(ga.get("before", {})))

    @property
    def fair_method(self) -> str:
        return (self.sweep or {}).get("method") or (self.fairness or {}).get("method") or "nft"

    def fairness_test(self, weights: str = "last") -> dict[str, Any]:
        """The fairness report of the test split for ``weights`` (``last`` / ``ema``), or {}."""
        res = (self.fairness or {}).get("results") or {}
        return (res.get(weights) or {}).get("test") or {}

    @property
    def robustness_result(self):
        """The ``robustness`` section as a typed :class:`~relucomp.robustness.RobustnessResult` (or None)."""
        from .robustness import RobustnessResult

        return RobustnessResult.from_dict(self.robustness) if self.robustness else None

    @property
    def max_psi(self) -> float | None:
        return self.fairness_test().get("max_psi")

    @property
    def export_weights(self) -> str:
        """The weights in model.onnx / model.pt (``last`` / ``ema``)."""
        return self.options.get("export_weights") or "last"
