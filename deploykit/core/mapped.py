"""Giving back the resident pages of a tensor read from a file mapping, once nothing will read it again.

The weights file is memory-mapped (safetensors): a tensor's pages become resident when first read and
stay resident while any tensor of the file is alive. A quantizer that reads each float weight once to
make its int8 copy would otherwise end up holding every float weight's pages *and* the int8 weights:
more memory than the float model it replaces. No library offers this (safetensors has no per-tensor
release; torch's storages do not know they are file-backed), so it is `madvise(MADV_DONTNEED)` here.

Only a tensor whose resident pages are all pages of a file is given back: the kernel reads them again
from the file if they are ever touched, so nothing can be lost. Anything else (anonymous memory, a page
written to since it was read, another platform than Linux) is left as it is.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

MADV_DONTNEED = 4  # Linux


def release_mapped_pages(tensor) -> int:
    """Give back the resident pages wholly inside `tensor`'s storage when every one of them is a page of
    a file (none written to since it was read); returns the bytes given back (0: left as it is)."""
    if sys.platform != "linux":
        return 0
    storage = tensor.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page  # only pages no other tensor shares
    if last <= first or not _only_file_pages(first, last):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED) != 0:
        return 0
    return last - first


def _only_file_pages(first: int, last: int) -> bool:
    """Whether every resident page in [first, last) is a page of a file and none is swapped out
    (/proc/self/pagemap, 8 bytes a page: bit 63 present, 62 swapped, 61 file page or shared). A page
    written to in safetensors' private, copy-on-write mapping is anonymous: its data exists nowhere else."""
    page = mmap.PAGESIZE
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(first // page * 8)
            entries = memoryview(pagemap.read((last - first) // page * 8)).cast("Q")
    except (OSError, ValueError):
        return False
    if len(entries) != (last - first) // page:
        return False
    return all(not (entry >> 62) & 1 and (not entry >> 63 or (entry >> 61) & 1) for entry in entries)
