"""Keep freed memory in the process (glibc malloc), so a training step's large tensors reuse pages.

By default glibc serves every allocation above 128 KiB-32 MiB (its adaptive mmap threshold) with a fresh
``mmap`` and hands it back on ``free``; the next step's tensor of the same size then pays a page fault per
4 KiB page on first touch, and on the CPU the elementwise ops of a scoring pass run at the speed of those
faults. Raising the mmap threshold and the trim threshold keeps that memory in the heap, as jemalloc or tcmalloc
(the usual ``LD_PRELOAD`` advice for PyTorch on CPUs) would, with nothing to install
(``tests/test_allocator.py`` checks that freed tensors' pages are reused without faults). The cost: freed memory stays resident for reuse (glibc only ever trims the heap's
top, beyond ``TRIM_THRESHOLD``), so the resident set stays near the process's high-water mark.

``keep_freed_memory()`` is called by ``src/train.py`` and ``src/eval.py`` (``keep_freed_memory: false`` in the
config turns it off) and by ``benchmarks/throughput.py``; elsewhere (musl, macOS, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 256 << 20  # allocations below 256 MiB come from the heap and are reused
MMAP_THRESHOLD_OLD_GLIBC = 32 << 20  # the most glibc releases before 2.35 or so accept (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top goes back to the OS beyond 1 GiB


def keep_freed_memory() -> bool:
    """Apply the setting; True where glibc took both parts."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) or mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_OLD_GLIBC))
    trim_ok = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return mmap_ok and trim_ok
