"""Training utilities shared by the training passes: loops, KD, progress, checkpoints.

Checkpoints are plain dicts of tensors and JSON-like values saved atomically
(``tmp`` + ``os.replace``) and loaded with ``torch.load(weights_only=True)``.
A ``KeyboardInterrupt`` during training saves the current state first and
re-raises as :class:`Interrupted`, which tells the user how to resume.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .atomic import atomic_torch_save
from .errors import Interrupted, ModelLoadError

__all__ = ["Interrupted", "Checkpointer", "load_state", "train_loop", "ce_kd_step", "kd_loss", "evaluate",
           "make_optimizer", "progress_bar"]


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
    """A rich Progress (or a no-op stand-in) for training loops."""
    if not enabled:
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
        if self.path is None:
            return
        atomic_torch_save(self.path, state)

    def load(self) -> dict[str, Any] | None:
        if self.path is None or not self.path.exists():
            return None
        return load_state(self.path)

    def clear(self) -> None:
        if self.path is not None and self.path.exists():
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
) -> list[dict[str, Any]]:
    """Generic epoch loop.

    ``step_fn(model, x, y, g) -> (loss, logits)``; ``after_step(global_step)``
    runs after each optimizer step (gate clamping, dual steps...);
    ``save(next_epoch, interrupted)`` is called after each epoch and on Ctrl-C.
    Returns per-epoch records (loss, train accuracy, seconds, plus what
    ``on_epoch_end`` returns).
    """
    history: list[dict[str, Any]] = []
    n_batches = len(loader) if hasattr(loader, "__len__") else None
    prog = progress or _NullProgress()
    task = prog.add_task(desc, total=(epochs - start_epoch) * (n_batches or 0) or None, info="")
    step = start_epoch * (n_batches or 0)
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, epochs):
            model.train()
            t0 = time.perf_counter()
            tot_loss = 0.0
            correct = seen = 0
            for batch in loader:
                x, y, g = unpack(batch)
                x, y = x.to(device), y.to(device)
                g = g.to(device) if g is not None else None
                loss, logits = step_fn(model, x, y, g)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                if after_step is not None:
                    after_step(step)
                tot_loss += float(loss.detach()) * y.numel()
                correct += int((logits.detach().argmax(1) == y).sum())
                seen += int(y.numel())
                prog.update(task, advance=1, info=f"ep {epoch + 1}/{epochs} loss {tot_loss / seen:.3f} acc {100 * correct / seen:.1f}%")
            if scheduler is not None:
                scheduler.step()
            rec: dict[str, Any] = {"epoch": epoch + 1, "loss": tot_loss / max(seen, 1),
                                   "train_acc": 100.0 * correct / max(seen, 1),
                                   "seconds": time.perf_counter() - t0}
            if on_epoch_end is not None:
                rec.update(on_epoch_end(epoch, rec) or {})
            history.append(rec)
            if save is not None:
                save(epoch + 1, False)
    except KeyboardInterrupt:
        if save is None:
            raise Interrupted(f"interrupted during {desc} epoch {epoch + 1}; nothing saved (no output directory)",
                              "run again with --out DIR to be able to resume") from None
        save(epoch, True)
        raise Interrupted(
            f"interrupted during {desc} epoch {epoch + 1}; state saved",
            "run the same command again with --resume to continue from the checkpoint",
        ) from None
    return history


def ce_kd_step(teacher: nn.Module | None, *, kd_weight: float = 0.5, temperature: float = 4.0,
               extra: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None) -> StepFn:
    """A step function computing ``(1-w)·CE + w·KD(teacher) (+ extra)``."""

    def step(model, x, y, g):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if teacher is not None and kd_weight > 0:
            with torch.no_grad():
                t_logits = teacher(x)
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
