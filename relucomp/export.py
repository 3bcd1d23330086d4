"""Verified ONNX export.

``export_onnx`` writes one self-contained ``.onnx`` file (no external data)
only after

1. ``onnx.checker.check_model(full_check=True)`` passes,
2. the ReLU elements per image are counted from the ONNX graph itself
   (shape inference over every ``Relu`` node) and, when ``max_relus`` is given,
   are ≤ it,
3. onnxruntime's output on a verification batch matches the torch model
   (batch size ≠ the export example's, so the dynamic batch axis is exercised).

Counting uses the one ONNX walker (:mod:`relucomp.onnx_graph`): every
comparison-bearing op counts against ``max_relus`` (MaxPool only with
``include_maxpool``).  A failed check 2./3. is a relucomp bug
(:class:`~relucomp.errors.ExportCheckError`, an ``InternalError``).  The file is
written with :func:`relucomp.atomic.atomic_write` (temporary file in the target
directory, renamed into place); on any failure nothing is left on disk.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .atomic import atomic_write
from .errors import ExportCheckError, ExportError, RelucompError
from .onnx_graph import walk

__all__ = ["export_onnx", "ort_run", "read_metadata", "ExportError", "ExportCheckError"]


def _torch_export(model: nn.Module, example: torch.Tensor, path: str, opset: int) -> None:
    """Write ``model`` as ONNX with a dynamic batch axis.

    The TorchScript exporter first (≈1–2 s for these graphs), its output cleaned by onnxscript's optimizer
    (constant folding, dead code); the dynamo exporter (``torch.export``) only when TorchScript cannot
    trace the model — its first call in a process costs 15–60 s of set-up on 2 CPU cores, most of a
    short compile's export stage.  Either output is checked the same way by :func:`export_onnx`.
    """
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example,), path, dynamo=False, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=opset)
        except Exception:  # noqa: BLE001 - fall back to the dynamo exporter
            batch = torch.export.Dim("batch", min=1, max=1 << 16)
            torch.onnx.export(model, (example,), path, dynamo=True, external_data=False, optimize=True,
                              input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: batch},), opset_version=opset, verbose=False)
            return
        import onnx
        from onnxscript import ir, optimizer

        # constants folded, lifted to initializers and dead code removed first: the TorchScript graph of a PI
        # lowering holds Constant nodes for every Slice/Gather operand (2,040 nodes for 470 in the demo's `runs`
        # form), and the optimizer's pattern rewriter costs per node and rule (9 s there); run on the lifted
        # graph, the optimizer makes the same nodes in a fraction of the time
        graph = ir.serde.deserialize_model(onnx.load(path))
        optimizer.fold_constants(graph)
        ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(graph)
        optimizer.remove_unused_nodes(graph)
        optimizer.optimize_ir(graph)
        onnx.save(ir.serde.serialize_model(graph), path)


def ort_run(path: str | Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    example: torch.Tensor,
    verify_batch: torch.Tensor | None = None,
    metadata: dict[str, Any] | None = None,
    max_relus: int | None = None,
    opset: int = 18,
    include_maxpool: bool = False,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> dict[str, Any]:
    """Export ``model`` to ``path`` after checking it; return the check results."""
    import onnx

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create output directory {path.parent}: {exc.strerror}",
                          "choose a writable --out directory") from exc
    if not os.access(path.parent, os.W_OK):
        raise ExportError(f"output directory {path.parent} is not writable", "choose a writable --out directory")
    model = model.eval()
    result: dict[str, Any] = {}

    def write(tmp: str) -> None:
        _torch_export(model, example[:1].contiguous(), tmp, opset)
        proto = onnx.load(tmp)
        meta = {"relucomp_version": __version__, **{k: v for k, v in (metadata or {}).items()}}
        try:
            counts = walk(proto, include_maxpool=include_maxpool)
        except RelucompError as exc:        # our own export: its shapes are ours to get right
            raise ExportCheckError(f"the exported graph cannot be walked: {exc.cause}") from exc
        meta["onnx_relu_count"] = counts["relus"]
        meta["onnx_comparisons"] = counts["comparisons"]
        del proto.metadata_props[:]
        for k, v in meta.items():
            entry = proto.metadata_props.add()
            entry.key = str(k)
            entry.value = v if isinstance(v, str) else json.dumps(v)
        onnx.checker.check_model(proto, full_check=True)
        n = counts["budgeted_comparisons"]
        if max_relus is not None and n > max_relus:
            other = {k: v for k, v in counts["comparisons_by_op"].items() if k != "Relu"}
            raise ExportCheckError(f"exported graph evaluates {n} ReLUs per image, above the budget {max_relus}"
                                   + (f" (comparisons by op: {counts['comparisons_by_op']})" if other else ""))
        onnx.save(proto, tmp)
        vb = verify_batch if verify_batch is not None else torch.randn(3, *example.shape[1:])
        with torch.no_grad():
            ref = model(vb).detach().cpu().numpy()
        got = ort_run(tmp, vb.detach().cpu().numpy().astype(np.float32))
        max_diff = float(np.max(np.abs(ref - got))) if ref.size else 0.0
        if ref.shape != got.shape or not np.allclose(got, ref, atol=atol, rtol=rtol):
            raise ExportCheckError(f"onnxruntime output differs from torch (max |diff| = {max_diff:.3g})")
        result.update({"onnx_relus": counts["relus"], "relu_nodes": len(counts["relu_nodes"]),
                       "comparisons": counts["comparisons"], "comparisons_by_op": counts["comparisons_by_op"],
                       "budgeted_comparisons": n, "maxpool_comparisons": counts["maxpool_comparisons"],
                       "ort_max_abs_diff": max_diff, "verify_batch": int(vb.shape[0]), "opset": opset})

    atomic_write(path, write)
    return {"path": str(path), **result, "bytes": path.stat().st_size}


def read_metadata(path: str | Path) -> dict[str, Any]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    out = {}
    for p in proto.metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except (ValueError, TypeError):
            out[p.key] = p.value
    return out
