"""glibc's malloc, set for services that allocate and free large buffers per message.

A message's body, the gRPC request that carries it and the NATS publish
that stores it are each a buffer of up to about a megabyte, made and freed
for every message. With glibc's defaults a block over 128 KiB is mapped
afresh and a free that leaves more than 128 KiB at the top of the heap gives
it back to the kernel, so the next message's buffers fault their pages in
again, zeroed: serialising a gRPC request of three 100 KB messages took
about 52 page faults per message and 440 µs, against none and 21 µs with
the memory kept (bench/results/2026-12-06-malloc-thresholds.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt's parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Blocks up to this size come from the heap: every body kept inline
# (INLINE_BODY_LIMIT, 900 KiB) and the requests that carry them.
MMAP_THRESHOLD = 1 << 20
# Free memory kept at the top of the heap before any is given back: a few
# messages' worth per process, the price of not faulting it in again.
TRIM_THRESHOLD = 8 << 20


def keep_freed_memory() -> None:
    """Set MMAP_THRESHOLD and TRIM_THRESHOLD where the C library has mallopt
    (glibc); another keeps its own defaults."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
