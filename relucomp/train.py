"""Training utilities shared by the training passes: loops, KD, progress, checkpoints.

Checkpoints are plain dicts of tensors and JSON-like values saved atomically
(``tmp`` + ``os.replace``) and loaded with ``torch.load(weights_only=True)``.
A ``KeyboardInterrupt`` during training saves the current state first and
re-raises as :class:`Interrupted`, which tells the user how to resume.

Runtime (``runtime`` config section, set for a run with :func:`runtime_options`):
on a multi-process run (:mod:`relucomp.distributed`) :func:`train_loop` wraps
the model in DistributedDataParallel, makes BatchNorm use global-batch
statistics, gives each rank its slice of every global batch, writes
checkpoints from rank 0 only and shows progress on rank 0 only; ``amp``
(``bf16`` / ``fp16``) runs the step under ``torch.autocast`` (parameters —
gates included — stay fp32, the KD and L1 terms are computed in fp32, fp16
uses a gradient scaler).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .atomic import atomic_torch_save
from .errors import Interrupted, ModelLoadError

__all__ = ["Interrupted", "Checkpointer", "load_state", "train_loop", "ce_kd_step", "on_device", "kd_loss", "evaluate",
           "make_optimizer", "progress_bar", "RuntimeOptions", "runtime_options", "current_runtime"]


def averaged(model: nn.Module, *, decay: float, warmup: bool = False):
    """The weight average (EMA) kept beside ``model`` during a finetune: one implementation for the
    plain, fair and DP finetunes.

    ``torch.optim.swa_utils.AveragedModel`` over the parameters (buffers are not averaged: BatchNorm
    statistics are re-estimated, or folded under DP).  Decay ``decay`` from the first step (the first
    update copies the weights after step 1), so after ``T`` steps the first iterate keeps weight
    ``decay**(T-1)``; or with ``warmup`` the decay ``min(decay, (1+t)/(10+t))`` of
    De et al. / Berrada et al., which forgets the start after a few steps (it reaches 0.99 only after ~900
    steps, so with a few hundred steps the average is close to the last ~15 iterates).
    """
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    if not warmup:
        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)

    @torch.no_grad()
    def fn(avg: list[torch.Tensor], cur: list[torch.Tensor], n):
        d = min(decay, (1.0 + int(n)) / (10.0 + int(n)))
        torch._foreach_lerp_(avg, cur, 1.0 - d)

    return AveragedModel(model, multi_avg_fn=fn, use_buffers=False)


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """How training runs (not what it computes): mixed precision; set per run by the stages driver."""

    amp: str = "none"          # none | bf16 | fp16 (fp16: CUDA only)


_RUNTIME: contextvars.ContextVar[RuntimeOptions] = contextvars.ContextVar("relucomp_runtime", default=RuntimeOptions())


def current_runtime() -> RuntimeOptions:
    return _RUNTIME.get()


@contextlib.contextmanager
def runtime_options(opts: RuntimeOptions) -> Iterator[RuntimeOptions]:
    token = _RUNTIME.set(opts)
    try:
        yield opts
    finally:
        _RUNTIME.reset(token)


# ---------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------

class _NullProgress:
    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass

    def remove_task(self, *a, **k):
        pass


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Any]:
    """A rich Progress (or a no-op stand-in) for training loops; rank 0 only on a multi-process run."""
    from .distributed import is_main

    if not enabled or not is_main():
        yield _NullProgress()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    ) as prog:
        yield prog


# ---------------------------------------------------------------------------
# losses and evaluation
# ---------------------------------------------------------------------------

def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton KD: ``T^2 * KL(softmax(t/T) || softmax(s/T))``."""
    t = temperature
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()  # fp32 under autocast too
    return F.kl_div(F.log_softmax(student_logits / t, 1), F.log_softmax(teacher_logits.detach() / t, 1),
                    reduction="batchmean", log_target=True) * t * t


def unpack(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, (tuple, list)):
        if len(batch) >= 3:
            return batch[0], batch[1], batch[2]
        return batch[0], batch[1], None
    raise TypeError("batches must be (x, y) or (x, y, group) tuples")


