"""``relucomp pi-bench``: run an ONNX model under a real two-party protocol (SPU).

The driver runs in relucomp's own environment; SPU 0.9.5 needs Python < 3.12,
numpy < 2 and jax ≤ 0.4.34, so it lives in a separate venv that
:func:`setup_venv` builds once (``$RELUCOMP_PI_VENV``, else
``$RELUCOMP_CACHE/pi-venv``, else ``~/.cache/relucomp/pi-venv``); relucomp's
own install is never changed.  :func:`pi_bench`

1. compiles the model (ONNX → JAX → SPU bytecode) in a worker process,
2. starts the server (party 0, the weights) and the client (party 1, the
   image) as two separate processes talking over brpc on 127.0.0.1,
3. collects latency (mean, median and the slow-run count over ``repeat`` timed
   runs; the first run, which holds the protocol's one-time setup, is reported
   apart), bytes on the wire and the output error against onnxruntime in plaintext.

Cheetah refills its OT pool periodically (≈ every 3rd dense resnet8 run: +1.9 s,
+1.2 MB), so a median over few runs hides a real cost.  The default is
:data:`DEFAULT_REPEAT` ≥ 6 timed runs; ``slow_runs`` counts runs slower than
:data:`SLOW_FACTOR` × the median, and the cost model is fitted on the means.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import RelucompError

SPU_VERSION = "0.9.5"
#: what the SPU venv gets (spu pulls jax[cpu] ≤ 0.4.34 and numpy < 2 itself)
VENV_REQUIREMENTS = [f"spu=={SPU_VERSION}", "onnx>=1.15,<1.18", "numpy>=1.22,<2"]
PROTOCOLS = ("cheetah", "semi2k")
#: how the server's weights enter the protocol: ``private`` (they never leave the server; Cheetah's
#: HE linear layers with plaintext weights), ``secret`` (additively secret-shared with the client),
#: ``public`` (the client knows the model; linear layers are local, only the activations are secret)
WEIGHTS = ("private", "secret", "public")
WORKER = Path(__file__).with_name("worker.py")
#: timed runs by default: enough to include Cheetah's periodic OT-pool refill (≈ every 3rd run)
DEFAULT_REPEAT = 6
#: a run slower than this × the median counts as a slow run (a refill)
SLOW_FACTOR = 1.2


def run_stats(runs: list[float], bytes_runs: list[int] | None = None) -> dict[str, Any]:
    """Mean, median, slow-run count (> SLOW_FACTOR × median) of timed runs (and their bytes)."""
    med = float(np.median(runs))
    slow = [i for i, v in enumerate(runs) if v > SLOW_FACTOR * med]
    out = {"latency_mean_s": float(np.mean(runs)), "latency_median_s": med, "slow_runs": len(slow),
           "slow_run_indices": slow, "slow_factor": SLOW_FACTOR}
    if bytes_runs:
        out["bytes_mean"] = float(np.mean(bytes_runs))
    return out


class PIBenchError(RelucompError):
    """pi-bench could not run (no SPU venv, a worker failed...)."""


def cache_root() -> Path:
    from ..cache import cache_root as root  # the one cache root; with caching off the venv still needs a home

    return root() or Path.home() / ".cache" / "relucomp"


def venv_dir() -> Path:
    env = os.environ.get("RELUCOMP_PI_VENV")
    return Path(env) if env else cache_root() / "pi-venv"


def venv_python(path: Path | None = None) -> Path | None:
    """The SPU venv's python if the venv is set up (its marker file exists), else None."""
    d = Path(path) if path is not None else venv_dir()
    py = d / "bin" / "python"
    return py if py.exists() and (d / "relucomp-pi.json").exists() else None


def find_base_python() -> str | None:
    """A Python 3.10/3.11 interpreter to build the venv from (SPU 0.9.5 has no wheels for others)."""
    cands = [os.environ.get("RELUCOMP_PI_PYTHON"), "python3.11", "python3.10"]
    if sys.version_info[:2] in ((3, 10), (3, 11)):
        cands.append(sys.executable)
    for c in cands:
        if not c:
            continue
        exe = shutil.which(c) or (c if os.path.exists(c) else None)
        if not exe:
            continue
        try:
            v = subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True, timeout=60).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        if v in ("3.10", "3.11"):
            return exe
    return None


