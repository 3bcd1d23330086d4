"""Fast PI cost estimates: a linear cost model fitted from ``pi-bench`` runs on this machine.

``latency ≈ c0 + c_relu·(ReLUs + MaxPool comparisons) + c_mac·MACs + c_gather·gathered elements
+ c_where·selected elements`` and the same form for bytes.  The data-movement terms (``Gather``,
and ``Where`` of the compaction networks of :mod:`relucomp.passes.pi_lowering`) use coefficients
measured from SPU's per-op profile; the rest is fitted.  There is one set of
coefficients per configuration (protocol × how the weights enter: ``cheetah-private``
— the default —, ``cheetah-public``...).  The coefficients live in ``cost_model.json``
beside this file (written by ``benchmarks/bench_pi.py`` via :func:`fit`), with
every measurement they were fitted on and the model's error on each, so
:func:`estimate` can state how far to trust it.  A MaxPool comparison is
costed as one ReLU (``max(a, b) = b + relu(a − b)``: one comparison and one
multiplexer, the same protocol as a ReLU).

The model predicts the **mean** latency / bytes per inference over timed runs
(``statistic`` in ``cost_model.json``; pi-bench runs include Cheetah's periodic
OT-pool refill, which a median hides).  A cost model fitted before this was
recorded predicts the median (``statistic: "median"``), and :func:`estimate`
says so.

Counting is done from the ONNX graph itself (shape inference; no torch), or,
for a model spec, from relucomp's own analysis of the traced model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

COST_MODEL = Path(__file__).with_name("cost_model.json")
#: ``relu_calls``: ReLU nodes that evaluate at least one element — each is one protocol invocation with its
#: own communication rounds (``benchmarks/bench_pi_calls.py``: ≈19 ms per call in Cheetah on loopback),
#: paid by a partially linearized layer at any budget
FEATURES = ("const", "relus", "relu_calls", "macs", "gather_elements", "where_elements")
STATISTICS = ("mean", "median")

#: used when no cost_model.json is present: 2-core machine, loopback, SPU 0.9.5 Cheetah
#: (0.44 s floor and ~15.7 µs / ~100 B per ReLU for resnet8, per the reference measurements)
DEFAULT_MODEL: dict[str, Any] = {
    "protocol": "cheetah",
    "latency_s": {"const": 0.05, "relus": 15.7e-6, "macs": 3.2e-8, "gather_elements": 1.5e-6, "where_elements": 6e-8},
    "bytes": {"const": 0.0, "relus": 100.0, "macs": 0.024, "gather_elements": 0.0, "where_elements": 0.0},
    "lowering": {"relu_element_s": 15.7e-6, "gather_element_s": 1.5e-6, "copy_element_s": 5e-8, "op_s": 2e-4},
    "source": "built-in defaults (no fitted cost_model.json)",
}


def onnx_costs(model: Any) -> dict[str, Any]:
    """Count, per image, what a 2PC runtime pays for in an ONNX model (from the graph; one walker)."""
    from ..onnx_graph import walk

    c = walk(model)
    return {"relus": c["relus"], "relu_nodes": len(c["relu_nodes"]), "maxpool_comparisons": c["maxpool_comparisons"],
            "comparisons": c["comparisons"], "comparisons_by_op": c["comparisons_by_op"], "macs": c["macs"],
            "gather_elements": c["gather_elements"], "where_elements": c["where_elements"],
            "slice_ops": c["slice_ops"], "ops": c["ops"], "input_shape": c["input_shape"], "params": c["params"]}


def load_cost_model(path: str | Path | None = None, config: str | None = None) -> dict[str, Any]:
    """The coefficients of one configuration (default: the file's ``default``, e.g. ``cheetah-private``)."""
    p = Path(path) if path is not None else COST_MODEL
    if p.exists():
        try:
            m = json.loads(p.read_text())
        except (OSError, ValueError):
            m = {}
        if "configs" in m:
            key = config or m.get("default")
            if key not in m["configs"]:
                from ..errors import RelucompError

                raise RelucompError(f"the cost model has no configuration {key!r}",
                                    f"use one of {', '.join(m['configs'])}")
            common = {k: v for k, v in m.items() if k not in ("configs", "default")}
            return {**common, **m["configs"][key], "config": key, "configs": list(m["configs"])}
        if "latency_s" in m and "bytes" in m:
            return m
    return dict(DEFAULT_MODEL)


def relu_calls(costs: dict[str, Any]) -> int:
    """ReLU protocol invocations per inference: the graph's ReLU nodes (none when no ReLU is left)."""
    if costs["relus"] + costs.get("maxpool_comparisons", 0) == 0:
        return 0
    return int(costs.get("relu_nodes", 0))


def features(costs: dict[str, Any]) -> dict[str, float]:
    return {"const": 1.0, "relus": float(costs["relus"] + costs.get("maxpool_comparisons", 0)),
            "relu_calls": float(relu_calls(costs)), "macs": float(costs["macs"]), "gather_elements": float(costs.get("gather_elements", 0)),
            "where_elements": float(costs.get("where_elements", 0))}


def predict(costs: dict[str, Any], model: dict[str, Any] | None = None) -> dict[str, float]:
    m = model or load_cost_model()
    f = features(costs)
    lat = sum(m["latency_s"].get(k, 0.0) * v for k, v in f.items())
    byt = sum(m["bytes"].get(k, 0.0) * v for k, v in f.items())
    return {"latency_s": lat, "bytes": byt}


def fit(runs: Sequence[dict[str, Any]], *, protocol: str = "cheetah", machine: dict | None = None,
        lowering: dict | None = None, fixed: dict[str, dict[str, float]] | None = None,
        statistic: str = "mean") -> dict[str, Any]:
    """Fit the coefficients (non-negative least squares on relative error) to pi-bench results.

    Each run needs ``relus``, ``maxpool_comparisons``, ``macs``, ``gather_elements``, ``relu_nodes``,
    ``latency_s`` and ``bytes`` (a :func:`relucomp.pi.bench.pi_bench` result) and a ``name``.
    ``statistic="mean"`` (default) fits ``latency_mean_s`` / ``bytes_mean`` where a run has
    them (the per-inference expectation, refills included), ``"median"`` the medians.
    ``fixed`` (``{"latency_s": {"gather_elements": 1.7e-6}, ...}``) pins coefficients measured
    elsewhere (the data-movement terms, from SPU's per-op profile); the rest are fitted.
    """
    import numpy as np
    from scipy.optimize import nnls

    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}")
    if statistic == "mean":
        runs = [{**r, "latency_s": r.get("latency_mean_s", r["latency_s"]), "bytes": r.get("bytes_mean", r["bytes"])}
                for r in runs]
    else:
        runs = [{**r, "latency_s": r.get("latency_median_s", r["latency_s"])} for r in runs]
    X = np.array([[features(r)[k] for k in FEATURES] for r in runs], dtype=np.float64)
    model: dict[str, Any] = {"protocol": protocol, "statistic": statistic}
    for target in ("latency_s", "bytes"):
        pinned = (fixed or {}).get(target, {})
        y_all = np.array([float(r[target]) for r in runs])
        y = y_all - sum(X[:, FEATURES.index(k)] * v for k, v in pinned.items())
        w = 1.0 / np.maximum(y_all, 1e-12)  # relative error: small models matter as much as big ones
        cols = [j for j in range(len(FEATURES)) if FEATURES[j] not in pinned
                and (X[:, j].max() > X[:, j].min() or FEATURES[j] == "const")]
        scale = np.array([max(X[:, j].max(), 1.0) for j in cols])
        coef, _ = nnls((X[:, cols] / scale) * w[:, None], y * w)
        full = {k: 0.0 for k in FEATURES}
        for j, c, s in zip(cols, coef, scale):
            full[FEATURES[j]] = float(c / s)
        full.update({k: float(v) for k, v in pinned.items()})
        model[target] = full
    rows, errs_l, errs_b = [], [], []
    for r in runs:
        p = predict(r, model)
        el = p["latency_s"] / r["latency_s"] - 1.0
        eb = p["bytes"] / r["bytes"] - 1.0 if r["bytes"] else 0.0
        errs_l.append(abs(el))
        errs_b.append(abs(eb))
        rows.append({"name": r.get("name", Path(str(r.get("model", "?"))).stem), "relus": r["relus"],
                     "relu_calls": relu_calls(r), "macs": r["macs"],
                     "gather_elements": r.get("gather_elements", 0), "where_elements": r.get("where_elements", 0),
                     "maxpool_comparisons": r.get("maxpool_comparisons", 0),
                     "measured_latency_s": r["latency_s"], "predicted_latency_s": p["latency_s"], "latency_rel_err": el,
                     "measured_bytes": r["bytes"], "predicted_bytes": p["bytes"], "bytes_rel_err": eb})
    model["fit"] = rows
    model["error"] = {"latency_median_abs_rel": float(np.median(errs_l)), "latency_max_abs_rel": float(max(errs_l)),
                      "bytes_median_abs_rel": float(np.median(errs_b)), "bytes_max_abs_rel": float(max(errs_b)),
                      "runs": len(runs)}
    if lowering:
        model["lowering"] = lowering
    if machine:
        model["machine"] = machine
    return model


