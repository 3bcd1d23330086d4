"""The compile pipeline as a list of named stages, and the short driver that runs them.

``STAGES`` is the one place that orders them.  Adding a stage (e.g. a DP
finetune or a robustness evaluation) = a new module here with ``NAME``, an
output dataclass, ``run(st) -> Output`` (and optionally ``when(st) -> bool``)
plus one entry in ``STAGES``.  The driver times every stage
(``phases_seconds``), owns the checkpoint (``OUT/checkpoint.pt``) and removes
what a failed run created.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

from ..errors import AlreadyFinished, ConfigError, Interrupted, RelucompError
from ..train import Checkpointer, progress_bar
from . import (data, dense, diagnose, dp_finetune, evaluate, export, fairness, finetune, gate, lower, model, pretrain,
               prune, report, save, search)
from . import robust_bn, robust_teacher, robustness
from .base import Hooks, RunState, Stage

__all__ = ["STAGES", "Hooks", "RunState", "Stage", "run", "prepare_out"]


def _stage(mod) -> Stage:
    return Stage(mod.NAME, mod.run, getattr(mod, "when", lambda st: True))


_DUAL_BN_EXPORT = Stage(robust_bn.EXPORT_NAME, robust_bn.run_export, robust_bn.when)

STAGES: list[Stage] = [_stage(m) for m in (
    data, model, pretrain, robust_teacher, dense, gate, robust_bn, search, prune, finetune, dp_finetune)] + [
    _DUAL_BN_EXPORT] + [_stage(m) for m in (lower, evaluate, robustness, fairness, diagnose, report, export, save)]


def prepare_out(out_dir) -> tuple[Path | None, bool]:
    """Create (and probe) the output directory; return (path, created_by_us)."""
    if out_dir is None:
        return None, False
    out = Path(out_dir)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".relucomp-write-test-{os.getpid()}"  # one per process (torchrun ranks share OUT)
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RelucompError(f"cannot write to output directory {out}: {exc.strerror or exc}",
                            "choose a writable --out directory") from exc
    return out, created


def run(cfg, hooks: Hooks, stages: list[Stage] | None = None) -> RunState:
    """Run ``stages`` (default :data:`STAGES`) on a validated config; return the final state."""
    r = cfg.runtime
    if r.resume and r.out_dir is None:
        raise ConfigError("--resume needs --out (the checkpoint lives there)", "pass the same --out as before")
    with runtime(cfg):
        return _run(cfg, hooks, stages)


@contextlib.contextmanager
def runtime(cfg):
    """The run's runtime: the process group under torchrun, mixed precision, cuDNN settings; torn down after."""
    from .. import distributed
    from ..config import process_count
    from ..train import RuntimeOptions, runtime_options

    r = cfg.runtime
    if process_count(cfg) > 1 and distributed.torchrun_env() is None:
        raise ConfigError(f"runtime.nproc = {r.nproc} outside torchrun: the library runs in the processes it is given",
                          f"run `relucomp compile --nproc {r.nproc} ...` (it starts torchrun) or "
                          f"`torchrun --nproc_per_node {r.nproc} -m relucomp compile ...`, or set nproc = 1")
    if r.device.startswith("cuda"):
        import torch

        torch.backends.cudnn.benchmark = bool(r.cudnn_benchmark)
    ctx = distributed.setup(r.device, batch_size=r.batch_size)
    try:
        with runtime_options(RuntimeOptions(amp=(r.amp or "none").lower())):
            yield ctx
        if ctx is not None:
            distributed.barrier("the end of the run")  # rank 0 has written its files
    finally:
        if ctx is not None:
            distributed.teardown()


def _run(cfg, hooks: Hooks, stages: list[Stage] | None = None) -> RunState:
    from ..distributed import is_main

    r = cfg.runtime
    out, created = prepare_out(r.out_dir)
    st = RunState(cfg=cfg, hooks=hooks, out=out, ckpt=Checkpointer(out / "checkpoint.pt" if out else None))
    if r.resume:
        st.resume_state = st.ckpt.load()
        if st.resume_state is None and (out / "report.json").is_file():
            raise AlreadyFinished(f"{out} holds a finished run (report.json, no checkpoint): nothing to resume",
                                  f"look at {out / 'report.json'}, or drop --resume to compile again")
        if st.resume_state is None:
            st.say("no checkpoint found; starting fresh")
    try:
        with progress_bar(r.progress) as st.progress:
            for stage in stages or STAGES:
                if not stage.when(st):
                    continue
                t0 = time.perf_counter()
                st.results[stage.name] = stage.run(st)
                st.phases[stage.name] = round(st.phases.get(stage.name, 0.0) + time.perf_counter() - t0, 3)
    except Interrupted:
        raise  # the checkpoint stays for --resume
    except BaseException:
        if created and out is not None and is_main() and not st.ckpt.path.exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    return st
