"""Multi-process training: a thin interface of ours over :mod:`torch.distributed`.

relucomp runs data-parallel under ``torchrun`` (``torch.distributed.run``):
``torchrun --nproc_per_node N -m relucomp compile ...`` or, equivalently,
``relucomp compile --nproc N ...`` (which starts that launcher itself).  Every
process runs the whole pipeline; what differs per rank is only the slice of
each training batch it computes.

* :func:`setup` reads the launcher's variables (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; all or none), checks that the
  world size divides the global batch, and joins the process group — ``gloo``
  on CPU, ``nccl`` on CUDA (one GPU per local rank) — with a timeout, so a rank
  that dies makes the others fail with a clear error instead of hanging.
* :func:`wrap` puts a model in :class:`~torch.nn.parallel.DistributedDataParallel`
  (gradients of weights *and* gate parameters are averaged; buffers — BN
  statistics and the gates' masks — are broadcast from rank 0 at every
  forward) and :func:`sync_batchnorm` makes BatchNorm use the statistics of
  the *global* batch (all-reduced, autograd-aware; works on gloo/CPU where
  ``nn.SyncBatchNorm`` does not), so a step on N processes computes the same
  gradient as one process on the whole batch, up to float summation order.
* :func:`broadcast_`, :func:`broadcast_module_`, :func:`all_reduce_`,
  :func:`all_gather_cat`, :func:`barrier`, :func:`is_main`: the collectives the
  training code needs (all no-ops on one process).
* :func:`launch`: ``relucomp compile --nproc N`` → ``python -m torch.distributed.run``.

Nothing here is needed on one process: without the launcher's variables every
helper is a no-op and training is the single-process path.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

from .errors import ConfigError, RelucompError

if TYPE_CHECKING:  # torch is imported only when a helper runs: config validation stays torch-free
    import torch
    from torch import nn

__all__ = ["DistributedError", "Context", "TORCHRUN_VARS", "torchrun_env", "setup", "teardown", "context", "active",
           "rank", "world_size", "is_main", "barrier", "broadcast_", "broadcast_module_", "all_reduce_",
           "all_gather_cat", "wrap", "sync_batchnorm", "launch", "check_batch", "DEFAULT_TIMEOUT_S"]

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: seconds a collective waits for the other ranks before failing (env ``RELUCOMP_DIST_TIMEOUT``)
DEFAULT_TIMEOUT_S = 300


class DistributedError(RelucompError):
    """A multi-process run that cannot start or cannot continue (launcher variables, a lost rank)."""


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: str


_CTX: Context | None = None


def torchrun_env(environ: dict | None = None) -> dict[str, str] | None:
    """The launcher's variables, or ``None`` when none is set; a one-line error when only some are."""
    env = os.environ if environ is None else environ
    present = [k for k in TORCHRUN_VARS if env.get(k, "") != ""]
    if not present:
        return None
    missing = [k for k in TORCHRUN_VARS if k not in present]
    if missing:
        raise DistributedError(
            f"torchrun variables half set: {', '.join(present)} set but {', '.join(missing)} missing",
            "launch with `torchrun --nproc_per_node N -m relucomp compile ...` (or `relucomp compile --nproc N`), "
            f"or unset {', '.join(present)} to run one process")
    vals = {k: env[k] for k in TORCHRUN_VARS}
    try:
        r, w, lr, port = int(vals["RANK"]), int(vals["WORLD_SIZE"]), int(vals["LOCAL_RANK"]), int(vals["MASTER_PORT"])
    except ValueError:
        raise DistributedError(f"torchrun variables are not integers: RANK={vals['RANK']!r} WORLD_SIZE="
                               f"{vals['WORLD_SIZE']!r} LOCAL_RANK={vals['LOCAL_RANK']!r} MASTER_PORT="
                               f"{vals['MASTER_PORT']!r}", "let torchrun set them (do not set them by hand)") from None
    if w < 1 or not 0 <= r < w or lr < 0 or not 0 < port < 65536:
        raise DistributedError(f"torchrun variables inconsistent: RANK={r} WORLD_SIZE={w} LOCAL_RANK={lr} "
                               f"MASTER_PORT={port}", "let torchrun set them (do not set them by hand)")
    return vals