def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu") -> dict[str, float]:
    """Top-1 accuracy (%) and mean CE of ``model`` on ``loader`` in eval mode (the one evaluator)."""
    from .evaluate import predict

    return predict(model, loader, device).summary()


# ---------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------

class Checkpointer:
    """Atomic save / safe load of a training state dict at ``path`` (None: disabled)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None

    def save(self, state: dict[str, Any]) -> None:
        from .distributed import is_main

        if self.path is None or not is_main():  # multi-process: rank 0 writes (every rank holds the same state)
            return
        atomic_torch_save(self.path, state)

    def load(self) -> dict[str, Any] | None:
        if self.path is None or not self.path.exists():
            return None
        return load_state(self.path)

    def clear(self) -> None:
        from .distributed import is_main

        if self.path is not None and is_main() and self.path.exists():
            self.path.unlink()


def load_state(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with a clear error for corrupt files."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"checkpoint {path} does not exist", "check the path, or drop --resume to start fresh")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(
            f"checkpoint {path} is corrupt or not a relucomp/torch checkpoint ({type(exc).__name__})",
            "delete it and run again without --resume",
        ) from exc


# ---------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------

StepFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


def _loader_generator(loader) -> torch.Generator | None:
    gen = getattr(loader, "generator", None)
    return gen if isinstance(gen, torch.Generator) else None


class LoopState:
    """Where a training loop is, and the RNG streams it needs to continue exactly.

    ``epoch`` / ``batch``: the next step to run; ``loader_rng``: the loader's
    generator state at the start of ``epoch`` (its data order and augmentation
    draws); ``torch_rng``: the global torch RNG at the last step boundary.
    ``to_dict()`` is saved in checkpoints; ``train_loop(..., loop_state=...)``
    continues from it, replaying the skipped batches' draws so that the data
    order after a resume is the one the uninterrupted run sees.
    """

    def __init__(self, d: dict | None = None):
        d = d or {}
        self.epoch = int(d.get("epoch", 0))
        self.batch = int(d.get("batch", 0))
        self.loader_rng = d.get("loader_rng")
        self.torch_rng = d.get("torch_rng")

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "loader_rng": self.loader_rng,
                "torch_rng": torch.get_rng_state()}


@contextlib.contextmanager
def _deferred_sigint(flag: dict) -> Iterator[None]:
    """Turn Ctrl-C into a flag checked at step boundaries (state stays consistent); main thread only."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    prev = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if flag.get("stop"):  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        flag["stop"] = True

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not allowed here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, prev)


