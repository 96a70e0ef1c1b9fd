"""PyTorch's CPU sort and top-k order, element by element, independent of swudi_jax.

PyTorch's CPU ``sort``/``argsort`` run GCC's ``std::sort`` over (value, index) pairs, and
``topk`` runs ``std::nth_element`` (``std::partial_sort`` when k·64 ≤ n). This file writes
those algorithms out one comparison and one swap at a time on Python lists, from their
definition (introsort: median-of-three pivot moved to the front, Hoare partition whose scans
stop at equal keys, recursion on the right part, heap sort below the depth limit, final
insertion sort of the ranges of ≤ 16; introselect down to ≤ 3; heap selection), so that
``swudi_jax.methods.sort_order`` (which computes whole partitions at once and follows only
the ranges that hold a cut) is checked against a plain transcription. The benchmark
``benchmarks/mergekit_crosscheck/torch_order.py`` checks both against PyTorch itself.

Entries are [key, index] pairs compared by key with ``<`` (ascending order).
"""

from __future__ import annotations


def _less(a, b) -> bool:
    return a[0] < b[0]


def _median_to_first(a, result, x, y, z):
    if _less(a[x], a[y]):
        pick = y if _less(a[y], a[z]) else (z if _less(a[x], a[z]) else x)
    else:
        pick = x if _less(a[x], a[z]) else (z if _less(a[y], a[z]) else y)
    a[result], a[pick] = a[pick], a[result]


def _partition(a, first, last):
    _median_to_first(a, first, first + 1, first + (last - first) // 2, last - 1)
    pivot, left, right = a[first], first + 1, last
    while True:
        while _less(a[left], pivot):
            left += 1
        right -= 1
        while _less(pivot, a[right]):
            right -= 1
        if not left < right:
            return left
        a[left], a[right] = a[right], a[left]
        left += 1


def _adjust_heap(a, first, hole, length, value):
    top = child = hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if _less(a[first + child], a[first + child - 1]):
            child -= 1
        a[first + hole] = a[first + child]
        hole = child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        a[first + hole] = a[first + child - 1]
        hole = child - 1
    parent = (hole - 1) // 2
    while hole > top and _less(a[first + parent], value):
        a[first + hole] = a[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    a[first + hole] = value


def _make_heap(a, first, last):
    length = last - first
    for parent in range((length - 2) // 2, -1, -1):
        _adjust_heap(a, first, parent, length, a[first + parent])


def _pop_heap(a, first, last, result):
    value = a[result]
    a[result] = a[first]
    _adjust_heap(a, first, 0, last - first, value)


def _heap_select(a, first, middle, last):
    _make_heap(a, first, middle)
    for i in range(middle, last):
        if _less(a[i], a[first]):
            _pop_heap(a, first, middle, i)


def _sort_heap(a, first, last):
    while last - first > 1:
        last -= 1
        _pop_heap(a, first, last, last)


def _insertion_sort(a, first, last):
    for i in range(first + 1, last):
        value, j = a[i], i
        while j > first and _less(value, a[j - 1]):
            a[j] = a[j - 1]
            j -= 1
        a[j] = value


def _introsort(a, first, last, depth):
    while last - first > 16:
        if depth == 0:
            _heap_select(a, first, last, last)
            _sort_heap(a, first, last)
            return
        depth -= 1
        cut = _partition(a, first, last)
        _introsort(a, cut, last, depth)
        last = cut


def std_sort(keys, depth=None) -> list[int]:
    """The indices of ``keys`` in ``std::sort`` order (``depth``: the level budget, default 2⌊log2 n⌋)."""
    a = [[k, i] for i, k in enumerate(keys)]
    n = len(a)
    if n:
        _introsort(a, 0, n, 2 * (n.bit_length() - 1) if depth is None else depth)
        _insertion_sort(a, 0, n)
    return [i for _, i in a]


def std_select(keys, k, depth=None) -> set[int]:
    """The indices a ``topk`` of the k smallest ``keys`` returns (nth_element, or partial_sort
    when k·64 ≤ n)."""
    a = [[key, i] for i, key in enumerate(keys)]
    n = len(a)
    if k <= 0:
        return set()
    if k >= n:
        return set(range(n))
    if k * 64 <= n:
        _heap_select(a, 0, k, n)
        return {i for _, i in a[:k]}
    first, last, nth = 0, n, k - 1
    level = 2 * (n.bit_length() - 1) if depth is None else depth
    while last - first > 3:
        if level == 0:
            _heap_select(a, first, nth + 1, last)
            return {i for _, i in a[:k]}
        level -= 1
        cut = _partition(a, first, last)
        first, last = (cut, last) if cut <= nth else (first, cut)
    _insertion_sort(a, first, last)
    return {i for _, i in a[:k]}


def argsort(values, descending=False) -> list[int]:
    """PyTorch's CPU ``argsort(values, descending)`` of finite values."""
    return std_sort([-v if descending else v for v in values])


def topk(values, k) -> set[int]:
    """PyTorch's CPU ``topk(values, k).indices`` (largest) of finite values, as a set."""
    return std_select([-v for v in values], k)
