"""The folded MeKi table on flash: memory-mapped in place, read one token record at a time.

File layout (the manifest's `llm.table`): one record per token id, token-major, each holding
that token's `[L, d_mem]` rows for every layer (float32/float16), or int8 rows followed by
one float32 scale per row. Readahead would pull in far more than the few records a
generation touches, so the mapping is advised MADV_RANDOM.

Integrity without reading the table: the manifest lists one sha256 per 1 MiB block, and a
block is hashed the first time a record in it is read (one pread of the block, then its
other pages are dropped from the page cache so residency stays what the records need). A
block that does not match is refused by number before any of its rows are used. Start-up
reads nothing of the table, whatever its size.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from edge.llm.spec import BLOCK_BYTES, TableSpec, check_table_size, record_dtype, table_spec
from splitedge.errors import SplitedgeError

__all__ = ["BLOCK_BYTES", "MemoryTable", "block_digests", "mapping_rss", "record_dtype"]


def block_digests(path: Path, block_bytes: int = BLOCK_BYTES) -> list[str]:
    """Hex sha256 of each block_bytes block of a file (the last one may be short)."""
    out = []
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block_bytes), b""):
            out.append(hashlib.sha256(chunk).hexdigest())
    return out


class MemoryTable:
    """Random-access reader of a token-major table stored at `offset` in `path`.

    spec: the manifest's `llm.table` (checked) or its TableSpec. file_sha256: the whole
    table's digest, hashed once at open when the spec has no block digests (old bundles).
    Counts the bytes of records it reads and the blocks it verified.
    """

    def __init__(
        self,
        path: Path,
        spec: TableSpec | dict[str, Any],
        offset: int = 0,
        size: int | None = None,
        file_sha256: str | None = None,
    ):
        self.path = Path(path).resolve()
        self.spec = spec if isinstance(spec, TableSpec) else table_spec(spec, str(self.path))
        self.vocab_size, self.n_layer, self.d_mem = self.spec.shape
        self.dtype = self.spec.dtype
        self.record = record_dtype(self.dtype, self.n_layer, self.d_mem)
        self.offset = offset
        stored = self.path.stat().st_size - offset if size is None else size
        check_table_size(self.spec, stored, str(self.path))
        self._fd = os.open(self.path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):  # block checks pread exactly a block: no readahead
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        self._base = offset - base  # where the table starts inside the mapping
        self._mm = mmap.mmap(
            self._fd, self._base + self.size_bytes, access=mmap.ACCESS_READ, offset=base
        )
        if hasattr(self._mm, "madvise"):  # Linux/BSD/macOS; elsewhere we still read per row
            self._mm.madvise(mmap.MADV_RANDOM)
        # a view: nothing is read yet
        self._records = np.frombuffer(
            self._mm, dtype=self.record, count=self.vocab_size, offset=self._base
        )
        self.bytes_read = 0
        self.rows_read = 0
        self.blocks_verified = 0
        self.bytes_hashed = 0
        self._block = self.spec.block_bytes or self.size_bytes
        self._verified: bytearray | None = None
        if self.spec.block_bytes:
            self._verified = bytearray(len(self.spec.block_sha256))
        elif file_sha256 is not None:
            self._verify_whole(file_sha256)
        # pages already advised WILLNEED: asking again is a wasted syscall per token (a page
        # evicted since then is simply read on demand, as without the advice)
        self._advised = bytearray(-(-(self._base + self.size_bytes) // mmap.PAGESIZE))
        self.advice_calls = 0

    @property
    def size_bytes(self) -> int:
        return self.spec.size_bytes

    @property
    def blocks(self) -> int:
        """Integrity blocks of the table (1 when it has no per-block digests)."""
        return len(self.spec.block_sha256) or 1

    def _verify_whole(self, want: str) -> None:
        h = hashlib.sha256()
        for start in range(0, self.size_bytes, BLOCK_BYTES):
            h.update(
                os.pread(self._fd, min(BLOCK_BYTES, self.size_bytes - start), self.offset + start)
            )
        self.bytes_hashed += self.size_bytes
        if h.hexdigest() != want:
            raise SplitedgeError(
                f"{self.path}: {self.spec.file} does not match its sha256 in the manifest; "
                "the table is corrupt: re-flash or re-copy the bundle"
            )
        self._drop(0, self.size_bytes, [])

    def _check(self, lo: int, hi: int) -> None:
        """Verify the blocks holding table bytes [lo, hi) unless already verified."""
        v = self._verified
        if v is None or (v[lo // self._block] and v[(hi - 1) // self._block]):
            return
        for b in range(lo // self._block, (hi - 1) // self._block + 1):
            if not v[b]:
                self._verify_block(b, [(lo, hi)])

    def _check_many(self, ids: np.ndarray) -> None:
        if self._verified is None:
            return
        R, B = self.record.itemsize, self._block
        starts = ids * R
        blocks = np.unique(np.concatenate([starts // B, (starts + R - 1) // B]))
        for b in blocks.tolist():
            if not self._verified[b]:
                inside = starts[(starts < (b + 1) * B) & (starts + R > b * B)]
                self._verify_block(b, [(int(s), int(s) + R) for s in inside])

    def _verify_block(self, b: int, keep: list[tuple[int, int]]) -> None:
        """Hash block b; keep the pages of the byte ranges about to be read, drop the rest."""
        start = b * self._block
        n = min(self._block, self.size_bytes - start)
        data = os.pread(self._fd, n, self.offset + start)
        self.bytes_hashed += len(data)
        assert self._verified is not None
        if len(data) != n or hashlib.sha256(data).hexdigest() != self.spec.block_sha256[b]:
            raise SplitedgeError(
                f"{self.path}: {self.spec.file} block {b} of {len(self._verified)} (bytes "
                f"{start}-{start + n - 1}) does not match its sha256 in the manifest; the "
                "table on flash is corrupt: re-flash or re-copy the bundle"
            )
        self._verified[b] = 1
        self.blocks_verified += 1
        self._drop(start, start + n, keep)

    def _drop(self, lo: int, hi: int, keep: list[tuple[int, int]]) -> None:
        """Evict table bytes [lo, hi) from the page cache except the pages of `keep` ranges."""
        if not hasattr(os, "posix_fadvise"):
            return
        page = mmap.PAGESIZE
        cuts = sorted(
            ((self.offset + a) // page * page, -(-(self.offset + z) // page) * page)
            for a, z in keep
        )
        pos = self.offset + lo
        for a, z in [*cuts, (self.offset + hi, self.offset + hi)]:
            if a > pos:
                os.posix_fadvise(
                    self._fd, pos, min(a, self.offset + hi) - pos, os.POSIX_FADV_DONTNEED
                )
            pos = max(pos, z)

    def prefetch(self, token: int) -> None:
        """Ask the kernel to start reading a token's record now (async; harmless if cached)."""
        if not hasattr(mmap, "MADV_WILLNEED"):
            return
        start = self._base + token * self.record.itemsize
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
        self._check_many(ids)
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
        R = self.record.itemsize
        self._check(token * R, token * R + R)
        rec = self._records[token]  # one contiguous read
        assert out.flags.c_contiguous, "rows_into needs a contiguous buffer"
        dest = out.reshape(self.n_layer, self.d_mem)  # a view of out
        if self.dtype == "int8":
            np.multiply(rec["q"], rec["scale"][:, None], out=dest)
        else:
            dest[...] = rec
        self.bytes_read += R
        self.rows_read += self.n_layer

    def drop_cache(self) -> bool:
        """Evict the table's clean pages from the page cache (a cold-flash start); False if unsupported."""
        if not hasattr(os, "posix_fadvise"):
            return False
        os.fsync(self._fd)  # dirty pages (a table just written) cannot be evicted
        os.posix_fadvise(self._fd, self.offset, self.size_bytes, os.POSIX_FADV_DONTNEED)
        self._advised[:] = bytes(len(self._advised))  # evicted: advise again on next use
        return True

    def resident_bytes(self) -> int | None:
        """Bytes of this file's mapping resident in this process (Rss in /proc/self/smaps)."""
        return mapping_rss(self.path)

    def close(self) -> None:
        del self._records
        self._mm.close()
        os.close(self._fd)


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