def train_loop(
    model: nn.Module,
    loader: Iterable,
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    step_fn: StepFn,
    scheduler: Any | None = None,
    start_epoch: int = 0,
    desc: str = "train",
    progress: Any | None = None,
    after_step: Callable[[int], None] | None = None,
    on_epoch_end: Callable[[int, dict[str, float]], dict[str, Any] | None] | None = None,
    save: Callable[[int, bool], None] | None = None,
    device: str | torch.device = "cpu",
    loop_state: LoopState | None = None,
    clip_grad_norm: float | None = None,
) -> list[dict[str, Any]]:
    """Generic epoch loop.

    ``clip_grad_norm``: the optimizer's parameters' gradients are clipped to this global L2 norm before each
    step (after the multi-process average, so every rank clips alike); each epoch's record then has the
    median and maximum pre-clip norm and the fraction of clipped steps.

    ``step_fn(model, x, y, g) -> (loss, logits)``; ``after_step(global_step)``
    runs after each optimizer step (gate clamping, dual steps...);
    ``save(next_epoch, interrupted)`` is called after each epoch and on Ctrl-C.
    Returns per-epoch records (loss, train accuracy, seconds, plus what
    ``on_epoch_end`` returns).

    ``loop_state`` (a :class:`LoopState`, updated in place) makes the loop
    exactly resumable: Ctrl-C is deferred to the next step boundary, where
    ``loop_state`` says which batch of which epoch comes next and holds the
    RNG streams; a loop started with a restored ``loop_state`` skips the
    batches already trained (replaying their random draws) and continues.
    Without it, the loop restarts at ``start_epoch``.
    """
    from . import distributed

    history: list[dict[str, Any]] = []
    n_batches = len(loader) if hasattr(loader, "__len__") else None
    prog = progress or _NullProgress()
    gen = _loader_generator(loader)
    skip = 0
    if loop_state is not None:
        start_epoch = loop_state.epoch
        skip = loop_state.batch
        if loop_state.loader_rng is not None and gen is not None:
            gen.set_state(loop_state.loader_rng)
        if loop_state.torch_rng is not None:
            torch.set_rng_state(loop_state.torch_rng)
    total_steps = (epochs - start_epoch) * (n_batches or 0) - skip
    task = prog.add_task(desc, total=total_steps if total_steps > 0 else None, info="")
    step = start_epoch * (n_batches or 0) + skip
    epoch = start_epoch
    flag: dict[str, bool] = {}
    multi = distributed.active()
    world = distributed.world_size()
    amp = _Amp(current_runtime().amp, device, optimizer, model)
    fault = _fault_point(desc)
    net = distributed.wrap(model, device) if multi else model
    shard = loader.sharded() if multi and hasattr(loader, "sharded") else contextlib.nullcontext()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_deferred_sigint(flag) if loop_state is not None else contextlib.nullcontext())
            stack.enter_context(shard)
            stack.enter_context(distributed.sync_batchnorm(model))
            stack.enter_context(distributed.collective(desc))
            for epoch in range(start_epoch, epochs):
                if loop_state is not None:
                    loop_state.epoch = epoch
                    if skip == 0:
                        loop_state.batch = 0
                        loop_state.loader_rng = gen.get_state() if gen is not None else None
                net.train()
                t0 = time.perf_counter()
                tot = torch.zeros(3, dtype=torch.float64)  # loss·n, correct, seen (this rank)
                norms: list[float] = []
                for i, batch in enumerate(loader):
                    if i < skip:  # resumed mid-epoch: these batches were trained before the interrupt
                        continue
                    x, y, g = unpack(batch)
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    g = g.to(device, non_blocking=True) if g is not None else None
                    with amp.autocast():
                        loss, logits = step_fn(net, x, y, g)
                    optimizer.zero_grad(set_to_none=True)
                    if multi and getattr(loader, "global_batch", 0):
                        # DDP averages the ranks' gradients; weigh each rank's mean by its share of the global
                        # batch so an uneven last batch gives the single-process gradient too
                        amp.backward(loss * (y.numel() * world / loader.global_batch))
                    else:
                        amp.backward(loss)
                    if clip_grad_norm is not None:
                        amp.unscale(optimizer)
                        params = [p for grp in optimizer.param_groups for p in grp["params"] if p.grad is not None]
                        norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)))
                    amp.step(optimizer)
                    step += 1
                    if after_step is not None:
                        after_step(step)
                    if loop_state is not None:
                        loop_state.batch = i + 1
                    tot += torch.tensor([float(loss.detach()) * y.numel(),
                                         int((logits.detach().argmax(1) == y).sum()), int(y.numel())],
                                        dtype=torch.float64)
                    seen = max(tot[2].item(), 1)
                    prog.update(task, advance=1, info=f"ep {epoch + 1}/{epochs} loss {tot[0].item() / seen:.3f} "
                                                      f"acc {100 * tot[1].item() / seen:.1f}%")
                    if fault is not None and step == fault:
                        _die(desc, step)
                    if multi:  # Ctrl-C on any rank stops every rank at the same step boundary
                        stop = torch.tensor([1.0 if flag.get("stop") else 0.0])
                        if distributed.all_reduce_(stop, "max").item() > 0:
                            flag["stop"] = True
                    if flag.get("stop"):
                        raise KeyboardInterrupt
                skip = 0
                if scheduler is not None:
                    scheduler.step()
                distributed.all_reduce_(tot)  # the epoch's figures over the global batches
                seen = max(tot[2].item(), 1)
                rec: dict[str, Any] = {"epoch": epoch + 1, "loss": tot[0].item() / seen,
                                       "train_acc": 100.0 * tot[1].item() / seen,
                                       "seconds": time.perf_counter() - t0}
                if norms:
                    nt = torch.tensor(norms)
                    rec.update(grad_norm_median=float(nt.median()), grad_norm_max=float(nt.max()),
                               clipped=float((nt > clip_grad_norm).float().mean()))
                if on_epoch_end is not None:
                    rec.update(on_epoch_end(epoch, rec) or {})
                history.append(rec)
                if loop_state is not None:
                    loop_state.epoch, loop_state.batch = epoch + 1, 0
                    loop_state.loader_rng = gen.get_state() if gen is not None else None
                if save is not None:
                    save(epoch + 1, False)
                if flag.get("stop"):
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        if save is None:
            raise Interrupted(f"interrupted during {desc} epoch {epoch + 1}; nothing saved (no output directory)",
                              "run again with --out DIR to be able to resume") from None
        save(epoch, True)
        raise Interrupted(
            f"interrupted during {desc} epoch {epoch + 1}; state saved",
            "run the same command again with --resume to continue from the checkpoint",
        ) from None
    finally:
        if net is not model:  # drop DDP (and its gradient hooks) before the model is used on its own again
            del net
            import gc

            gc.collect()
    return history


