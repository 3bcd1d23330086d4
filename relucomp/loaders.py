"""Fast in-memory batch loaders over a :class:`~relucomp.data.GroupedDataset`.

The data sets relucomp trains on fit in memory as uint8, so batches are cut
from tensors and augmented per batch (random crop with padding + flip) instead
of per sample through a DataLoader — several times faster on 2 CPU cores.
Each loader yields ``(x, y, g)``; shuffling is seeded and advances per epoch.

**Multi-process runs** (:mod:`relucomp.distributed`): inside
``loader.sharded()`` (the training loop enters it) rank ``r`` of ``W`` yields
its contiguous slice ``[r·B/W, (r+1)·B/W)`` of every *global* batch of ``B``
images.  Every rank draws the same permutation and the same augmentation for
the whole global batch from the same seeded generator, so the union of the
ranks' slices is exactly the batch one process would train on, the
generator's stream is the single-process one (a checkpoint resumes on any
number of processes), and outside ``sharded()`` (BN re-estimation, mask
refinement, calibration) every rank sees the single-process batches.

:class:`WorkerLoader` is the ``torch.utils.data.DataLoader`` path (worker
processes, persistent workers, pinned memory, ``DistributedSampler`` on a
multi-process run) for data sets whose per-sample work is the bottleneck;
the in-memory loader stays the default (faster on CPU: see
``benchmarks/results/scale.json``).
"""

from __future__ import annotations

import contextlib

import torch

from .data.transforms import normalize, random_crop_flip_batch


def _shard(n: int) -> slice:
    """This rank's contiguous part of a global batch of ``n`` (sizes differ by at most one)."""
    from . import distributed

    w, r = distributed.world_size(), distributed.rank()
    return slice(r * n // w, (r + 1) * n // w)


class _Shardable:
    """``with loader.sharded():`` yields this rank's slice of each global batch inside (a no-op on one process)."""

    _sharded = False

    @contextlib.contextmanager
    def sharded(self):
        prev, self._sharded = self._sharded, True
        try:
            yield self
        finally:
            self._sharded = prev


class BatchLoader(_Shardable):
    def __init__(self, dataset, *, batch_size: int = 128, shuffle: bool = False, augment: bool = False,
                 seed: int = 0, drop_last: bool = False, pin_memory: bool = False):
        self.dataset = dataset
        self.pin_memory = pin_memory
        self._sharded = False
        self.global_batch = 0  # size of the global batch the last yielded slice came from
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.generator = torch.Generator().manual_seed(seed)
        self._x = dataset.images
        self._y = dataset.labels
        self._g = dataset.groups

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.dataset)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for s in range(0, n, self.batch_size):
            idx = order[s: s + self.batch_size]
            if self.drop_last and idx.numel() < self.batch_size:
                break
            x = self._x[idx].to(torch.float32).div_(255.0)
            if self.augment:
                x = random_crop_flip_batch(x, self.dataset.padding, generator=self.generator)
            y, g = self._y[idx], self._g[idx]
            self.global_batch = int(idx.numel())
            if self._sharded:
                part = _shard(self.global_batch)
                x, y, g = x[part], y[part], g[part]
            x = normalize(x, self.dataset.mean, self.dataset.std)
            if self.pin_memory:
                x, y, g = x.pin_memory(), y.pin_memory(), g.pin_memory()
            yield x, y, g



class _Augmented(torch.utils.data.Dataset):
    """Per-sample decode-free augmentation for worker processes (pad-crop + flip, then normalise)."""

    def __init__(self, dataset, augment: bool):
        self.dataset, self.augment = dataset, augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x = self.dataset.images[i: i + 1].to(torch.float32).div_(255.0)
        if self.augment:
            x = random_crop_flip_batch(x, self.dataset.padding)
        x = normalize(x, self.dataset.mean, self.dataset.std)[0]
        return x, self.dataset.labels[i], self.dataset.groups[i]


class WorkerLoader(_Shardable):
    """The training loader through ``torch.utils.data.DataLoader`` (``runtime.workers`` > 0).

    Shuffling uses a seeded generator (saved in checkpoints like
    :class:`BatchLoader`'s); inside ``sharded()`` on a multi-process run a
    ``DistributedSampler`` (seeded, ``set_epoch`` per epoch) gives each rank
    ``batch / world`` images of the same global batches.  Augmentation draws
    happen in the workers (per sample), so unlike :class:`BatchLoader` it is
    not reproduced bit for bit across process counts.
    """

    def __init__(self, dataset, *, batch_size: int = 128, shuffle: bool = True, augment: bool = True, seed: int = 0,
                 workers: int = 2, persistent_workers: bool = True, pin_memory: bool = False, drop_last: bool = False):
        self.dataset, self.batch_size, self.shuffle, self.augment = dataset, int(batch_size), shuffle, augment
        self.workers, self.persistent, self.pin_memory, self.drop_last = int(workers), persistent_workers, pin_memory, drop_last
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self._sharded = False
        self._epoch = 0
        self._loaders: dict = {}
        self.global_batch = 0

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _loader(self):
        from . import distributed

        w = distributed.world_size() if self._sharded else 1
        if w not in self._loaders:
            ds = _Augmented(self.dataset, self.augment)
            kw = dict(num_workers=self.workers, pin_memory=self.pin_memory,
                      persistent_workers=self.persistent and self.workers > 0, drop_last=self.drop_last)
            if w > 1:
                from torch.utils.data.distributed import DistributedSampler

                sampler = DistributedSampler(ds, num_replicas=w, rank=distributed.rank(), shuffle=self.shuffle,
                                             seed=self.seed, drop_last=self.drop_last)
                self._loaders[w] = (torch.utils.data.DataLoader(ds, batch_size=self.batch_size // w, sampler=sampler,
                                                                **kw), sampler)
            else:
                self._loaders[w] = (torch.utils.data.DataLoader(ds, batch_size=self.batch_size, shuffle=self.shuffle,
                                                                generator=self.generator, **kw), None)
        return self._loaders[w]

    def __iter__(self):
        from . import distributed

        loader, sampler = self._loader()
        if sampler is not None:
            sampler.set_epoch(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=self.generator)))
        w = distributed.world_size() if self._sharded else 1
        for x, y, g in loader:
            self.global_batch = int(x.shape[0]) * w
            yield x, y, g


def train_loader(dataset, *, batch_size: int, seed: int, workers: int = 0, pin_memory: bool = False):
    """The shuffled, augmented training loader: in memory (``workers == 0``, default) or a DataLoader."""
    if workers and workers > 0:
        return WorkerLoader(dataset, batch_size=batch_size, seed=seed, workers=workers, pin_memory=pin_memory)
    return BatchLoader(dataset, batch_size=batch_size, shuffle=True, augment=True, seed=seed, pin_memory=pin_memory)


def first_batch(loader, n: int) -> torch.Tensor:
    """The first ``n`` inputs of ``loader`` (calibration batch)."""
    xs, got = [], 0
    for x, *_ in loader:
        xs.append(x)
        got += x.shape[0]
        if got >= n:
            break
    return torch.cat(xs)[:n]
