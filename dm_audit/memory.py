"""Hand memory the process no longer uses back to the operating system.

Freed memory is not always returned: Arrow's allocator keeps the pages of every Parquet read for
reuse, and glibc's malloc keeps freed blocks of its heaps (the many mid-sized tensors of a
training run). Both count towards the process's resident memory until the allocator is asked
to let go. An audit of 200k rows of 128 features held about 370 MB more after its scoring stage
and 670 MB more after its flags than once both were asked.

`release_unused_memory` asks both: it is called where a large transient ends (a data source
loaded, a training run, a full pass over streamed embeddings, the scoring and flag stages). It
only releases what nothing references, so results are unchanged.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable

__all__ = ["release_unused_memory"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_unused_memory() -> None:
    """Return Arrow's cached pages and malloc's free heap memory to the operating system.

    Arrow is only asked when it is already imported (this never imports it). Cheap: a few
    milliseconds on a process of several gigabytes.
    """
    pyarrow = sys.modules.get("pyarrow")
    if pyarrow is not None:
        pyarrow.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