class _Amp:
    """Mixed precision for one training loop: autocast + (fp16) a gradient scaler; a no-op for ``none``."""

    def __init__(self, kind: str, device, optimizer, model: nn.Module):
        self.kind = kind or "none"
        self.device_type = torch.device(device).type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.kind)
        self.scaler = torch.amp.GradScaler(self.device_type) if self.kind == "fp16" else None
        if self.scaler is not None:  # parameters stepped by other optimizers (the gates' Adam): unscaled by hand
            mine = {id(p) for grp in optimizer.param_groups for p in grp["params"]}
            self.others = [p for p in model.parameters() if id(p) not in mine and p.requires_grad]

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is None:
            loss.backward()
            return
        self.scaler.scale(loss.float()).backward()
        inv = 1.0 / float(self.scaler.get_scale())
        for p in self.others:
            if p.grad is not None:
                p.grad.mul_(inv)
                if not bool(torch.isfinite(p.grad).all()):  # an overflow step: skip it for these too
                    p.grad.zero_()

    def unscale(self, optimizer) -> None:
        """Bring fp16-scaled gradients to their true size (before clipping); a no-op otherwise."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()


def _fault_point(desc: str) -> int | None:
    """Test hook (fault injection): ``RELUCOMP_FAULT="<desc>:<rank>:<step>"`` kills that rank at that step."""
    spec = os.environ.get("RELUCOMP_FAULT")
    if not spec:
        return None
    from .distributed import rank

    what, _, rest = spec.partition(":")
    r, _, st = rest.partition(":")
    if what == desc and r.isdigit() and st.isdigit() and int(r) == rank():
        return int(st)
    return None


def _die(desc: str, step: int) -> None:  # pragma: no cover - the process ends here
    import signal
    import sys

    sys.stderr.write(f"RELUCOMP_FAULT: killing this process during {desc} at step {step}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def on_device(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` (a frozen teacher) on ``device``: moved there in place if its parameters are elsewhere (the stages
    keep teachers on the CPU; a step on ``--device cuda`` moves each at its first batch)."""
    p = next(module.parameters(), None)
    if p is not None and p.device != device:
        module.to(device)
    return module


def ce_kd_step(teacher: nn.Module | None, *, kd_weight: float = 0.5, temperature: float = 4.0,
               extra: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None) -> StepFn:
    """A step function computing ``(1-w)·CE + w·KD(teacher) (+ extra)``."""

    def step(model, x, y, g):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if teacher is not None and kd_weight > 0:
            with torch.no_grad():
                t_logits = on_device(teacher, x.device)(x)
            loss = (1 - kd_weight) * loss + kd_weight * kd_loss(logits, t_logits, temperature)
        if extra is not None:
            loss = loss + extra(logits, y, g)
        return loss, logits

    return step


def make_optimizer(params, *, lr: float, kind: str = "sgd", weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=0.0)
    raise ValueError(f"unknown optimizer {kind!r}")
