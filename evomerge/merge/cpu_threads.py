"""Which thread merges which tensor on a CPU, so that a merge is the same bits wherever it runs.

Sparsifying methods (order statistics, sorts, random draws: serial work inside one op) merge
tensors concurrently on a pool, each on one torch thread; elementwise methods run in the
caller's thread. A reduction's rounding depends on how torch splits it across threads, so the
resident merge (search, export) and the streaming merge both take their threads from here:
the same tensors whatever the caller's thread count.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

from evomerge.merge.methods import MergeMethod


def sparsifies(method: MergeMethod) -> bool:
    """True for methods that trim or drop entries per tensor: an order statistic, a sort or a
    random draw, serial work inside one op, which a pool over tensors spreads across threads.
    Elementwise methods (linear, task arithmetic, SLERP) are memory-bound and run in the
    caller's thread, where torch splits large ops across its threads (measured here: the
    pool makes them slower, and sparsifying methods 1.2-1.5x faster, on 2 cores)."""
    density = method.model_parameters.get("density")
    return density is not None and density.kwarg is not None


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}  # (pid, threads): a forked child makes its own


def cpu_pool() -> ThreadPoolExecutor | None:
    """Threads that merge CPU tensors concurrently, one per torch thread, each running torch's
    ops on one thread (OpenMP's thread count is per calling thread, so the caller's is kept).

    Tensors, not ops, are split: most tensors of a model are too small for torch's own
    intra-op split to pay, and the order statistics, sorts and random draws of the sparsifying
    methods run serially inside an op. Torch's ops and NumPy's selections release the GIL.
    ``None`` with one torch thread (e.g. a Ray worker given one CPU)."""
    threads = torch.get_num_threads()
    if threads <= 1:
        return None
    key = (os.getpid(), threads)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="evomerge-merge")
    return _POOLS[key]


def one_thread() -> None:
    """This thread runs torch's ops on one thread; called by every pooled task, not once per
    thread: torch initialises a thread's count lazily, at its first parallel op, from the
    process-wide setting (the last ``set_num_threads`` anywhere), so a setting made before
    then is lost (``get_num_threads`` runs that initialisation first)."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def merge_pool(method: MergeMethod, device: torch.device) -> Optional[ThreadPoolExecutor]:
    """The pool ``method``'s tensors are merged on (each task calls :func:`one_thread` first), or
    None: merge in the caller's thread (elementwise methods, a GPU, one torch thread)."""
    if device.type != "cpu" or not sparsifies(method):
        return None
    return cpu_pool()
