"""PyTorch's CPU order among equal values, for the cuts mergekit makes by sorting.

mergekit picks entries by sorting on the CPU: TIES keeps ``argsort(|τ|, descending)[:k]``,
Model Breadcrumbs the ascending ``sort(|τ|).indices[lo:hi]``, SCE ``topk(|var|, k)``. Where
equal magnitudes straddle the cut, which of them are kept is decided by the sorting algorithm
PyTorch's CPU kernels run: the C++ standard library's unstable ``std::sort`` over (value,
index) pairs for ``sort``/``argsort``, and ``std::nth_element`` (or ``std::partial_sort``
when k·64 ≤ n) for ``topk``. With GCC's library (the one PyTorch's Linux wheels are built
with) these are:

- ``sort``: introsort. While a range holds more than 16 entries: move the median of its
  second, middle and last entries to its front (the pivot), partition the rest by the
  pivot (a left scan stops at entries not less than it, a right scan at entries not greater,
  the two are swapped, until the scans cross; the range splits where the left scan stopped),
  sort the right part, continue with the left. After 2·⌊log2 n⌋ levels a range is heap
  sorted instead. Finally an insertion sort (stable) orders the ranges of ≤ 16 left over.
- ``nth_element``: the same partition, keeping only the part that holds position k − 1,
  down to ≤ 3 entries (then an insertion sort), a heap selection after 2·⌊log2 n⌋ levels.
- ``partial_sort``: a heap of the first k entries, each later entry replacing the heap's
  top when strictly better.

Only the ranges that contain a cut are followed (the order inside a range that lies wholly
on one side of every cut decides nothing), so a cut costs O(n) NumPy work: each partition is
computed at once from the positions where the two scans stop. Everything here is host
NumPy; :mod:`swudi_jax.methods.sparsify` calls it from compiled code through
``jax.pure_callback``. Checked against the standard library's definition transcribed
entry by entry (``tests/torch_sort_reference.py``) and against PyTorch itself
(``benchmarks/mergekit_crosscheck``).
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_dtypes
import numpy as np

_FLOAT32_EXACT = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32))
_HALF_INF = {np.dtype(ml_dtypes.bfloat16): 0x7F80, np.dtype(np.float16): 0x7C00}
"""The bit pattern of +inf of the 16-bit floats."""
INSERTION_THRESHOLD = 16
"""Ranges this small are left to the final insertion sort (``std::sort``)."""
SELECT_THRESHOLD = 3
"""``std::nth_element`` stops partitioning at ranges this small."""


class _Order:
    """Keys (ascending comparison) and the original index of each, permuted together.

    float32 and uint16 keys (the bit patterns of non-negative halves) keep their dtype, and
    indices are int32 below 2**31 entries: a cut through a 12 M-entry bf16 tensor holds about 7
    bytes per entry, not 16.
    """

    def __init__(self, keys: np.ndarray, copy: bool = True):
        keys = np.asarray(keys).reshape(-1)
        dtype = keys.dtype if keys.dtype in (np.float32, np.float64, np.uint16) else np.float64
        self.key = np.array(keys, dtype, copy=True if copy else None)  # copy=False: the keys are ours to permute
        self.index = np.arange(self.key.size, dtype=np.int32 if self.key.size < 2**31 else np.int64)

    def swap(self, a: int, b: int) -> None:
        self.key[[a, b]] = self.key[[b, a]]
        self.index[[a, b]] = self.index[[b, a]]

    def stable_sort(self, first: int, last: int) -> None:
        """The insertion sort's result on [first, last): stable by key."""
        order = np.argsort(self.key[first:last], kind="stable") + first
        self.key[first:last], self.index[first:last] = self.key[order], self.index[order]


def _depth(n: int) -> int:
    return 2 * (int(n).bit_length() - 1)


def _median_to_first(s: _Order, result: int, a: int, b: int, c: int) -> None:
    k = s.key
    if k[a] < k[b]:
        pick = b if k[b] < k[c] else (c if k[a] < k[c] else a)
    else:
        pick = a if k[a] < k[c] else (c if k[b] < k[c] else b)
    s.swap(result, pick)


BLOCK = 1 << 16
"""Block of positions over which :func:`_partition` counts scan stops (its working memory)."""


def _block_counts(mask: np.ndarray) -> np.ndarray:
    """True entries per block of :data:`BLOCK` (a buffered sum: no int64 copy of the mask)."""
    whole = mask.size // BLOCK * BLOCK
    counts = mask[:whole].reshape(-1, BLOCK).sum(axis=1, dtype=np.int64)
    return np.append(counts, np.count_nonzero(mask[whole:])) if whole < mask.size else counts


