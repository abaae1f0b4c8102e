"""Giving back the resident pages of a tensor read from a file mapping, once nothing will read it again.

The weights file is memory-mapped (safetensors): a tensor's pages become resident when first read and
stay resident while any tensor of the file is alive. A quantizer that reads each float weight once to
make its int8 copy would otherwise end up holding every float weight's pages *and* the int8 weights:
more memory than the float model it replaces. No library offers this (safetensors has no per-tensor
release; torch's storages do not know they are file-backed), so it is `madvise(MADV_DONTNEED)` here.

Only pages of a file-backed mapping none of whose pages was ever written are given back: the kernel
reads them again from the file if they are ever touched, so nothing can be lost. Anything else
(anonymous memory, a mapping with a written page, another platform than Linux) is left as it is.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from pathlib import Path

MADV_DONTNEED = 4  # Linux


def release_mapped_pages(tensor) -> int:
    """Give back the resident pages wholly inside `tensor`'s storage when that storage lies in one
    file mapping no page of which was ever written; returns the bytes given back (0: left as it is)."""
    if sys.platform != "linux":
        return 0
    storage = tensor.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page  # only pages no other tensor shares
    if last <= first or not _in_clean_file_mapping(start, end):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED) != 0:
        return 0
    return last - first


def _in_clean_file_mapping(start: int, end: int) -> bool:
    """Whether [start, end) lies in one mapping of /proc/self/smaps that is backed by a file and has no
    page anyone wrote to (no anonymous page: safetensors maps the file private and writable, copy on
    write, so a written page would be the only copy of its data)."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return False
    inside = False
    for line in lines:
        fields = line.split(maxsplit=5)
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line: range, perms, offset, device, inode, path
            if inside:
                return False  # its Anonymous line never came
            low, high = (int(x, 16) for x in fields[0].split("-"))
            inside = low <= start and end <= high and len(fields) == 6 and fields[5].startswith("/")
        elif inside and fields[0] == "Anonymous:":
            return fields[1] == "0"
    return False
