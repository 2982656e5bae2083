"""Page encoding and tier containers behind :mod:`memkit.kvstore` (split out to keep files small).

* :class:`PageCodec` — (n, *page_shape) float pages <-> (n, page_bytes) uint8 buffers in fp32, fp16,
  bf16 or int8 with a per-page or per-channel scale (error bounds in the kvstore docstring).
* ``MemTier`` / ``DiskTier`` — LRU-ordered containers with a byte budget; the disk tier keeps pages in
  fixed-size slots of segment files read with ``pread`` (InfLLM-style offloading, Xiao et al. 2024, plus disk):
  spilled pages never count in the process's resident memory. Its private directory is made and cleaned up by
  :mod:`memkit.spill` (removed on close and at exit; leftovers of killed processes removed at the next start).
"""

from __future__ import annotations

import math
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memkit.errors import ConfigError, CorruptFileError
from memkit.spill import make_spill_dir, remove_spill_dir, segment_name, sweep

__all__ = ["PageCodec", "MemTier", "DiskTier", "Entry", "read_meta", "FORMAT", "FORMAT_VERSION", "META_FILE"]

FORMAT, FORMAT_VERSION = "memkit-kvstore", 2  # 2: sealed kvstore.json
META_FILE = "kvstore.json"
SEGMENT_BYTES = 64 << 20  # disk-tier spill file size
STORAGE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
_ALIGN = 16