def setup_venv(*, path: Path | None = None, python: str | None = None, force: bool = False,
               log: Callable[[str], None] = print) -> Path:
    """Create the SPU venv (once) and return its python."""
    d = Path(path) if path is not None else venv_dir()
    if not force and venv_python(d) is not None:
        log(f"SPU venv ready at {d}")
        return d / "bin" / "python"
    base = python or find_base_python()
    if base is None:
        raise PIBenchError("no Python 3.10 or 3.11 found to build the SPU venv (SPU 0.9.5 needs Python < 3.12)",
                           "install python3.11 (e.g. apt-get install python3.11-venv) or set RELUCOMP_PI_PYTHON")
    if force and d.exists():
        shutil.rmtree(d)
    d.parent.mkdir(parents=True, exist_ok=True)
    log(f"creating SPU venv at {d} from {base}")
    subprocess.run([base, "-m", "venv", str(d)], check=True)
    py = d / "bin" / "python"
    log(f"installing {' '.join(VENV_REQUIREMENTS)} (one time, ~300 MB)")
    r = subprocess.run([str(py), "-m", "pip", "install", "--quiet", *VENV_REQUIREMENTS],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise PIBenchError(f"pip could not install SPU into {d}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}",
                           "check network access to PyPI, then rerun `relucomp pi-bench --setup`")
    check = subprocess.run([str(py), "-c", "import json, spu, jax, onnx, numpy; print(json.dumps({'spu': spu.__version__, "
                            "'jax': jax.__version__, 'onnx': onnx.__version__, 'numpy': numpy.__version__}))"],
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise PIBenchError(f"the SPU venv at {d} does not import spu/jax: {check.stderr.strip().splitlines()[-1:]}",
                           "rerun `relucomp pi-bench --setup --force`")
    (d / "relucomp-pi.json").write_text(json.dumps({"versions": json.loads(check.stdout), "requirements": VENV_REQUIREMENTS,
                                                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
    log(f"SPU venv ready: {check.stdout.strip()}")
    return py


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1]) // 1024
    except (OSError, StopIteration, ValueError):
        mem = None
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_mib": mem, "platform": platform.platform(),
            "network": "loopback 127.0.0.1 (both parties on this machine)"}


def _worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONNOUSERSITE"] = "1"
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


def _run_worker(py: Path, args: list[str], result: Path, *, timeout: float, log_path: Path) -> dict:
    with open(log_path, "w") as logf:
        try:
            subprocess.run([str(py), str(WORKER), *args, "--result", str(result)], stdout=logf, stderr=subprocess.STDOUT,
                           env=_worker_env(), timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise PIBenchError(f"the pi-bench worker ({args[0]}) ran past {timeout:.0f}s", "raise --timeout") from exc
    return _read_result(result, log_path, args[0])


def _read_result(result: Path, log_path: Path, what: str) -> dict:
    if not result.exists():
        tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
        raise PIBenchError(f"the pi-bench worker ({what}) died without a result; its log ends with:\n{tail}",
                           "see the log above; rerun `relucomp pi-bench --setup --force` if the SPU venv is broken")
    res = json.loads(result.read_text())
    if not res.get("ok"):
        raise PIBenchError(f"the pi-bench worker ({what}) failed: {res.get('error')}",
                           "only static graphs with the ops relucomp emits are supported (see relucomp.pi.onnx2jax)")
    return res


def plaintext_jax(model: str | Path, x: np.ndarray, *, timeout: float = 600) -> np.ndarray:
    """The translator's plaintext output (run in the SPU venv) — checks onnx2jax against onnxruntime."""
    py = venv_python()
    if py is None:
        raise PIBenchError("the SPU venv is not set up", "run `relucomp pi-bench --setup`")
    with tempfile.TemporaryDirectory(prefix="relucomp-pi-") as tmp:
        t = Path(tmp)
        np.save(t / "x.npy", np.asarray(x, np.float32))
        _run_worker(py, ["plain", "--model", str(Path(model).resolve()), "--image", str(t / "x.npy"), "--out", str(t / "y.npy")],
                    t / "plain.json", timeout=timeout, log_path=t / "plain.log")
        return np.load(t / "y.npy", allow_pickle=False)


def _ort(model: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _profile_lines(text: str) -> list[dict[str, Any]]:
    import re

    rows = []
    if "HLO profiling" in text:  # one block per run: keep the last (a warm run)
        text = text[text.rindex("HLO profiling"):]
        text = text[: text.index("HAL profiling")] if "HAL profiling" in text else text
    pat = re.compile(r"- (pphlo\.[^,]+(?:: [^,]+)?), executed (\d+) times, duration ([0-9.e+-]+)s, send bytes (\d+)")
    for m in pat.finditer(text):
        rows.append({"op": m.group(1), "count": int(m.group(2)), "seconds": float(m.group(3)), "send_bytes": int(m.group(4))})
    return rows


def pi_bench(model: str | Path, *, protocol: str = "cheetah", batch: int = 1, repeat: int = DEFAULT_REPEAT, weights: str = "private",
             image: np.ndarray | None = None, seed: int = 0, timeout: float = 1800.0, profile: bool = False,
             keep_dir: str | Path | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``model`` (an ONNX file) under 2PC and return the measurements (see module docstring)."""
    say = log or (lambda s: None)
    if protocol not in PROTOCOLS:
        raise PIBenchError(f"unknown protocol {protocol!r}", f"use one of {', '.join(PROTOCOLS)}")
    if weights not in WEIGHTS:
        raise PIBenchError(f"unknown weights mode {weights!r}", f"use one of {', '.join(WEIGHTS)}")
    if batch < 1 or repeat < 1:
        raise PIBenchError("--batch and --repeat must be ≥ 1", "e.g. --batch 1 --repeat 3")
    model = Path(model).resolve()
    if not model.exists():
        raise PIBenchError(f"ONNX file {model} does not exist", "check the path (pi-bench takes a .onnx file)")
    py = venv_python()
    if py is None:
        raise PIBenchError(f"the SPU venv is not set up ({venv_dir()})",
                           "run `relucomp pi-bench --setup` once (builds a Python 3.11 venv with spu 0.9.5)")
    from .estimate import onnx_costs

    costs = onnx_costs(model)
    work = Path(keep_dir) if keep_dir else Path(tempfile.mkdtemp(prefix="relucomp-pi-"))
    work.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    try:
        shape = costs["input_shape"]
        if image is None:
            x = np.random.default_rng(seed).standard_normal((batch, *shape[1:])).astype(np.float32)
        else:
            x = np.asarray(image, np.float32)
            if x.ndim == len(shape) - 1:
                x = x[None]
        np.save(work / "x.npy", x)
        say(f"compiling {model.name} for SPU ({protocol})")
        t0 = time.perf_counter()
        comp = _run_worker(py, ["compile", "--model", str(model), "--image", str(work / "x.npy"), "--out-dir", str(work),
                            "--weights", weights],
                           work / "compile.json", timeout=timeout, log_path=work / "compile.log")
        compile_wall = time.perf_counter() - t0
        ports = _free_ports(2)
        session = uuid.uuid4().hex[:8]
        say(f"running server and client on 127.0.0.1:{ports[0]}/{ports[1]} ({repeat} timed runs + 1 warm-up)")
        common = ["party", "--dir", str(work), "--ports", str(ports[0]), str(ports[1]), "--protocol", protocol,
                  "--repeat", str(repeat), "--session", session, "--timeout", str(timeout)]
        roles = [
            common + ["--rank", "0", "--model", str(model)] + (["--profile"] if profile else []),
            common + ["--rank", "1", "--image", str(work / "x.npy"), "--out", str(work / "y_2pc.npy")],
        ]
        logs = [open(work / f"party{r}.log", "w") for r in (0, 1)]
        t0 = time.perf_counter()
        for r in (0, 1):
            procs.append(subprocess.Popen([str(py), str(WORKER), *roles[r], "--result", str(work / f"party{r}.json")],
                                          stdout=logs[r], stderr=subprocess.STDOUT, env=_worker_env()))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise PIBenchError(f"the 2PC run did not finish in {timeout:.0f}s", "raise --timeout or use a smaller model")
            if any(p.poll() not in (None, 0) for p in procs):
                time.sleep(2.0)  # give the other party a moment to report, then stop
                break
            time.sleep(0.2)
        wall = time.perf_counter() - t0
        for f in logs:
            f.close()
        res = [_read_result(work / f"party{r}.json", work / f"party{r}.log", f"party {r}") for r in (0, 1)]
        y = np.load(work / "y_2pc.npy", allow_pickle=False)
        y_plain = np.load(work / "plain.npy", allow_pickle=False)
        y_ort = _ort(model, x)
        runs = [max(a, b) for a, b in zip(res[0]["run_s"], res[1]["run_s"])]
        bytes_runs = [a + b for a, b in zip(res[0]["run_bytes_received"], res[1]["run_bytes_received"])]
        err = np.abs(y - y_ort)
        out: dict[str, Any] = {
            "model": str(model),
            "protocol": protocol,
            "weights": weights,
            "field": "FM64",
            "batch": int(x.shape[0]),
            "repeat": repeat,
            "relus": costs["relus"],
            "maxpool_comparisons": costs["maxpool_comparisons"],
            "macs": costs["macs"],
            "gather_elements": costs["gather_elements"],
            "latency_s": float(np.median(runs)),
            "latency_runs_s": runs,
            "latency_min_s": float(min(runs)),
            **run_stats(runs, bytes_runs),
            "bytes": int(np.median(bytes_runs)),
            "bytes_runs": bytes_runs,
            "bytes_by_party": {"server_sent": int(np.median(res[1]["run_bytes_received"])),
                               "client_sent": int(np.median(res[0]["run_bytes_received"]))},
            "first_run_s": max(res[0]["first_run_s"], res[1]["first_run_s"]),
            "first_run_bytes": res[0]["first_run_bytes_received"] + res[1]["first_run_bytes_received"],
            "setup": {"weights_share_s": max(res[0]["weights_share_s"], res[1]["weights_share_s"]),
                      "weights_share_bytes": res[1]["weights_share_bytes_received"],
                      "compile_s": comp["compile_s"], "compile_wall_s": compile_wall,
                      "link_s": max(res[0]["link_s"], res[1]["link_s"]),
                      "one_time_protocol_setup_s": max(0.0, max(res[0]["first_run_s"], res[1]["first_run_s"]) - float(np.median(runs)))},
            "per_inference_io": {"input_share_s": max(res[0]["input_share_s"], res[1]["input_share_s"]),
                                 "input_share_bytes": res[0]["input_share_bytes_received"],
                                 "output_reveal_s": max(res[0]["output_reveal_s"], res[1]["output_reveal_s"])},
            "error": {"max_abs_vs_onnxruntime": float(err.max()) if err.size else 0.0,
                      "mean_abs_vs_onnxruntime": float(err.mean()) if err.size else 0.0,
                      "max_abs_plain_jax_vs_onnxruntime": float(np.abs(y_plain - y_ort).max()) if y_ort.size else 0.0,
                      "argmax_agreement": float(np.mean(y.argmax(-1) == y_ort.argmax(-1))) if y.ndim == 2 else None,
                      "output_scale": float(np.abs(y_ort).max()) if y_ort.size else 0.0},
            "wall_s": wall,
            "onnx_ops": comp["onnx_ops"],
            "versions": comp["versions"],
            "machine": machine_info(),
            "notes": (f"2 processes on loopback; weights: {weights} (server = party 0), image secret-shared by the client "
                      "(party 1); latency = wall time of Runtime.run (max over parties), bytes = TCP payload both ways"),
        }
        if protocol == "semi2k":
            out["notes"] += ("; semi2k uses SPU's default Beaver triple source (TrustedFirstParty: the server deals "
                             "the triples) — a benchmark setting, not secure against the server")
        if profile:
            out["profile"] = _profile_lines((work / "party0.log").read_text(errors="replace"))
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        if not keep_dir:
            shutil.rmtree(work, ignore_errors=True)