def _pairs_before_crossing(left: np.ndarray, right: np.ndarray) -> int:
    """m, the number of (left stop, right stop) pairs the two scans swap before they cross.

    ``left``/``right`` mark the positions where the left (ascending) and right (descending)
    scans stop. The j-th left stop pairs with the j-th right stop while it lies left of it, so
    m = max over x of min(#left stops < x, #right stops ≥ x) (the first count grows with x, the
    second falls): found from per-block counts, then exactly inside the block where they cross.
    """
    starts = np.arange(0, left.size, BLOCK)
    bounds = np.append(starts, left.size)
    below = np.concatenate([[0], np.cumsum(_block_counts(left))])
    right_before = np.concatenate([[0], np.cumsum(_block_counts(right))])
    above = right_before[-1] - right_before
    b = int(np.flatnonzero(below <= above)[-1])
    if b == starts.size:
        return int(min(below[b], above[b]))
    lo, hi = bounds[b], bounds[b + 1]
    local_below = below[b] + np.concatenate([[0], np.cumsum(left[lo:hi], dtype=np.int64)])
    local_above = above[b] - np.concatenate([[0], np.cumsum(right[lo:hi], dtype=np.int64)])
    return int(np.max(np.minimum(local_below, local_above)))


def _stops(mask: np.ndarray, count: int, from_end: bool = False) -> np.ndarray:
    """The first ``count`` True positions of ``mask`` (from its end, in descending order, when
    ``from_end``), found block by block: an array of ``count`` indices, not one per True."""
    found, got = [], 0
    starts = range(0, mask.size, BLOCK)
    for start in (reversed(starts) if from_end else starts):
        if got >= count:
            break
        where = np.flatnonzero(mask[start:start + BLOCK]) + start
        where = where[::-1] if from_end else where
        found.append(where[:count - got])
        got += found[-1].size
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def _partition(s: _Order, first: int, last: int) -> int:
    """Median-of-three pivot moved to ``first``, then [first + 1, last) partitioned by it;
    returns the split. The k-th left stop pairs with the k-th right stop while it lies left
    of it; after m swaps the left scan ends at the next left stop or the last right stop.
    Working memory: two boolean masks and 2m indices (not an index per stop)."""
    _median_to_first(s, first, first + 1, first + (last - first) // 2, last - 1)
    k = s.key
    pivot = k[first]
    left = np.less(k[first:last], pivot)
    np.logical_not(left, out=left)
    left[0] = False  # the left scan starts after the pivot
    right = np.less(pivot, k[first:last])
    np.logical_not(right, out=right)  # the pivot itself stops it
    m = _pairs_before_crossing(left, right)
    lp = _stops(left, m + 1)
    if m == 0:
        return first + int(lp[0])
    rp = _stops(right, m, from_end=True)
    after = int(lp[m]) if lp.size > m else None
    lp = lp[:m]
    lp += first
    rp += first
    k[lp], k[rp] = k[rp], k[lp].copy()
    s.index[lp], s.index[rp] = s.index[rp], s.index[lp].copy()
    last_right = int(rp[-1]) - first
    return first + (min(after, last_right) if after is not None else last_right)


# ----------------------------------------------------------------------------- heaps (rare fallbacks)


def _sift(heap: list, hole: int, length: int, value: tuple) -> None:
    """Move the hole at ``hole`` down to a leaf along larger children, then push ``value`` up
    from there (the standard library's heap adjustment; "larger" by key, max-heap)."""
    top, child = hole, hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if heap[child][0] < heap[child - 1][0]:
            child -= 1
        heap[hole] = heap[child]
        hole = child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        heap[hole] = heap[child - 1]
        hole = child - 1
    parent = (hole - 1) // 2
    while hole > top and heap[parent][0] < value[0]:
        heap[hole] = heap[parent]
        hole = parent
        parent = (hole - 1) // 2
    heap[hole] = value


def _make_heap(heap: list) -> None:
    length = len(heap)
    for parent in range((length - 2) // 2, -1, -1):
        _sift(heap, parent, length, heap[parent])


def _heap_select(s: _Order, first: int, middle: int, last: int) -> None:
    """[first, middle) becomes a heap of the smallest entries of [first, last): a later entry
    strictly less than the heap's top replaces it (the top only decreases, so each chunk is
    prefiltered by the top at its start)."""
    heap = list(zip(s.key[first:middle].tolist(), s.index[first:middle].tolist()))
    _make_heap(heap)
    rest_key, rest_index = s.key[middle:last].copy(), s.index[middle:last].copy()
    chunk = 1 << 16
    for start in range(0, rest_key.size, chunk):
        keys = rest_key[start:start + chunk]
        for j in np.flatnonzero(keys < heap[0][0]).tolist():
            if keys[j] < heap[0][0]:
                out = heap[0]
                _sift(heap, 0, len(heap), (float(keys[j]), int(rest_index[start + j])))
                rest_key[start + j], rest_index[start + j] = out
    s.key[first:middle] = [v for v, _ in heap]
    s.index[first:middle] = [i for _, i in heap]
    s.key[middle:last], s.index[middle:last] = rest_key, rest_index


def _heap_sort(s: _Order, first: int, last: int) -> None:
    """``partial_sort(first, last, last)``: a heap of the whole range, then popped from the back."""
    heap = list(zip(s.key[first:last].tolist(), s.index[first:last].tolist()))
    _make_heap(heap)
    for end in range(len(heap) - 1, 0, -1):
        value, heap[end] = heap[end], heap[0]
        _sift(heap, 0, end, value)
    s.key[first:last] = [v for v, _ in heap]
    s.index[first:last] = [i for _, i in heap]


# ----------------------------------------------------------------------------- the three entry points


def sorted_order(keys: np.ndarray, cuts: Sequence[int], depth: int | None = None) -> np.ndarray:
    """The original indices in ``std::sort`` order of ``keys`` (ascending), exact on each side
    of every cut: for each c in ``cuts`` the first c entries are the set ``std::sort`` puts
    there (their order among themselves is not settled). ``depth``: the level budget (tests)."""
    return _sorted_order(_Order(keys), cuts, depth)


def _sorted_order(s: _Order, cuts: Sequence[int], depth: int | None) -> np.ndarray:
    n = s.key.size
    cuts = np.unique(np.asarray(list(cuts), np.int64))

    def holds_cut(first: int, last: int) -> bool:
        return bool(np.any((cuts > first) & (cuts < last)))

    pending = [(0, n, _depth(n) if depth is None else depth)] if n else []
    while pending:
        first, last, level = pending.pop()
        while last - first > INSERTION_THRESHOLD and holds_cut(first, last):
            if level == 0:
                _heap_sort(s, first, last)
                break
            level -= 1
            cut = _partition(s, first, last)
            pending.append((cut, last, level))
            last = cut
        else:
            if holds_cut(first, last):
                s.stable_sort(first, last)
    return s.index


def selected_smallest(keys: np.ndarray, k: int, depth: int | None = None) -> np.ndarray:
    """Mask of the k entries a ``topk`` of the smallest ``keys`` returns: ``nth_element`` at
    k − 1, or a heap selection when k·64 ≤ n (PyTorch's choice); k ≤ 0 none, k ≥ n all."""
    return _selected_smallest(_Order(keys), k, depth)


def _selected_smallest(s: _Order, k: int, depth: int | None) -> np.ndarray:
    n = s.key.size
    mask = np.zeros(n, bool)
    if k <= 0 or n == 0:
        return mask
    if k >= n:
        return ~mask
    if k * 64 <= n:
        _heap_select(s, 0, k, n)
    else:
        _nth_element(s, k - 1, _depth(n) if depth is None else depth)
    mask[s.index[:k]] = True
    return mask


def _nth_element(s: _Order, nth: int, level: int) -> None:
    first, last = 0, s.key.size
    while last - first > SELECT_THRESHOLD:
        if level == 0:
            _heap_select(s, first, nth + 1, last)
            return
        level -= 1
        cut = _partition(s, first, last)
        first, last = (cut, last) if cut <= nth else (first, cut)
    s.stable_sort(first, last)


def _ascending_keys(values: np.ndarray, descending: bool) -> np.ndarray:
    """Keys whose ascending order is PyTorch's: NaN above every number (last ascending, first
    descending), as its comparators put it; with a NaN present, the values' ranks. Non-negative
    finite bf16/f16 values are ranked by their bit patterns (uint16, reversed for descending),
    other floats of up to 32 bits in float32 (exact, negation included), anything else in float64.
    Always a new array (the sort permutes it in place)."""
    keys = np.asarray(values).reshape(-1)
    if keys.dtype in _HALF_INF:  # non-negative finite halves order as their bit patterns: 2 bytes a key
        bits = keys.view(np.uint16)
        if not np.any(bits > _HALF_INF[keys.dtype]):  # no sign bit, no NaN
            return np.subtract(np.uint16(0xFFFF), bits) if descending else bits.copy()
    keys = keys.astype(np.float32 if keys.dtype in _FLOAT32_EXACT else np.float64)  # a copy
    nan = np.isnan(keys)
    if nan.any():
        _, keys = np.unique(np.where(nan, np.inf, keys), return_inverse=True)
        keys = np.where(nan, keys.max(initial=0) + 1, keys).astype(np.float64)
    if descending:
        np.negative(keys, out=keys)
    return keys


def window_of_sort(values: np.ndarray, lo: int, hi: int, descending: bool) -> np.ndarray:
    """Mask of the entries at positions [lo, hi) of PyTorch's CPU ``sort(values, descending)``."""
    keys = _Order(_ascending_keys(values, descending), copy=False)
    mask = np.zeros(keys.key.size, bool)
    order = _sorted_order(keys, (lo, hi), None)
    mask[order[max(lo, 0):max(hi, 0)]] = True
    return mask


def topk_mask(values: np.ndarray, k: int) -> np.ndarray:
    """Mask of the entries PyTorch's CPU ``topk(values, k, largest=True)`` returns (NaN largest)."""
    return _selected_smallest(_Order(_ascending_keys(values, descending=True), copy=False), k, None)


__all__ = ["sorted_order", "selected_smallest", "topk_mask", "window_of_sort"]