class PageCodec:
    """Encodes (n, *page_shape) float pages to (n, page_bytes) uint8 buffers and back.

    Buffer layout: the data in the storage dtype, zero-padded to 16 bytes, then (int8 only) float32
    scales: one per page, or one per channel = per (..., D) reduced over the token axis (-2).
    """

    def __init__(self, page_shape: tuple[int, ...], dtype: str = "fp16", int8_scale: str = "channel") -> None:
        if dtype not in STORAGE:
            raise ConfigError(f"storage dtype {dtype!r} is not valid; choose one of {list(STORAGE)}")
        self.page_shape, self.dtype, self.int8_scale = tuple(int(s) for s in page_shape), dtype, int8_scale
        self.storage = STORAGE[dtype]
        self.numel = math.prod(self.page_shape)
        self.data_bytes = self.numel * self.storage.itemsize
        self.data_padded = -(-self.data_bytes // _ALIGN) * _ALIGN
        if dtype != "int8":
            self.scale_shape: tuple[int, ...] = ()
        elif int8_scale == "channel" and len(self.page_shape) >= 2:
            self.scale_shape = (*self.page_shape[:-2], 1, self.page_shape[-1])  # (L, 2, H, 1, D)
        else:
            self.scale_shape = (1,) * len(self.page_shape)
        self.scale_bytes = 4 * math.prod(self.scale_shape) if self.scale_shape else 0
        self.page_bytes = self.data_padded + -(-self.scale_bytes // _ALIGN) * _ALIGN

    def encode(self, pages: torch.Tensor) -> torch.Tensor:
        """(n, *page_shape) float -> (n, page_bytes) uint8 on the same device."""
        n = pages.shape[0]
        out = torch.zeros((n, self.page_bytes), dtype=torch.uint8, device=pages.device)
        if self.dtype == "int8":
            x = pages.float()
            dims = tuple(range(1, x.ndim))
            if self.int8_scale == "channel" and len(self.page_shape) >= 2:
                amax = x.abs().amax(dim=-2, keepdim=True)  # (n, L, 2, H, 1, D)
            else:
                amax = x.abs().amax(dim=dims, keepdim=True)  # (n, 1, 1, 1, 1, 1)
            scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
            data = torch.round(x / scale).clamp_(-127, 127).to(torch.int8)
            out[:, self.data_padded : self.data_padded + self.scale_bytes] = scale.reshape(n, -1).view(torch.uint8)
        else:
            data = pages.to(self.storage)
        out[:, : self.data_bytes] = data.reshape(n, -1).contiguous().view(torch.uint8)
        return out

    def decode(self, buf: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(n, page_bytes) uint8 -> (n, *page_shape) in ``dtype`` on the same device."""
        n = buf.shape[0]
        data = buf[:, : self.data_bytes].view(self.storage).reshape(n, *self.page_shape)
        if self.dtype != "int8":
            return data.to(dtype)
        scale = buf[:, self.data_padded : self.data_padded + self.scale_bytes].view(torch.float32)
        return (data.float() * scale.reshape(n, *self.scale_shape)).to(dtype)


@dataclass
class Entry:
    buf: torch.Tensor  # (page_bytes,) uint8 on this tier's memory
    event: Any = None  # CUDA event of the copy that fills `buf`, or None when ready


class MemTier:
    def __init__(self, name: str, budget: int, page_bytes: int) -> None:
        self.name, self.budget, self.page_bytes = name, int(budget), page_bytes
        self.slots = self.budget // page_bytes
        self.entries: OrderedDict[int, Any] = OrderedDict()  # LRU first
        self.peak = 0
        self.hits = self.misses = 0

    @property
    def resident(self) -> int:
        return len(self.entries) * self.page_bytes

    @property
    def free(self) -> int:
        return self.slots - len(self.entries)

    def added(self) -> None:
        assert self.resident <= self.budget, f"{self.name} tier over budget"  # invariant, never user-facing
        self.peak = max(self.peak, self.resident)


class DiskTier(MemTier):
    """Pages in fixed-size slots of segment files, read and written with ``pread``/``pwrite``; entries map id -> slot.

    Plain file I/O, not memory maps: the page cache holds recently used pages for speed, but none of them counts
    in the process's resident memory, so RSS stays flat however many pages spill to disk (a memory-mapped tier
    grew RSS with every page written or read, toward the size of the files).
    """

    def __init__(self, root: Path | None, budget: int, page_bytes: int) -> None:
        super().__init__("disk", budget if root else 0, page_bytes)
        self.root = root
        if root is not None:
            sweep(root)  # spill directories of killed processes (memkit.spill): removed at the next start
        self.dir: str | None = None  # created on the first spilled page
        self.seg_slots = max(1, min(self.slots, SEGMENT_BYTES // page_bytes))
        self.fds: list[int] = []  # one open segment file per SEGMENT_BYTES of slots
        self.free_slots: list[int] = []
        self.allocated = 0
        self._finalizer: Any = None

    def _alloc(self) -> int:
        if not self.free_slots:
            if self.dir is None:
                assert self.root is not None
                self.dir = make_spill_dir(self.root)
                # closes the files and removes the directory on close(), garbage collection or interpreter exit
                self._finalizer = weakref.finalize(self, _close_segments, self.fds, self.dir)
            k = min(self.seg_slots, self.slots - self.allocated)
            path = os.path.join(str(self.dir), segment_name(len(self.fds)))
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(fd, k * self.page_bytes)  # sparse until written
            self.fds.append(fd)
            self.free_slots = list(range(self.allocated + k - 1, self.allocated - 1, -1))
            self.allocated += k
        return self.free_slots.pop()

    def _locate(self, slot: int) -> tuple[int, int]:
        """(file descriptor, byte offset) of ``slot``."""
        return self.fds[min(slot // self.seg_slots, len(self.fds) - 1)], (slot % self.seg_slots) * self.page_bytes

    def write(self, page_id: int, data: np.ndarray) -> None:
        slot = self._alloc()
        fd, offset = self._locate(slot)
        view = np.ascontiguousarray(data, dtype=np.uint8).data.cast("B")  # (page_bytes,)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
        self.entries[page_id] = slot

    def read_into(self, page_id: int, out: torch.Tensor) -> None:
        """Read one page into ``out`` (page_bytes,) uint8 CPU tensor."""
        fd, offset = self._locate(self.entries[page_id])
        view = out.numpy().data.cast("B")
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise CorruptFileError(f"a K/V page file in {self.dir} is shorter than its pages (disk full or "
                                       "removed while in use)")
            done += got

    def pop(self, page_id: int) -> None:
        self.free_slots.append(self.entries.pop(page_id))

    def close(self) -> None:
        self.free_slots, self.allocated = [], 0
        self.entries.clear()
        if self._finalizer is not None:
            self._finalizer()  # closes the files and removes the directory, once
            self._finalizer = None
        self.fds = []
        self.dir = None

    @property
    def file_bytes(self) -> int:
        return self.allocated * self.page_bytes


def _close_segments(fds: list[int], directory: str) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()
    remove_spill_dir(directory)


def read_meta(directory: Path) -> dict[str, Any]:
    from memkit.files import read_versioned_json, verify_files

    mpath = directory / META_FILE
    meta = read_versioned_json(directory, META_FILE, fmt=FORMAT, version=FORMAT_VERSION,
                               what="memkit K/V store index", writer="KVStore.save()")
    ok = (isinstance(meta.get("page_shape"), list) and all(isinstance(s, int) and s > 0 for s in meta["page_shape"])
          and meta.get("dtype") in STORAGE and meta.get("int8_scale", "channel") in ("page", "channel")
          and isinstance(meta.get("count"), int) and isinstance(meta.get("page_bytes"), int)
          and isinstance(meta.get("shards"), list) and isinstance(meta.get("files"), dict)
          and all(isinstance(s, dict) and isinstance(s.get("file"), str) for s in meta["shards"]))
    if not ok:
        raise CorruptFileError(f"{mpath} has missing or mistyped fields; the save is corrupted")
    verify_files(directory, meta["files"], mpath, skip=(META_FILE,))
    if {s["file"] for s in meta["shards"]} - set(meta["files"]):
        raise CorruptFileError(f"{mpath} lists a shard without a checksum; the save is corrupted")
    return meta
