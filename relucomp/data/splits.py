"""Deterministic stratified splitting and subsampling.

Strata are the distinct ``(label, group)`` pairs (plus the official split when
subsampling).  Per-stratum counts are allocated with the largest-remainder
method, so the totals are exact (``round(N * fraction)``) and every stratum
gets its proportional share up to one sample.  Ties and the order within a
stratum are drawn from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["allocate", "stratified_split", "stratified_subsample", "strata_of"]


def strata_of(*keys: np.ndarray) -> np.ndarray:
    """Dense stratum id of each sample from one or more integer key arrays."""
    if not keys:
        raise ValueError("need at least one key")
    stacked = np.stack([np.asarray(k, dtype=np.int64) for k in keys], axis=1)
    _, inverse = np.unique(stacked, axis=0, return_inverse=True)
    return inverse.reshape(-1)


def allocate(sizes: np.ndarray, fraction: float, rng: np.random.Generator, total: int | None = None) -> np.ndarray:
    """Split ``total`` (default ``round(sum(sizes) * fraction)``) over strata proportionally.

    Largest remainder; never gives a stratum more than its size.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    n = int(sizes.sum())
    if total is None:
        total = int(round(n * fraction))
    total = max(0, min(int(total), n))
    if n == 0 or total == 0:
        return np.zeros_like(sizes)
    ideal = sizes * (total / n)
    base = np.minimum(np.floor(ideal).astype(np.int64), sizes)
    remaining = total - int(base.sum())
    if remaining > 0:
        frac = ideal - base
        jitter = rng.random(len(sizes)) * 1e-6  # random tie-break
        order = np.lexsort((jitter, -frac))
        for s in order:
            if remaining == 0:
                break
            if base[s] < sizes[s]:
                base[s] += 1
                remaining -= 1
    return base


def stratified_subsample(strata: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of ``limit`` samples drawn proportionally from every stratum."""
    strata = np.asarray(strata)
    n = len(strata)
    if limit >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    ids, counts = np.unique(strata, return_counts=True)
    take = allocate(counts, limit / n, rng, total=limit)
    chosen = []
    for sid, k in zip(ids, take):
        if k:
            members = np.flatnonzero(strata == sid)
            chosen.append(rng.choice(members, size=int(k), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def stratified_split(
    labels: np.ndarray,
    groups: np.ndarray,
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    official: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Indices (sorted) of ``train``, ``val`` and ``test``.

    Without an official split: ``test_fraction`` and ``val_fraction`` of all
    samples go to test and val, stratified by ``(label, group)``.  With one
    (codes 0 train, 1 val, 2 test): the official parts are kept and a missing
    val (or test) is carved out of the official train set -- ``val_fraction``
    (``test_fraction``) of it, stratified the same way.
    """
    labels = np.asarray(labels, dtype=np.int64)
    groups = np.asarray(groups, dtype=np.int64)
    n = len(labels)
    rng = np.random.default_rng(seed)
    if official is not None:
        official = np.asarray(official)
        test = np.flatnonzero(official == 2)
        val = np.flatnonzero(official == 1)
        train_pool = np.flatnonzero(official == 0)
        fractions = ([test_fraction] if len(test) == 0 else []) + ([val_fraction] if len(val) == 0 else [])
        if not fractions:
            return {"train": train_pool, "val": val, "test": test}
        carved, train = _carve(train_pool, labels, groups, rng, fractions)
        if len(test) == 0:
            test = carved.pop(0)
        if len(val) == 0:
            val = carved.pop(0)
        return {"train": train, "val": val, "test": test}
    (test, val), train = _carve(np.arange(n), labels, groups, rng, [test_fraction, val_fraction])
    return {"train": train, "val": val, "test": test}


def _carve(pool, labels, groups, rng, fractions):
    """Carve successive fractions (of the whole pool) out of ``pool``; return (parts, rest).

    Two-level largest remainder: the count is first shared among groups, then
    among the labels inside each group, so every group's share is exact and
    independent of the seed (only the members change).
    """
    pool = np.asarray(pool, dtype=np.int64)
    if len(pool) == 0:
        return [np.zeros(0, np.int64) for _ in fractions], pool
    g_pool, y_pool = groups[pool], labels[pool]
    keys = sorted({(int(a), int(b)) for a, b in zip(g_pool, y_pool)})
    members = {k: rng.permutation(pool[(g_pool == k[0]) & (y_pool == k[1])]) for k in keys}
    group_ids = sorted({k[0] for k in keys})
    by_group = {gid: [k for k in keys if k[0] == gid] for gid in group_ids}
    left = {k: len(members[k]) for k in keys}
    taken = {k: 0 for k in keys}
    parts = []
    n = len(pool)
    for frac in fractions:
        total = int(round(n * frac))
        g_sizes = np.array([sum(left[k] for k in by_group[gid]) for gid in group_ids])
        g_take = allocate(g_sizes, 0.0, rng, total=total)
        chosen = []
        for gid, gt in zip(group_ids, g_take):
            ks = by_group[gid]
            k_take = allocate(np.array([left[k] for k in ks]), 0.0, rng, total=int(gt))
            for k, t in zip(ks, k_take):
                chosen.append(members[k][taken[k] : taken[k] + t])
                taken[k] += int(t)
                left[k] -= int(t)
        parts.append(np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64))
    rest = [members[k][taken[k] :] for k in keys]
    return parts, np.sort(np.concatenate(rest))
