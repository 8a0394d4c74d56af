"""The folded MeKi table on flash: memory-mapped, advised random, read one token record at a time.

File layout (see the bundle manifest's `llm.table`): one record per token id, token-major,
each record holding that token's `[L, d_mem]` rows for every layer (float32/float16), or
int8 rows followed by one float32 scale per row. Readahead would pull in far more than
the few records a generation touches, so the mapping is advised MADV_RANDOM.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from splitedge.errors import SplitedgeError


def record_dtype(dtype: str, n_layer: int, d_mem: int) -> np.dtype:
    """numpy dtype of one token's record (little-endian, packed)."""
    if dtype == "int8":
        return np.dtype([("q", "i1", (n_layer, d_mem)), ("scale", "<f4", (n_layer,))])
    if dtype in ("float32", "float16"):
        return np.dtype((np.dtype(dtype).newbyteorder("<"), (n_layer, d_mem)))
    raise SplitedgeError(f"unknown table dtype {dtype!r}; re-fold with `splitedge llm fold`")


class MemoryTable:
    """Random-access reader of a token-major table file; counts the bytes it reads."""

    def __init__(self, path: Path, spec: dict[str, Any]):
        self.path = Path(path).resolve()
        self.vocab_size, self.n_layer, self.d_mem = (int(n) for n in spec["shape"])
        self.dtype = str(spec["dtype"])
        self.record = record_dtype(self.dtype, self.n_layer, self.d_mem)
        if self.record.itemsize != int(spec.get("record_bytes", self.record.itemsize)):
            raise SplitedgeError(
                f"{self.path}: record size in the manifest does not match "
                f"{self.dtype} {spec['shape']}; re-fold the bundle"
            )
        size = self.path.stat().st_size
        if size != self.vocab_size * self.record.itemsize:
            raise SplitedgeError(
                f"{self.path} is {size} bytes, expected "
                f"{self.vocab_size * self.record.itemsize}; re-copy the bundle"
            )
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(self._mm, "madvise"):  # Linux/BSD/macOS; elsewhere we still read per row
            self._mm.madvise(mmap.MADV_RANDOM)
        self._records = np.frombuffer(self._mm, dtype=self.record)  # a view: nothing is read yet
        self.bytes_read = 0
        self.rows_read = 0
        # pages already advised WILLNEED: asking again is a wasted syscall per token (a page
        # evicted since then is simply read on demand, as without the advice)
        self._advised = bytearray(-(-size // mmap.PAGESIZE))
        self.advice_calls = 0

    @property
    def size_bytes(self) -> int:
        return self.vocab_size * self.record.itemsize

    def prefetch(self, token: int) -> None:
        """Ask the kernel to start reading a token's record now (async; harmless if cached)."""
        if not hasattr(mmap, "MADV_WILLNEED"):
            return
        start = token * self.record.itemsize
        first, last = start // mmap.PAGESIZE, (start + self.record.itemsize - 1) // mmap.PAGESIZE
        if all(self._advised[first : last + 1]):
            return
        page = first * mmap.PAGESIZE
        self._mm.madvise(mmap.MADV_WILLNEED, page, start + self.record.itemsize - page)
        self._advised[first : last + 1] = b"\x01" * (last + 1 - first)
        self.advice_calls += 1

    def rows(self, tokens: np.ndarray) -> np.ndarray:
        """float32 rows (L, T, d_mem) for token ids (T,): layer-major so each layer's slice is contiguous."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size})")
        if ids.size == 1 and self.dtype != "int8":  # the decode step: one record, no transpose
            self.bytes_read += self.record.itemsize
            self.rows_read += self.n_layer
            return self._records[int(ids[0])].astype(np.float32)[:, None, :]  # (L, 1, d_mem)
        recs = self._records[ids]  # one contiguous read per token
        self.bytes_read += ids.size * self.record.itemsize
        self.rows_read += ids.size * self.n_layer
        if self.dtype == "int8":
            values = recs["q"].astype(np.float32) * recs["scale"][..., None]  # (T, L, d_mem)
        else:
            values = recs.astype(np.float32, copy=False)
        return np.ascontiguousarray(values.transpose(1, 0, 2))

    def rows_into(self, token: int, out: np.ndarray) -> None:
        """Write one token's rows as float32 into `out` (any contiguous shape of L * d_mem values)."""
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token id {token} out of range [0, {self.vocab_size})")
        rec = self._records[token]  # one contiguous read
        assert out.flags.c_contiguous, "rows_into needs a contiguous buffer"
        dest = out.reshape(self.n_layer, self.d_mem)  # a view of out
        if self.dtype == "int8":
            np.multiply(rec["q"], rec["scale"][:, None], out=dest)
        else:
            dest[...] = rec
        self.bytes_read += self.record.itemsize
        self.rows_read += self.n_layer

    def drop_cache(self) -> bool:
        """Evict the file's clean pages from the page cache (a cold-flash start); False if unsupported."""
        if not hasattr(os, "posix_fadvise"):
            return False
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages (a table just written) cannot be evicted
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        self._advised[:] = bytes(len(self._advised))  # evicted: advise again on next use
        return True

    def resident_bytes(self) -> int | None:
        """Bytes of this file's mapping resident in this process (Rss in /proc/self/smaps)."""
        return mapping_rss(self.path)

    def close(self) -> None:
        del self._records
        self._mm.close()


def mapping_rss(path: Path) -> int | None:
    """Sum of Rss over this process's mappings of `path`; None where /proc is unavailable."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    target, inside, total = str(Path(path).resolve()), False, 0
    for line in lines:
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
            inside = len(fields) >= 6 and " ".join(fields[5:]) == target  # a mapping header line
        elif inside and fields and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total
