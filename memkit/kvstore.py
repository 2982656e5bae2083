"""Tiered K/V page store: device <-> host <-> disk, each tier with a byte budget, pages moved by LRU.

A *page* is one chunk of K/V for the stored layers, shape ``page_shape = (L, 2, H_kv, C, D)``
[layers, key/value, kv heads, chunk tokens, head dim]. Pages are stored encoded (``fp32``, ``fp16``,
``bf16`` or ``int8`` with a per-page or per-channel scale) as one flat byte buffer each, so every tier
(and every copy between tiers) moves the compressed bytes; ``get`` decodes on the compute device.

Tiers are exclusive (a page lives in exactly one) and ordered device > host > disk:

* ``device`` — the compute device (``KVStoreConfig.device``). On CPU it is ordinary memory with its own
  budget, so the same paging code runs (and is tested) without a GPU.
* ``host`` — CPU memory, pinned when the device is CUDA so copies are asynchronous.
* ``disk`` — fixed-size page files (read with ``pread``, never mapped) in a private subdirectory of ``disk_dir`` (optional).

New pages enter the device tier as most recently used; when a tier is full its least recently used
page moves one tier down. ``get``/``prefetch`` move the requested pages up to the device tier (those
that fit; the rest are served without being cached). No tier's resident bytes ever exceed its budget;
when all tiers are full ``put`` raises :class:`CapacityError` and stores nothing. This is the block
cache of InfLLM (Xiao et al. 2024, "InfLLM: Training-Free Long-Context Extrapolation for LLMs with an
Efficient Context Memory": CPU-offloaded blocks, a GPU cache with LRU) extended with a disk tier, and
the storage behind MemLong's chunk memory (Liu et al. 2024, "MemLong: Memory-Augmented Retrieval for
Long Text Modeling").

On CUDA, host<->device copies run on a side stream and record an event per batch; the compute stream
waits only on the events of the pages a ``get`` returns, so a ``prefetch`` of the next block's pages
overlaps the current block's compute.

Storage error against fp32, measured on K/V-like data (N(0,1) with 4 outlier channels of scale 20,
pages (2, 2, 4, 32, 16)), as ``max|x - x'| / max|x|`` per page -> the bound tested in
``tests/test_kvstore.py``:

=========  ==================  =========================================================
dtype      measured (max)      bound tested (why)
=========  ==================  =========================================================
fp32       0                   exact
fp16       4.5e-4              4.9e-4 = 2**-11: fp16 rounds to 11 significant bits
bf16       3.7e-3              3.9e-3 = 2**-8: bf16 keeps 8 significant bits
int8/page  3.94e-3             1/254 of the page max: half a step of amax/127. But a
                               channel's own error can reach 0.30 of its max (outliers
                               set the step for every channel)
int8/chan  3.94e-3 of each     1/254 of each channel's max over the chunk's tokens
           channel's max       (mean abs error 5.7x lower than per page on this data)
=========  ==================  =========================================================

Page bytes for that shape: fp32 32768, fp16/bf16 16384, int8/page 8208, int8/channel 9216.
On real SmolLM2-135M K/V (k_proj/v_proj of layers 15-29, 128-token chunks; ``memkit bench kv``) the same
measure gives fp16 4.0e-4, bf16 3.1e-3, int8/channel 3.94e-3.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memkit._arrays import as_ids
from memkit.config import KVStoreConfig
from memkit.errors import CapacityError, ConfigError, CorruptFileError, IncompatibleMemoryError, InvalidInputError
from memkit.files import atomic_save, file_digests, save_path, write_json
from memkit.pages import FORMAT, FORMAT_VERSION, META_FILE, DiskTier, Entry, MemTier, PageCodec, read_meta

__all__ = ["KVStore", "PageCodec", "TIERS"]

TIERS = ("device", "host", "disk")


def _owns_storage(buf: torch.Tensor) -> bool:
    """True when ``buf`` is contiguous and is its whole storage (not a view that keeps a larger tensor alive)."""
    return buf.is_contiguous() and buf.untyped_storage().nbytes() == buf.numel() * buf.element_size()
SHARD_BYTES = 512 << 20  # safetensors shard size on save


class KVStore:
    """Tiered, thread-safe store of fixed-shape K/V pages keyed by int64 ids (see module docstring)."""

    def __init__(self, config: KVStoreConfig | None = None, *, page_shape: tuple[int, ...],
                 device: str | torch.device | None = None) -> None:
        self.config = config if config is not None else KVStoreConfig()
        if not isinstance(self.config, KVStoreConfig):
            raise ConfigError(f"KVStore needs a KVStoreConfig, got {type(self.config).__name__}")
        if not page_shape or not all(isinstance(s, (int, np.integer)) and s > 0 for s in page_shape):
            raise ConfigError(f"page_shape must be positive ints like (L, 2, H, C, D), got {page_shape!r}")
        self.device = torch.device(device if device is not None else (self.config.device or "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"KVStore device {self.device} needs CUDA, which is not available; use device='cpu'")
        self._cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self.codec = PageCodec(tuple(page_shape), self.config.dtype, self.config.int8_scale)
        self.page_shape, self.page_bytes = self.codec.page_shape, self.codec.page_bytes
        self._lock = threading.RLock()
        self._init_tiers()
        if self.capacity_pages == 0:
            cfg = self.config
            raise ConfigError(f"the K/V store's budgets hold no page of {self.page_bytes:,} bytes (device_bytes="
                              f"{cfg.device_bytes:,}, host_bytes={cfg.host_bytes:,}, disk: "
                              f"{cfg.disk_bytes:,} bytes in {cfg.disk_dir!r}); give host_bytes of at least one page, "
                              "e.g. '1GB', or a disk_dir")

    def _init_tiers(self) -> None:
        cfg, pb = self.config, self.page_bytes
        self._tiers: list[MemTier] = [MemTier("device", cfg.device_bytes, pb), MemTier("host", cfg.host_bytes, pb),
                                       DiskTier(cfg.disk_path(), cfg.disk_bytes, pb)]
        self._where: dict[int, int] = {}  # id -> tier index
        self._moved = {"host_to_device": 0, "device_to_host": 0, "host_to_disk": 0, "disk_to_host": 0,
                       "device_to_disk": 0, "input": 0, "output": 0}
        self._gets = 0

    @property
    def capacity_pages(self) -> int:
        return sum(t.slots for t in self._tiers)

    # ------------------------------------------------------------------ CUDA plumbing
    def _side(self) -> Any:
        return torch.cuda.stream(self._copy_stream) if self._cuda else contextlib.nullcontext()

    def _event(self) -> Any:
        if not self._cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(self._copy_stream)
        return ev

    def _wait_compute(self, entry: Entry) -> None:
        """Make the compute stream wait for the copy that fills a device-tier entry."""
        if self._cuda:
            if entry.event is not None:
                torch.cuda.current_stream(self.device).wait_event(entry.event)
                entry.event = None
            entry.buf.record_stream(torch.cuda.current_stream(self.device))

    def _to_host(self, buf: torch.Tensor) -> Entry:
        if buf.device.type != "cuda":
            if self._cuda and not buf.is_pinned():  # pinned so later host->device copies are asynchronous
                return Entry(torch.empty(buf.shape, dtype=torch.uint8, pin_memory=True).copy_(buf))
            return Entry(buf if _owns_storage(buf) else buf.clone())
        host = torch.empty(buf.shape, dtype=torch.uint8, pin_memory=True)
        stream = self._copy_stream
        assert stream is not None  # CUDA buffers exist only where a copy stream was made
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with self._side():
            host.copy_(buf, non_blocking=True)
        buf.record_stream(stream)  # type: ignore[arg-type]
        return Entry(host, self._event())

    def _host_numpy(self, entry: Entry) -> np.ndarray:
        if entry.event is not None:
            entry.event.synchronize()
            entry.event = None
        return entry.buf.numpy()

    def _staging(self) -> torch.Tensor:
        return torch.empty(self.page_bytes, dtype=torch.uint8, pin_memory=self._cuda)

    # ------------------------------------------------------------------ tier moves (lock held)
    def _place(self, t: int, page_id: int, entry: Entry, src: str) -> None:
        """Put an entry into tier ``t``, which must have a free slot."""
        tier = self._tiers[t]
        if t == 0:
            if entry.buf.device != self.device:
                with self._side():
                    dev = torch.empty(self.page_bytes, dtype=torch.uint8, device=self.device)
                    dev.copy_(entry.buf, non_blocking=self._cuda)
                entry = Entry(dev, self._event())
            elif not _owns_storage(entry.buf):
                entry = Entry(entry.buf.clone(), entry.event)
            tier.entries[page_id] = entry
        elif t == 1:
            tier.entries[page_id] = self._to_host(entry.buf)
        else:
            data = self._host_numpy(entry) if entry.buf.device.type == "cpu" else entry.buf.cpu().numpy()
            tier.write(page_id, data)  # type: ignore[attr-defined]
        tier.added()
        self._where[page_id] = t
        if src != "input":
            self._moved[f"{src}_to_{TIERS[t]}"] += self.page_bytes

    def _take(self, page_id: int) -> Entry:
        """Remove a page from its tier and return its bytes (a disk page is read into host memory)."""
        t = self._where.pop(page_id)
        if t < 2:
            return self._tiers[t].entries.pop(page_id)
        disk: DiskTier = self._tiers[2]  # type: ignore[assignment]
        buf = self._staging()
        disk.read_into(page_id, buf)
        disk.pop(page_id)
        return Entry(buf)

    def _make_room(self, t: int, protect: set[int] | frozenset[int] = frozenset()) -> bool:
        """Free one slot in tier ``t`` by moving its LRU page (unprotected first) one tier down."""
        tier = self._tiers[t]
        if tier.free > 0:
            return True
        below = next((u for u in range(t + 1, 3) if self._tiers[u].slots > 0), None)
        if below is None or not tier.entries:
            return False
        victim = next((i for i in tier.entries if i not in protect), next(iter(tier.entries)))
        if not self._make_room(below, protect):
            return False
        entry = self._take(victim)
        self._place(below, victim, entry, TIERS[t])
        return True

    def _insert(self, page_id: int, entry: Entry, src: str, protect: set[int] | frozenset[int] = frozenset(),
                top: int = 0) -> int:
        for t in range(top, 3):
            if self._tiers[t].slots > 0 and self._make_room(t, protect):
                self._place(t, page_id, entry, src)
                return t
        raise CapacityError("internal: no tier has room")  # pragma: no cover - capacity is checked first

    # ------------------------------------------------------------------ public API
    def put(self, ids: Any, pages: Any) -> None:
        """Store pages ``(n, *page_shape)`` (any float dtype/device) under ``ids``; an existing id is replaced."""
        arr = as_ids(ids)
        if not torch.is_tensor(pages):
            try:
                pages = torch.as_tensor(np.asarray(pages))
            except Exception as exc:
                raise InvalidInputError(f"pages must be a torch tensor or numpy array ({exc})") from exc
        if tuple(pages.shape) != (len(arr), *self.page_shape):
            raise InvalidInputError(
                f"pages have shape {tuple(pages.shape)}, expected {(len(arr), *self.page_shape)} "
                f"(n, *page_shape) for {len(arr)} ids"
            )
        if not pages.is_floating_point():
            raise InvalidInputError(f"pages must be floating point, got {pages.dtype}; convert with .float()")
        if len(arr) and not bool(torch.isfinite(pages).all()):
            raise InvalidInputError("pages contain NaN or inf; K/V must be finite (check the model's dtype)")
        enc = self.codec.encode(pages.detach())  # (n, page_bytes)
        with self._lock:
            new = sum(1 for i in arr.tolist() if i not in self._where)
            if len(self._where) + new > self.capacity_pages:
                raise CapacityError(self._full_message(new))
            for j, pid in enumerate(arr.tolist()):
                if pid in self._where:
                    self._take(pid)
                self._insert(pid, Entry(enc[j]), "input")
            self._moved["input"] += len(arr) * self.page_bytes

    def _full_message(self, new: int) -> str:
        parts = ", ".join(f"{t.name} {t.budget} B = {t.slots} pages" for t in self._tiers)
        disk = "raise KVStoreConfig.disk_bytes" if self.config.disk_dir else "set KVStoreConfig.disk_dir to spill to disk"
        return (f"K/V store is full: {len(self._where)} pages of {self.page_bytes} B stored, {new} more asked, budgets "
                f"hold {self.capacity_pages} ({parts}). Raise KVStoreConfig.host_bytes or device_bytes, {disk}, "
                "or set MemoryConfig.capacity_tokens so the policy evicts old chunks")

    def _check_known(self, arr: np.ndarray) -> None:
        missing = [i for i in arr.tolist() if i not in self._where]
        if missing:
            raise InvalidInputError(f"page ids {missing[:5]} are not in the K/V store; check `id in store` first")

    def _fetch(self, uniq: list[int], protect: set[int]) -> dict[int, Entry]:
        """Copy pages not on the device tier to the device; promote those that fit. Returns id -> entry."""
        dev = self._tiers[0]
        room = dev.slots - sum(1 for i in protect if self._where.get(i) == 0)
        out: dict[int, Entry] = {}
        for pid in uniq:
            t = self._where[pid]
            if t == 0:
                continue
            if t == 1:
                src = self._tiers[1].entries[pid]
            else:
                buf = self._staging()
                self._tiers[2].read_into(pid, buf)  # type: ignore[attr-defined]
                src = Entry(buf)
                self._moved["disk_to_host"] += self.page_bytes
            with self._side():
                buf_dev = torch.empty(self.page_bytes, dtype=torch.uint8, device=self.device)
                buf_dev.copy_(src.buf, non_blocking=self._cuda)
            out[pid] = Entry(buf_dev)
            self._moved["host_to_device"] += self.page_bytes
            if room > 0:  # promote: the page now lives on the device tier
                room -= 1
                if t == 2:
                    self._tiers[2].pop(pid)  # type: ignore[attr-defined]
                    del self._where[pid]
                else:
                    self._take(pid)
                self._make_room(0, protect)
                dev.entries[pid] = out[pid]
                dev.added()
                self._where[pid] = 0
            else:
                self._tiers[t].entries.move_to_end(pid)
        ev = self._event()
        for e in out.values():
            e.event = ev
        return out

    def get(self, ids: Any, device: str | torch.device | None = None, *, dtype: torch.dtype = torch.float32
            ) -> torch.Tensor:
        """Pages for ``ids`` (repeats allowed) stacked in the order asked: (n, *page_shape) in ``dtype``."""
        arr = np.asarray(ids.cpu() if torch.is_tensor(ids) else ids).reshape(-1)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise InvalidInputError(f"ids must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64)
        target = torch.device(device) if device is not None else self.device
        if not arr.size:
            return torch.empty((0, *self.page_shape), dtype=dtype, device=target)
        with self._lock:
            self._check_known(arr)
            uniq = list(dict.fromkeys(arr.tolist()))
            self._gets += 1
            for pid in uniq:  # hit/miss accounting before anything moves
                t = self._where[pid]
                for upper in self._tiers[:t]:
                    upper.misses += 1
                self._tiers[t].hits += 1
            fetched = self._fetch(uniq, set(uniq))
            rows = []
            for pid in uniq:
                if pid in fetched:
                    entry = fetched[pid]
                else:
                    entry = self._tiers[0].entries[pid]
                    self._tiers[0].entries.move_to_end(pid)
                self._wait_compute(entry)
                rows.append(entry.buf)
            pos = {pid: j for j, pid in enumerate(uniq)}
            stacked = torch.stack(rows)  # (u, page_bytes) on the compute device
            out = self.codec.decode(stacked, dtype)  # (u, *page_shape)
            if len(uniq) != len(arr):
                out = out[torch.as_tensor([pos[i] for i in arr.tolist()], device=out.device)]
            self._moved["output"] += len(arr) * self.page_bytes
        return out.to(target) if target != self.device else out

    def prefetch(self, ids: Any) -> int:
        """Start moving ``ids`` to the device tier (async on CUDA); unknown ids are ignored. Returns pages moved."""
        arr = np.asarray(ids.cpu() if torch.is_tensor(ids) else ids, dtype=np.int64).reshape(-1)
        with self._lock:
            uniq = [i for i in dict.fromkeys(arr.tolist()) if self._where.get(i, 0) != 0]
            if not uniq or self._tiers[0].slots == 0:
                return 0
            uniq = uniq[: self._tiers[0].slots]
            fetched = self._fetch(uniq, set(uniq))
            return sum(1 for i in fetched if self._where.get(i) == 0)

    def offload(self, ids: Any = None) -> int:
        """Move pages (default: all) off the device tier to host/disk, e.g. to free accelerator memory."""
        with self._lock:
            dev = self._tiers[0]
            todo = list(dev.entries) if ids is None else [
                i for i in np.asarray(ids, np.int64).reshape(-1).tolist() if self._where.get(i) == 0]
            below = next((u for u in (1, 2) if self._tiers[u].slots > 0), None)
            moved = 0
            for pid in todo:
                if below is None or not self._make_room(below):
                    break
                self._place(below, pid, self._take(pid), "device")
                moved += 1
            return moved

    def remove(self, ids: Any) -> int:
        """Drop pages; unknown ids are ignored. Returns how many were stored."""
        arr = as_ids(ids)
        with self._lock:
            n = 0
            for pid in arr.tolist():
                if pid in self._where:
                    t = self._where.pop(pid)
                    if t == 2:
                        self._tiers[2].pop(pid)  # type: ignore[attr-defined]
                    else:
                        self._tiers[t].entries.pop(pid)
                    n += 1
            return n

    def __contains__(self, item: object) -> bool:
        return isinstance(item, (int, np.integer)) and int(item) in self._where

    def __len__(self) -> int:
        return len(self._where)

    def ids(self) -> np.ndarray:
        with self._lock:
            return np.asarray(sorted(self._where), dtype=np.int64)

    def tier_of(self, page_id: int) -> str | None:
        t = self._where.get(int(page_id))
        return None if t is None else TIERS[t]

    def stats(self) -> dict[str, Any]:
        """Resident/peak bytes, pages, hits and misses per tier; bytes moved between tiers; page count."""
        with self._lock:
            tiers = {t.name: {"budget_bytes": t.budget, "resident_bytes": t.resident, "peak_bytes": t.peak,
                              "pages": len(t.entries), "capacity_pages": t.slots, "hits": t.hits,
                              "misses": t.misses} for t in self._tiers}
            tiers["disk"]["file_bytes"] = self._tiers[2].file_bytes  # type: ignore[attr-defined]
            dev = self._tiers[0]
            return {"pages": len(self._where), "page_bytes": self.page_bytes, "page_shape": list(self.page_shape),
                    "dtype": self.config.dtype, "device": str(self.device), "gets": self._gets,
                    "device_hit_rate": dev.hits / max(1, dev.hits + dev.misses), "tiers": tiers,
                    "bytes_moved": dict(self._moved)}

    def reset(self) -> None:
        """Drop every page and zero the statistics (budgets and dtype stay)."""
        with self._lock:
            self._tiers[2].close()  # type: ignore[attr-defined]
            self._init_tiers()

    def close(self) -> None:
        self.reset()

    # ------------------------------------------------------------------ persistence
    def _lru_order(self) -> list[int]:
        """Every id, least recently used first (disk, then host, then device)."""
        return [i for t in reversed(self._tiers) for i in t.entries]

    def _page_bytes_cpu(self, pid: int) -> np.ndarray:
        t = self._where[pid]
        if t == 2:
            buf = torch.empty(self.page_bytes, dtype=torch.uint8)
            self._tiers[2].read_into(pid, buf)  # type: ignore[attr-defined]
            return buf.numpy()
        entry = self._tiers[t].entries[pid]
        if entry.buf.device.type == "cuda":
            if entry.event is not None:
                entry.event.synchronize()
            return entry.buf.cpu().numpy()
        return self._host_numpy(entry)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write every page (encoded) to directory ``path`` atomically: safetensors shards + kvstore.json.

        ``path`` must be new, empty, or a previous memkit save (anything else raises SaveTargetError)."""
        with atomic_save(path, "a K/V store") as tmp:
            self.save_into(tmp)

    def save_into(self, directory: Path) -> None:
        """Write the pages into an existing (empty) directory; used by MemoryManager.save."""
        from safetensors.numpy import save_file

        directory = Path(directory)
        with self._lock:
            order = self._lru_order()
            per = max(1, SHARD_BYTES // self.page_bytes)
            shards: list[dict[str, Any]] = []
            for s in range(0, max(len(order), 1), per):
                chunk = order[s : s + per]
                data = np.empty((len(chunk), self.page_bytes), np.uint8)
                for j, pid in enumerate(chunk):
                    data[j] = self._page_bytes_cpu(pid)
                name = f"pages-{len(shards):05d}.safetensors"
                save_file({"ids": np.asarray(chunk, np.int64), "pages": data}, str(directory / name))
                shards.append({"file": name, "count": len(chunk)})
            meta = {"format": FORMAT, "version": FORMAT_VERSION, "page_shape": list(self.page_shape),
                    "dtype": self.codec.dtype, "int8_scale": self.codec.int8_scale, "page_bytes": self.page_bytes,
                    "count": len(order), "order": "lru_first", "shards": shards}
            meta["files"] = file_digests(directory)
            write_json(directory / META_FILE, meta)

    def load(self, path: str | os.PathLike[str]) -> None:
        """Replace the contents with a directory written by :meth:`save` (no code is executed).

        Pages saved in another storage dtype are re-encoded. A different page shape raises
        IncompatibleMemoryError; a missing or damaged file raises CorruptFileError. Either way, and on
        CapacityError, the store keeps what it held.
        """
        from safetensors import safe_open

        directory = save_path(path, "loading a K/V store")
        meta = read_meta(directory)
        if tuple(meta["page_shape"]) != self.page_shape:
            raise IncompatibleMemoryError(
                f"saved pages have shape {tuple(meta['page_shape'])} but this store holds {self.page_shape} "
                "(layers, 2, kv_heads, chunk, head_dim); load them into a store built for the same model and chunk_size"
            )
        saved = PageCodec(self.page_shape, meta["dtype"], meta.get("int8_scale", "channel"))
        if saved.page_bytes != meta["page_bytes"]:
            raise CorruptFileError(f"{directory / META_FILE}: page_bytes does not match page_shape and dtype")
        if meta["count"] > self.capacity_pages:
            raise CapacityError(f"the saved store holds {meta['count']} pages but this store's budgets hold "
                                f"{self.capacity_pages}; raise KVStoreConfig.host_bytes or set disk_dir")
        ids_all: list[np.ndarray] = []
        try:
            for shard in meta["shards"]:
                with safe_open(str(directory / shard["file"]), framework="np") as f:
                    shard_ids = f.get_tensor("ids")
                if shard_ids.dtype != np.int64 or shard_ids.ndim != 1:
                    raise CorruptFileError(f"{shard['file']} holds ids that are not a 1-d int64 array")
                ids_all.append(shard_ids)
        except CorruptFileError:
            raise
        except Exception as exc:
            raise CorruptFileError(f"could not read K/V pages in {directory}: {exc}") from exc
        order = np.concatenate(ids_all) if ids_all else np.empty(0, np.int64)
        if len(order) != meta["count"] or len(np.unique(order)) != len(order) or (order < 0).any():
            raise CorruptFileError(f"{directory}: page ids are inconsistent with {META_FILE}; the save is corrupted")
        with self._lock:
            old = (self._tiers, self._where, self._moved, self._gets)
            self._init_tiers()
            try:
                n = len(order)
                n_dev = min(n, self._tiers[0].slots)
                n_host = min(n - n_dev, self._tiers[1].slots)
                first_tier = [2] * (n - n_dev - n_host) + [1] * n_host + [0] * n_dev  # order is LRU first
                k = 0
                for shard in meta["shards"]:
                    with safe_open(str(directory / shard["file"]), framework="pt") as f:
                        pages = f.get_tensor("pages")
                        sids = f.get_tensor("ids").tolist()
                    if tuple(pages.shape) != (len(sids), saved.page_bytes) or pages.dtype != torch.uint8:
                        raise CorruptFileError(f"{shard['file']} holds pages of the wrong shape or dtype")
                    if saved.dtype != self.codec.dtype or saved.int8_scale != self.codec.int8_scale:
                        pages = self.codec.encode(saved.decode(pages))
                    for j, pid in enumerate(sids):
                        self._insert(int(pid), Entry(pages[j].clone()), "input", top=first_tier[k])
                        k += 1
            except Exception as exc:
                self._tiers[2].close()  # type: ignore[attr-defined]
                self._tiers, self._where, self._moved, self._gets = old
                if isinstance(exc, CorruptFileError):
                    raise
                raise CorruptFileError(f"could not load K/V pages from {directory}: {exc}") from exc
            old[0][2].close()  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return (f"KVStore(page_shape={self.page_shape}, dtype={self.config.dtype!r}, device={self.device}, "
                f"pages={len(self)})")