def model_costs(spec: str, *, num_classes: int = 10, image_size: int = 32) -> dict[str, Any]:
    """Costs of a model spec (built-in name, file.py:factory...) from relucomp's analysis (dense model)."""
    from ..api import inspect as inspect_api  # lazy: the driver imports torch

    info = inspect_api(spec, num_classes=num_classes, image_size=image_size)
    tot = info["total"]
    return {"relus": tot["relus_kept"], "maxpool_comparisons": tot.get("maxpool_comparisons", 0), "macs": tot["macs"],
            "gather_elements": 0, "relu_nodes": sum(1 for r in info["layers"] if r["kind"] in ("relu", "gate", "sparse_relu")),
            "input_shape": [1, 3, image_size, image_size], "params": tot["params"]}


def estimate(target: str | Path, *, relus: int | str | None = None, cost_model: str | Path | None = None,
             config: str | None = None, num_classes: int = 10, image_size: int = 32) -> dict[str, Any]:
    """Estimate 2PC latency and communication of an ONNX file or a model spec.

    ``relus`` overrides the ReLU count (budget planning: "what would this model
    cost at B ReLUs?"; the MACs stay those of the model).
    """
    from ..errors import RelucompError

    t = str(target)
    if t.endswith(".onnx"):
        if not Path(t).exists():
            raise RelucompError(f"ONNX file {t} does not exist", "check the path")
        costs = onnx_costs(t)
        kind = "onnx"
    else:
        costs = model_costs(t, num_classes=num_classes, image_size=image_size)
        kind = "spec"
    if relus is not None:  # "15k", "10%" (of the model's ReLUs) or an int
        from ..budget import parse_count

        costs = {**costs, "relus": parse_count(relus, total=costs["relus"])}
    m = load_cost_model(cost_model, config)
    p = predict(costs, m)
    floor = predict({**costs, "relus": 0, "maxpool_comparisons": 0, "gather_elements": 0, "where_elements": 0}, m)
    stat = m.get("statistic", "median")  # cost models fitted before the statistic was recorded used medians
    note = ("mean latency per inference over timed runs, Cheetah's periodic OT-pool refill included" if stat == "mean"
            else "median latency over timed runs (hides the periodic OT-pool refill: refit on means with "
                 "benchmarks/bench_pi.py)")
    return {"target": t, "kind": kind, "costs": costs, "predicted": p, "linear_floor": floor,
            "statistic": stat, "statistic_note": note,
            "coefficients": {"latency_s": m["latency_s"], "bytes": m["bytes"]},
            "model_error": m.get("error"), "fit": m.get("fit", []), "protocol": m.get("protocol", "cheetah"),
            "config": m.get("config", "default"), "weights": m.get("weights"), "configs": m.get("configs", []),
            "machine": m.get("machine"), "source": m.get("source", str(COST_MODEL))}
