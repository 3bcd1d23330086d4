"""``relucomp pi-bench`` and ``relucomp estimate``: measured and estimated private-inference cost.

Both print a table (or ``--json``); the logic lives in :mod:`relucomp.pi.bench`
and :mod:`relucomp.pi.estimate`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..budget import human
from ..errors import RelucompError
from .app import AsJson, ImageSize, NumClasses, app, errors_handled, log, mb, out_console


@app.command("pi-bench")
def pi_bench_cmd(
    model: Optional[Path] = typer.Argument(None, help="ONNX file to run under 2PC (e.g. OUT/model.onnx)"),
    protocol: str = typer.Option("cheetah", "--protocol", help="cheetah | semi2k (SPU 2PC protocols)"),
    batch: int = typer.Option(1, "--batch", help="images per inference"),
    repeat: int = typer.Option(6, "--repeat", "-n", help="timed runs after one warm-up run (mean, median and slow runs "
                                                          "reported; ≥ 6 includes Cheetah's periodic OT refill)"),
    weights: str = typer.Option("private", "--weights",
                                help="private: weights stay on the server (HE linear layers); secret: secret-shared "
                                     "with the client; public: the client knows the model"),
    setup: bool = typer.Option(False, "--setup", help="build the SPU venv (Python 3.11, spu 0.9.5) and exit if no MODEL"),
    force: bool = typer.Option(False, "--force", help="with --setup: rebuild the venv"),
    timeout: float = typer.Option(1800.0, "--timeout", help="seconds before the run is stopped"),
    profile: bool = typer.Option(False, "--profile", help="add SPU's per-op time / bytes breakdown"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="also write the result as JSON here"),
    as_json: AsJson = False,
) -> None:
    """Run MODEL.onnx under a real two-party protocol (server and client as two processes on 127.0.0.1)."""
    from ..pi import bench

    with errors_handled():
        if setup:
            bench.setup_venv(force=force, log=log)
            if model is None:
                return
        if model is None:
            raise RelucompError("pi-bench needs an ONNX file", "relucomp pi-bench OUT/model.onnx (or --setup alone)")
        res = bench.pi_bench(model, protocol=protocol, batch=batch, repeat=repeat, weights=weights, timeout=timeout,
                             profile=profile, log=log)
    if out is not None:
        from ..atomic import atomic_write_json

        atomic_write_json(out, res)
    if as_json:
        sys.stdout.write(json.dumps(res, indent=2) + "\n")
        return
    t = Table(title=f"relucomp pi-bench: {Path(res['model']).name} ({res['protocol']}, weights {res['weights']}, "
                    f"batch {res['batch']})")
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("ReLUs / image (from the ONNX graph)", f"{res['relus']:,}")
    if res["maxpool_comparisons"]:
        t.add_row("MaxPool comparisons / image", f"{res['maxpool_comparisons']:,} (PI pays for these too)")
    t.add_row("MACs / image", human(res["macs"]))
    t.add_row("latency mean / median", f"{res['latency_mean_s'] * 1e3:,.0f} / {res['latency_median_s'] * 1e3:,.0f} ms, "
              f"{res['slow_runs']} slow run(s) > {res['slow_factor']}× median  (runs: "
              + ", ".join(f"{v * 1e3:,.0f}" for v in res["latency_runs_s"]) + ")")
    t.add_row("communication / inference", mb(res["bytes"]) + f"  (server→client {mb(res['bytes_by_party']['server_sent'])}, "
              f"client→server {mb(res['bytes_by_party']['client_sent'])})")
    s = res["setup"]
    t.add_row("one-time setup", f"protocol {s['one_time_protocol_setup_s']:.1f} s (first run {res['first_run_s']:.1f} s, "
              f"{mb(res['first_run_bytes'])}); weights {s['weights_share_s']:.2f} s / {mb(s['weights_share_bytes'])}; "
              f"compile {s['compile_wall_s']:.1f} s")
    e = res["error"]
    t.add_row("output error vs plaintext", f"max |Δ| {e['max_abs_vs_onnxruntime']:.2e} (logits up to {e['output_scale']:.2g}), "
              f"argmax agreement {100 * (e['argmax_agreement'] or 0):.0f}%")
    m = res["machine"]
    t.add_row("machine", f"{m['cores']} cores, {m['cpu']}, {m['network']}")
    out_console.print(t)
    if profile and res.get("profile"):
        p = Table(title="SPU per-op breakdown (server, last run)")
        for c in ("op", "count", "seconds", "sent"):
            p.add_column(c, justify="right" if c != "op" else "left")
        for row in sorted(res["profile"], key=lambda r: -r["seconds"])[:12]:
            p.add_row(row["op"], str(row["count"]), f"{row['seconds']:.3f}", mb(row["send_bytes"]))
        out_console.print(p)


@app.command("estimate")
def estimate_cmd(
    model: str = typer.Argument(..., help="an ONNX file, or a model spec (resnet8, file.py:factory...)"),
    relus: Optional[str] = typer.Option(None, "--relus", help="plan for this many ReLUs instead of the model's (15k, 10%)"),
    protocol: str = typer.Option("cheetah", "--protocol", help="cheetah | semi2k (a configuration must be fitted)"),
    weights: str = typer.Option("private", "--weights", help="private | public | secret (as in pi-bench)"),
    num_classes: NumClasses = 10,
    image_size: ImageSize = 32,
    as_json: AsJson = False,
) -> None:
    """Estimate 2PC latency and communication from the cost model fitted to pi-bench runs on this machine."""
    from ..pi.estimate import estimate, relu_calls

    with errors_handled():
        res = estimate(model, relus=relus, config=f"{protocol}-{weights}", num_classes=num_classes, image_size=image_size)
    if as_json:
        sys.stdout.write(json.dumps(res, indent=2, default=str) + "\n")
        return
    c, p, f = res["costs"], res["predicted"], res["linear_floor"]
    t = Table(title=f"relucomp estimate: {res['target']} ({res['config']}, 2PC)")
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("ReLUs / image", f"{c['relus']:,}")
    if c.get("maxpool_comparisons"):
        t.add_row("MaxPool comparisons / image", f"{c['maxpool_comparisons']:,} (costed as ReLUs; --replace-maxpool removes them)")
    t.add_row("MACs / image", human(c["macs"]))
    if c.get("gather_elements"):
        t.add_row("gathered elements / image", f"{c['gather_elements']:,}")
    t.add_row(f"estimated latency ({res['statistic']})", f"{p['latency_s'] * 1e3:,.0f} ms (linear floor "
              f"{f['latency_s'] * 1e3:,.0f} ms)")
    t.add_row("predicts", res["statistic_note"])
    t.add_row("estimated communication", f"{mb(p['bytes'])} (linear floor {mb(f['bytes'])})")
    co = res["coefficients"]
    calls = co["latency_s"].get("relu_calls", 0.0)
    t.add_row("cost model", f"{co['latency_s']['relus'] * 1e6:.1f} µs + {co['bytes']['relus']:.0f} B per ReLU, "
              + (f"{calls * 1e3:.1f} ms per ReLU call ({relu_calls(c)} here), " if calls else "")
              + f"{co['latency_s']['macs'] * 1e9:.2f} ns per MAC, const {co['latency_s']['const'] * 1e3:.0f} ms")
    err = res.get("model_error")
    if err:
        t.add_row("model error vs measurement", f"latency median {100 * err['latency_median_abs_rel']:.1f}% / max "
                  f"{100 * err['latency_max_abs_rel']:.1f}%, bytes median {100 * err['bytes_median_abs_rel']:.1f}% / max "
                  f"{100 * err['bytes_max_abs_rel']:.1f}% over {err['runs']} pi-bench runs")
    else:
        t.add_row("model error vs measurement", "unknown: built-in defaults (run benchmarks/bench_pi.py to fit)")
    t.add_row("source", str(res.get("source")))
    out_console.print(t)
    if res.get("fit"):
        ft = Table(title="cost model vs pi-bench measurements")
        for col in ("run", "ReLUs", "MACs", "measured", "estimated", "error"):
            ft.add_column(col, justify="left" if col == "run" else "right")
        for r in res["fit"]:
            ft.add_row(r["name"], f"{r['relus']:,}", human(r["macs"]), f"{r['measured_latency_s'] * 1e3:,.0f} ms",
                       f"{r['predicted_latency_s'] * 1e3:,.0f} ms", f"{100 * r['latency_rel_err']:+.1f}%")
        out_console.print(ft)
