"""Sparsification of task vectors: magnitude top-k (TIES) and random drop (DARE).

Matches ``mergekit/sparsify.py`` (mergekit 0.1.5): ``magnitude``, ``bernoulli``,
``magnitude_outliers`` (breadcrumbs), ``della_magprune`` (DELLA) and
``rescaled_masked_tensor`` with ``RescaleNorm.l1`` (the only norm its task-arithmetic
methods use).
"""

from __future__ import annotations

import torch
from torch import Tensor

RESCALE_EPS = 1e-7
"""Below this L1 norm (before or after masking) mergekit skips the rescale."""


def keep_count(density: float, numel: int) -> int:
    """How many elements magnitude pruning keeps: mergekit's ``max(1, int(density * numel))``.

    ``density >= 1`` keeps all, ``density <= 0`` keeps none; any positive density keeps
    at least one element. ``int()`` truncates the float product, so e.g. density 0.29 of
    100 elements keeps 28 (0.29 * 100 == 28.999999999999996), exactly as mergekit does.
    """
    if density >= 1:
        return numel
    if density <= 0 or numel == 0:
        return 0
    return max(1, int(density * numel))


def kth_smallest(w: Tensor, k: int) -> Tensor:
    """The ``k``-th smallest value (1-based) of a flat CPU float tensor, as a 0-d tensor.

    NumPy's introselect (``np.partition``), about twice as fast as ``torch.kthvalue`` on
    CPU; the value is the same (an order statistic is unique)."""
    import numpy as np

    values = w.contiguous().numpy()
    return torch.tensor(np.partition(values, k - 1)[k - 1], dtype=w.dtype)


