"""Export targets: one compiled model, two deployment-specific ONNX graphs.

* ``pi``   — PI-ready (:class:`~relucomp.passes.pi_lowering.PILoweringPass`): ``Relu``
  only on the kept elements, so the ReLU count on the ONNX graph is the budget;
  the data movement around them is chosen by the 2PC cost model.  ``OUT/model.onnx``.
* ``edge`` — plaintext-optimal (:class:`~relucomp.passes.edge_lowering.EdgeLoweringPass`):
  every partially linearized layer is ``Max(x, x·s)`` (s = 0 kept / 1 removed),
  fully linearized layers fold into their neighbours; for onnxruntime and other
  plaintext runtimes.  ``Max`` is comparison-bearing, so the PI budget check
  does not apply; the file's metadata says ``export_target = edge``.
  ``OUT/model.edge.onnx``.

Both are verified in onnxruntime against the torch model before they are
written (:func:`relucomp.export.export_onnx`).  :func:`export_compiled` exports
from a compile output directory (``model.pt``) without retraining.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import EXPORT_TARGETS as CHOICES
from .errors import RelucompError

TARGETS = ("pi", "edge")
FILENAMES = {"pi": "model.onnx", "edge": "model.edge.onnx"}


def parse_target(target: str) -> tuple[str, ...]:
    """``"pi" | "edge" | "both"`` → the targets to export; a clear error otherwise."""
    t = str(target).strip().lower()
    if t not in CHOICES:
        raise RelucompError(f"unknown export target {target!r}", "use --export-target pi | edge | both")
    return TARGETS if t == "both" else (t,)


def target_metadata(target: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    meta = {k: v for k, v in (base or {}).items() if k not in ("relucomp_version", "onnx_relu_count")}
    meta["export_target"] = target
    if target == "edge":
        meta["export_note"] = ("plaintext target: partially linearized layers are Max(x, x*s) (s = 0 where the ReLU is "
                               "kept, 1 where removed); not a PI graph, onnx_relu_count counts Relu nodes only")
    return meta


def export_model(model: torch.nn.Module, out_path: str | Path, target: str, *, example: torch.Tensor,
                 verify_batch: torch.Tensor | None = None, metadata: dict[str, Any] | None = None,
                 budget: int | None = None, **export_kwargs: Any) -> dict[str, Any]:
    """Export an already lowered ``model`` for ``target`` (verified; the budget checked for pi only).

    ``export_kwargs`` (``opset``, ``include_maxpool``) go to :func:`relucomp.export.export_onnx`."""
    from .export import export_onnx

    if target not in TARGETS:
        raise RelucompError(f"unknown export target {target!r}", "use pi or edge")
    res = export_onnx(model, out_path, example=example, verify_batch=verify_batch,
                      metadata=target_metadata(target, metadata), max_relus=budget if target == "pi" else None,
                      **export_kwargs)
    res["export_target"] = target
    if target == "edge":
        res["partial_layers"] = partial_layers(model)
    return res


def partial_layers(model: torch.nn.Module) -> int:
    """Partially linearized layers of an edge-lowered model (pixel or channel masks): each costs an extra pass over
    its activation in onnxruntime, where the dense model's ReLUs are fused into its convolutions for free."""
    from .passes.edge_lowering import MaskedReLU

    return sum(isinstance(m, MaskedReLU) for m in model.modules())


def edge_note(n_partial: int) -> str:
    """What an edge export with ``n_partial`` partially linearized layers costs in plaintext (measured,
    ``benchmarks/results/export.json``), and the alternative."""
    if not n_partial:
        return ""
    return (f"{n_partial} partially linearized layer{'s' if n_partial != 1 else ''}: in onnxruntime about 1.1-1.45x "
            "the dense model's latency (export.json); --granularity layer runs at parity")


def export_compiled(out_dir: str | Path, target: str = "both", *, verify_batch: torch.Tensor | None = None,
                    model: torch.nn.Module | None = None, metadata: dict[str, Any] | None = None,
                    opset: int = 18) -> dict[str, dict[str, Any]]:
    """Export the compiled model in ``out_dir`` (``model.pt``) for ``target`` ("pi", "edge" or "both").

    Rebuilds the gated model from ``model.pt`` (no retraining), lowers it for each
    target and writes ``OUT/model.onnx`` (pi) / ``OUT/model.edge.onnx`` (edge).  The
    metadata of an existing ``OUT/model.onnx`` (accuracy, fairness...) is carried
    over (or ``metadata`` is used).  ``model``: the architecture, for a model compiled
    from a Python object.  Returns ``{target: export result}``.  ``relucomp export``
    calls this.
    """
    from .api import load_compiled
    from .export import read_metadata
    from .train import load_state

    targets = parse_target(target)
    out = Path(out_dir)
    pt = out / "model.pt" if out.is_dir() else out
    if not pt.exists():
        raise RelucompError(f"{pt} does not exist", "pass the --out directory of a finished relucomp compile")
    out = pt.parent
    info = (load_state(pt) or {}).get("info", {}) if pt.exists() else {}
    base: dict[str, Any] = dict(metadata or {})
    if not base and (out / "model.onnx").exists():
        try:
            base = read_metadata(out / "model.onnx")
        except Exception:  # noqa: BLE001 - an unreadable old export only loses its metadata
            base = {}
    base.setdefault("architecture", info.get("spec"))
    base.setdefault("granularity", info.get("granularity"))
    base.setdefault("relu_budget", info.get("budget"))
    size = int(info.get("image_size", 32))
    example = torch.randn(1, 3, size, size)
    vb = verify_batch if verify_batch is not None else torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(0))
    results = {}
    for t in targets:
        gm = load_compiled(pt, model=model, gate_form=t)
        kept = sum(int(n.meta.get("relucomp", {}).get("relus_kept", 0)) for n in gm.graph.nodes)
        results[t] = export_model(gm, out / FILENAMES[t], t, example=example, verify_batch=vb,
                                  metadata={**base, "relu_count": kept}, budget=info.get("budget"), opset=opset,
                                  include_maxpool=bool(info.get("budget_includes_maxpool", False)))
    return results


def describe(meta: dict[str, Any]) -> str | None:
    """One line for ``relucomp inspect``: the export target recorded in an ONNX file's metadata."""
    t = meta.get("export_target")
    if t is None:
        return None
    return f"export target: {t}" + (" (plaintext: partial layers are Max(x, x*s), no PI budget check)" if t == "edge" else
                                     " (PI-ready: Relu only on kept elements)" if t == "pi" else "")


__all__ = ["TARGETS", "CHOICES", "FILENAMES", "parse_target", "export_model", "export_compiled", "describe",
           "target_metadata", "partial_layers", "edge_note"]