def check_batch(batch_size: int, world: int) -> None:
    """The global batch must split evenly: each rank computes ``batch_size / world`` images per step."""
    if world > 1 and batch_size % world:
        raise ConfigError(f"--batch-size {batch_size} is not divisible by the {world} processes "
                          "(each computes batch/processes images of every global batch)",
                          f"give a multiple of {world}, e.g. --batch-size {max(world, batch_size // world * world)}")


def setup(device: str = "cpu", *, batch_size: int | None = None, timeout_s: float | None = None) -> Context | None:
    """Join the process group when launched by torchrun (idempotent); ``None`` on a single process.

    Returns the :class:`Context` (rank, world size, backend, this rank's
    device: ``cuda:LOCAL_RANK`` on CUDA).  ``batch_size``: the global batch,
    checked against the world size before any work.
    """
    import torch
    from torch import nn  # noqa: F401

    global _CTX
    if _CTX is not None:
        return _CTX
    env = torchrun_env()
    if env is None or int(env["WORLD_SIZE"]) == 1:
        return None
    import torch.distributed as dist

    world, rk, local = int(env["WORLD_SIZE"]), int(env["RANK"]), int(env["LOCAL_RANK"])
    if batch_size is not None:
        check_batch(batch_size, world)
    kind = device.split(":")[0]
    if kind == "cuda":
        if local >= torch.cuda.device_count():
            raise DistributedError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible)",
                                   "give --nproc (torchrun --nproc_per_node) at most the number of GPUs")
        torch.cuda.set_device(local)
        backend, dev = "nccl", f"cuda:{local}"
    else:
        backend, dev = "gloo", device
    timeout = float(timeout_s if timeout_s is not None else os.environ.get("RELUCOMP_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        except Exception as exc:  # noqa: BLE001
            raise DistributedError(f"rank {rk}/{world} could not join the process group at {env['MASTER_ADDR']}:"
                                   f"{env['MASTER_PORT']} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                                   "check that every rank was started by the same torchrun and the port is free") from exc
    _CTX = Context(rank=rk, world_size=world, local_rank=local, backend=backend, device=dev)
    return _CTX


def teardown() -> None:
    """Leave the process group (after a last barrier when every rank is still there)."""
    global _CTX
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _CTX = None


def context() -> Context | None:
    return _CTX


def active() -> bool:
    """True on a multi-process run (the process group is up and has more than one rank)."""
    if _CTX is not None:
        return True
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    if not active():
        return 0
    import torch.distributed as dist

    return dist.get_rank()


def world_size() -> int:
    if not active():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes files, prints progress and logs."""
    return rank() == 0


def _lost(exc: Exception, what: str) -> DistributedError:
    return DistributedError(
        f"rank {rank()}: another process stopped answering during {what} (it died, was killed or hangs: "
        f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})",
        "see the first failing rank's output; `--resume` continues from OUT/checkpoint.pt with any number of processes")


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a failed collective (a peer died: gloo/nccl error or timeout) into a :class:`DistributedError`."""
    try:
        yield
    except RelucompError:
        raise
    except RuntimeError as exc:  # DistBackendError / DistNetworkError are RuntimeErrors
        if active() and _is_comm_failure(exc):
            raise _lost(exc, what) from exc
        raise


def _is_comm_failure(exc: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    msg = str(exc).lower()
    return any(k in msg for k in ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout",
                                  "broken pipe", "peer"))


def barrier(what: str = "a barrier") -> None:
    if active():
        import torch.distributed as dist

        with collective(what):
            dist.barrier()


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In place: every rank gets rank ``src``'s ``t``."""
    if active():
        import torch.distributed as dist

        with collective("a broadcast"):
            dist.broadcast(t, src)
    return t


def broadcast_module_(module: nn.Module, src: int = 0) -> None:
    """Every rank gets rank ``src``'s parameters and buffers (masks, BN statistics)."""
    if not active():
        return
    import torch

    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point() or t.dtype in (torch.bool, torch.long, torch.int):
            data = t.data
            if data.dtype == torch.bool:
                tmp = data.to(torch.uint8)
                broadcast_(tmp, src)
                data.copy_(tmp.bool())
            else:
                broadcast_(data, src)


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place sum / mean / max over the ranks."""
    if not active():
        return t
    import torch.distributed as dist

    with collective("an all-reduce"):
        if op == "mean":
            dist.all_reduce(t, dist.ReduceOp.SUM)
            t.div_(world_size())
        else:
            dist.all_reduce(t, {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0 in rank order (sizes may differ; no gradient)."""
    import torch
    from torch import nn  # noqa: F401

    if not active():
        return t
    import torch.distributed as dist

    with collective("an all-gather"):
        n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(world_size())]
        dist.all_gather(sizes, n)
        m = int(max(int(s) for s in sizes))
        pad = torch.zeros((m - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        buf = torch.cat([t.detach(), pad])
        out = [torch.empty_like(buf) for _ in range(world_size())]
        dist.all_gather(out, buf)
    return torch.cat([o[: int(s)] for o, s in zip(out, sizes)])


# ----------------------------------------------------------------------------- models

def wrap(model: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """``model`` in DistributedDataParallel on a multi-process run (else ``model`` itself).

    Parameters and buffers start from rank 0's (DDP broadcasts them); every
    parameter that requires a gradient — weights, the gates' ``alpha`` and
    linear replacements — has it averaged over the ranks at each backward.
    """
    import torch
    from torch import nn  # noqa: F401

    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = torch.device(device)
    ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
    with collective("wrapping the model in DistributedDataParallel"):
        import inspect

        sync = ({"forward_sync_buffers": True} if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                else {"broadcast_buffers": True})
        return DDP(model, device_ids=ids, find_unused_parameters=False, **sync)


def _make_all_reduce_fn():
    """Autograd-aware all-reduce (sum): the gradient of a sum over ranks is the sum of the ranks' gradients."""
    import torch
    import torch.distributed as dist

    class AllReduceSum(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            out = t.clone()
            dist.all_reduce(out)
            return out

        @staticmethod
        def backward(ctx, grad):
            g = grad.clone()
            dist.all_reduce(g)
            return g

    return AllReduceSum


class _Lazy:
    fn = None

    @property
    def apply(self):
        if _Lazy.fn is None:
            _Lazy.fn = _make_all_reduce_fn()
        return _Lazy.fn.apply


_AllReduceSum = _Lazy()


def _global_bn_forward(bn: nn.modules.batchnorm._BatchNorm, orig):
    """A forward for ``bn`` that normalizes with the statistics of the global batch (all ranks)."""
    import torch
    from torch import nn  # noqa: F401

    all_reduce_autograd = _AllReduceSum.apply

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not bn.training or not active():
            return orig(x)
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        n_local = torch.tensor([xf.numel() / c], dtype=torch.float32, device=x.device)
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), n_local])
        stats = all_reduce_autograd(stats)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0.0)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + bn.eps)
        if bn.affine:
            y = y * bn.weight.reshape(shape) + bn.bias.reshape(shape)
        if bn.track_running_stats:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                mom = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                unbiased = var.detach() * (n.detach() / (n.detach() - 1).clamp_min(1))
                bn.running_mean.mul_(1 - mom).add_(mean.detach(), alpha=mom)
                bn.running_var.mul_(1 - mom).add_(unbiased, alpha=mom)
        return y.to(x.dtype)

    return forward


@contextlib.contextmanager
def sync_batchnorm(model: nn.Module) -> Iterator[None]:
    """While inside: BatchNorm layers of ``model`` in training mode use the global batch's statistics.

    The modules stay what they are (state_dict keys, fx graph and later
    passes unchanged); only their ``forward`` is swapped for the duration.
    One process: nothing changes.
    """
    from torch import nn  # noqa: F401

    if not active():
        yield
        return
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.forward = _global_bn_forward(m, type(m).forward.__get__(m))
    try:
        yield
    finally:
        for m in bns:
            m.__dict__.pop("forward", None)


# ----------------------------------------------------------------------------- launcher

def launch(nproc: int, argv: Sequence[str], *, module: str = "relucomp") -> int:
    """Run ``python -m torch.distributed.run --standalone --nproc_per_node nproc -m module argv``; its exit status.

    ``--standalone`` picks a free local port (one machine); ``torchrun``'s own
    agent stops the remaining ranks when one fails.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc} must be ≥ 1", "give --nproc 2 (processes on this machine)")
    if torchrun_env() is not None:
        raise ConfigError("--nproc given inside a torchrun launch", "drop --nproc (torchrun already started the processes)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(cmd, env=env)