def magnitude_mask(tensor: Tensor, k: int) -> Tensor:
    """Boolean mask (shape of ``tensor``) of the ``k`` entries of largest ``|tensor|``.

    This is the single place that selects a magnitude threshold; a GPU kernel (radix
    select) can replace it. It finds the k-th largest magnitude without a full sort
    (a selection on CPU, ``topk`` elsewhere, where ``kthvalue`` is very slow), keeps
    everything above it, and fills the remaining slots among entries *equal* to it in
    index order (lowest flat index first), so exactly ``k`` entries are kept and the
    result is the same on every device.

    mergekit keeps ``argsort(|x|, descending=True)[:k]``: the same set except among
    entries tied at the threshold magnitude, where its choice is whatever the
    (unstable) sort produced. The two agree whenever the k-th and (k+1)-th largest
    magnitudes differ.
    """
    n = tensor.numel()
    if k >= n:
        return torch.ones_like(tensor, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(tensor, dtype=torch.bool)
    w = tensor.detach().abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
        threshold = kth_smallest(w, n - k + 1)
    else:
        threshold = torch.topk(w, k, sorted=False).values.min()
    keep = w >= threshold
    if int(keep.sum()) > k:  # more entries tie at the threshold than slots are left
        keep = _fill_ties(w > threshold, w == threshold, k)
    return keep.reshape(tensor.shape)


def _fill_ties(chosen: Tensor, ties: Tensor, k: int) -> Tensor:
    """``chosen`` plus the lowest-index ``ties`` entries, up to ``k`` entries in all."""
    return chosen | (ties & (torch.cumsum(ties, dim=0) <= k - int(chosen.sum())))


def draw_bernoulli(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """``torch.bernoulli(probs, generator=generator)``, bit for bit, in less time on CPU.

    For float32/float64 on CPU, torch's Bernoulli kernel draws one uniform per entry, in
    order, exactly as ``torch.rand`` does, and keeps the entry when it is below ``p``:
    ``rand < p`` is the same mask from the same generator state at half the cost
    (tests/test_merge_methods.py checks the equality). Elsewhere torch's own kernel runs.
    """
    if probs.device.type == "cpu" and probs.dtype in (torch.float32, torch.float64):
        return (torch.rand(probs.shape, generator=generator, dtype=probs.dtype) < probs).to(probs.dtype)
    return torch.bernoulli(probs, generator=generator)


def rescaled_masked(tensor: Tensor, mask: Tensor, rescale: bool) -> Tensor:
    """``tensor * mask``, optionally rescaled to keep the L1 norm of ``tensor``.

    Matches mergekit's ``rescaled_masked_tensor(tensor, mask, RescaleNorm.l1)``: the
    factor is ``sum|tensor| / sum|tensor * mask|`` (the exact norm ratio, *not*
    ``1 / density``), skipped when either norm is below ``RESCALE_EPS``.
    """
    masked = tensor * mask
    if not rescale:
        return masked
    before = tensor.abs().sum()
    after = masked.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked * (before / after)


def magnitude(tensor: Tensor, density: float, *, rescale: bool = False) -> Tensor:
    """Keep the ``keep_count(density, numel)`` largest-magnitude entries (TIES trimming).

    Matches mergekit ``sparsify.magnitude``: ``density >= 1`` returns ``tensor`` itself,
    ``density <= 0`` (or an empty tensor) returns zeros. Ties at the threshold: see
    :func:`magnitude_mask`.
    """
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    mask = magnitude_mask(tensor, keep_count(density, tensor.numel())).to(tensor.dtype)
    return rescaled_masked(tensor, mask, rescale)


def bernoulli(
    tensor: Tensor,
    density: float,
    *,
    rescale: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DARE random drop: keep each entry with probability ``density``.

    Matches mergekit ``sparsify.bernoulli``: ``density >= 1`` returns ``tensor`` itself
    and draws nothing; otherwise one ``torch.bernoulli`` call on a tensor full of
    ``density`` (float32 for float32/float16 CPU tensors, else the tensor's dtype), then
    the optional L1 rescale of :func:`rescaled_masked` (mergekit's DARE "rescale" is this
    norm match, which equals the paper's ``1 / density`` only in expectation).

    Randomness: mergekit draws from torch's global generator (seeded once per run by
    ``mergekit-yaml --random-seed``). Here the caller passes ``generator``; ``None`` means
    the global one. For the same device, dtype and shape, ``torch.manual_seed(s)``
    followed by mergekit's call draws exactly the same mask as this function with
    ``torch.Generator(device).manual_seed(s)``. CPU and CUDA generators produce
    different streams.
    """
    if density >= 1:
        return tensor
    if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16:
        work_dtype = tensor.dtype
    else:
        work_dtype = torch.float32  # CPU bernoulli has no float16 kernel
    probs = torch.full_like(tensor, density, dtype=work_dtype)
    mask = draw_bernoulli(probs, generator)
    return rescaled_masked(tensor.to(work_dtype), mask, rescale).to(tensor.dtype)


def smallest_mask(w: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` smallest entries of the flat tensor ``w``, ties broken by
    index (lowest first): exactly the first ``k`` of a *stable* ascending sort, found with
    one order statistic instead of a sort (a selection on CPU, ``topk`` elsewhere)."""
    n = w.numel()
    if k <= 0:
        return torch.zeros_like(w, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(w, dtype=torch.bool)
    if w.device.type == "cpu":
        threshold = kth_smallest(w, k)
    else:
        threshold = torch.topk(w, k, largest=False, sorted=False).values.max()
    keep = w <= threshold
    if int(keep.sum()) > k:
        keep = _fill_ties(w < threshold, w == threshold, k)
    return keep


def magnitude_outliers(tensor: Tensor, density: float, *, gamma: float = 0.01, rescale: bool = False) -> Tensor:
    """Model Breadcrumbs: drop the ``gamma`` share of largest magnitudes *and* the smallest,
    keeping ``int(density * n)`` entries (the outlier cut shrinks when needed to keep them).

    Matches mergekit ``sparsify.magnitude_outliers``: with the magnitudes sorted ascending it
    keeps ranks ``[n_bot, n_bot + target)``, ``target = int(density * n)``, ``n_top =
    int(gamma * n)``, ``n_bot = max(0, n - target - n_top)``; ``density >= 1`` returns the
    tensor itself. Ties at the two cut-offs are broken by index here (mergekit: whatever its
    unstable sort did); the rest is identical.
    """
    if density >= 1:
        return tensor
    n = tensor.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    w = tensor.detach().abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    keep = smallest_mask(w, n_bot + target) & ~smallest_mask(w, n_bot)
    return rescaled_masked(tensor, keep.reshape(tensor.shape).to(tensor.dtype), rescale)


def della_magprune(
    tensor: Tensor,
    density: float,
    *,
    epsilon: float = 0.15,
    rescale: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DELLA's MagPrune: drop entries at random with keep probabilities rising with magnitude rank.

    Matches mergekit ``sparsify.della_magprune``: per row (a 1-D tensor is one row), ranks
    1..m of the magnitudes ascending, normalised to [0, 1], give keep probabilities
    ``density - epsilon + rank_norm * 2 epsilon``; one ``torch.bernoulli`` draw over the
    whole tensor (float32 for float32/float16 CPU tensors); optional L1 rescale.
    ``density >= 1`` returns the tensor, ``density <= 0`` zeros; otherwise ``density +-
    epsilon`` must lie strictly inside (0, 1). Ranks come from a sort (every entry needs
    its rank; ties are ranked by index, where mergekit's unstable sort may differ). With
    the same generator state the mask equals mergekit's (see :func:`bernoulli`).
    """
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"DELLA needs density +- epsilon inside (0, 1); got density {density}, epsilon {epsilon}")
    shape = tensor.shape
    work_dtype = tensor.dtype if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16 else torch.float32
    rows = tensor.unsqueeze(0) if tensor.dim() < 2 else tensor
    ranks = row_ranks(rows.abs()).to(work_dtype) + 1
    # mergekit takes each row's min and max rank; the ranks are a permutation of 1..m, so
    # those are 1 and m (as rounded to the work dtype), with no reduction needed
    low = torch.ones(1, dtype=work_dtype, device=rows.device)
    high = torch.full((1,), rows.shape[1], dtype=work_dtype, device=rows.device)
    rank_norm = ((ranks - low) / (high - low)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    mask = draw_bernoulli(probs, generator)
    return rescaled_masked(rows.to(work_dtype), mask, rescale).to(tensor.dtype).reshape(shape)


_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def row_ranks(magnitudes: Tensor) -> Tensor:
    """0-based rank of every entry along dim 1 (ascending; ties ranked by index): the inverse
    permutation of a stable argsort, as an int64 tensor of the same shape.

    On CPU, for 2-D float32/bfloat16/float16 magnitudes, one sort of unique 64-bit keys
    (the magnitude's bits, which order non-negative floats as their values do, then the
    column) replaces the stable argsort: NumPy's vectorised sort is several times faster
    than torch's stable one, and unique keys make any sort stable. Elsewhere (GPU, other
    shapes and dtypes) torch's stable sort.
    """
    m = magnitudes.shape[1]
    if magnitudes.device.type == "cpu" and magnitudes.dim() == 2 and magnitudes.dtype in _BITS and m < 2 ** 31:
        import numpy as np

        bits = magnitudes.contiguous().view(_BITS[magnitudes.dtype]).numpy().astype(np.int64)
        keys = np.left_shift(bits, 32, out=bits)
        keys |= np.arange(m, dtype=np.int64)
        keys.sort(axis=1)
        order = torch.from_numpy(keys & 0xFFFFFFFF)
    else:
        order = torch.sort(magnitudes, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(m, device=order.device).reshape((1, m) + (1,) * (order.dim() - 2))
    ranks.scatter_(1, order, positions.expand_as(order))
    return ranks
