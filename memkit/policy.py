"""Memory update (eviction) policies, registered by name: ``fifo``, ``lru``, ``recency_frequency``.

A policy only *chooses*: the memory manager tells it what was added, retrieved and removed, asks
``evict(n)`` for victims when a namespace goes over ``MemoryConfig.capacity_tokens``, and removes the
victims itself (then calls ``on_remove``). State is a JSON-able dict so it is saved with the memory.

``recency_frequency`` is MemLong's dynamic memory update (Liu et al. 2024, "MemLong: Memory-Augmented
Retrieval for Long Text Modeling", Sec. 3.3) run for real — the official code advertises it but its
live path drops the oldest half of memory. Here: the newest ``protect_recent`` fraction of chunks is
never a victim while older chunks remain; among the older ones the least-retrieved go first, and the
oldest breaks ties. ``lru`` is the block-cache policy of InfLLM (Xiao et al. 2024).

    >>> p = make_policy("recency_frequency", protect_recent=0.5)
    >>> p.on_add([0, 1, 2, 3]); p.on_retrieve([0])
    >>> p.evict(1).tolist()   # 2 and 3 are protected; 1 was never retrieved, 0 was
    [1]
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from memkit._arrays import as_ids
from memkit.errors import ConfigError, CorruptFileError, InvalidInputError, UnknownParameterError
from memkit.registry import Registry

__all__ = ["EvictionPolicy", "POLICIES", "make_policy", "register_policy", "available_policies",
           "FIFOPolicy", "LRUPolicy", "RecencyFrequencyPolicy"]

def register_policy(name: str) -> Callable[[type[EvictionPolicy]], type[EvictionPolicy]]:
    """Class decorator: register an :class:`EvictionPolicy` subclass under a lowercase name (in :data:`POLICIES`)."""

    def deco(cls: type[EvictionPolicy]) -> type[EvictionPolicy]:
        POLICIES.register(name, cls)
        cls.name = name
        return cls

    if not isinstance(name, str) or not name or name != name.lower():
        raise ConfigError(f"policy names are non-empty lowercase strings, got {name!r}")
    return deco


def available_policies() -> list[str]:
    return POLICIES.names()


def make_policy(name: str, **kw: Any) -> EvictionPolicy:
    """Create a policy by registry name, e.g. ``make_policy("lru")``."""
    if not isinstance(name, str):
        raise ConfigError(f"a policy name is a string like 'lru', got {name!r}")
    cls = POLICIES.get(name)
    accepted = set(cls.params)
    unknown = sorted(set(kw) - accepted)
    if unknown:
        raise UnknownParameterError(f"policy {name!r} does not accept {unknown}; it accepts {sorted(accepted)}")
    return cls(**kw)


class EvictionPolicy(ABC):
    """Tracks chunk ids and picks eviction victims. Thread-safe; ids are int64 chunk ids."""

    name: ClassVar[str] = "base"
    params: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._lock = threading.RLock()

    # hooks -------------------------------------------------------------
    @abstractmethod
    def _add(self, ids: list[int]) -> None: ...
    @abstractmethod
    def _retrieve(self, ids: list[int]) -> None: ...
    @abstractmethod
    def _remove(self, ids: list[int]) -> None: ...
    @abstractmethod
    def _order(self) -> list[int]:
        """All tracked ids, first victim first."""
    @abstractmethod
    def _state(self) -> dict[str, Any]: ...
    @abstractmethod
    def _load_state(self, state: dict[str, Any]) -> None: ...
    @abstractmethod
    def __len__(self) -> int: ...
    @abstractmethod
    def __contains__(self, item: object) -> bool: ...

    # public API --------------------------------------------------------
    def on_add(self, ids: Any) -> None:
        """Chunks were stored (in this order: later = newer). Re-adding an id makes it new again."""
        arr = as_ids(ids).tolist()
        with self._lock:
            self._remove([i for i in arr if i in self])
            self._add(arr)

    def on_retrieve(self, ids: Any) -> None:
        """Chunks were returned by a retrieval. Unknown ids are ignored; repeats count each time."""
        arr = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids, dtype=np.int64).reshape(-1)
        with self._lock:
            self._retrieve([int(i) for i in arr if int(i) in self])

    def on_remove(self, ids: Any) -> None:
        """Chunks left memory. Unknown ids are ignored."""
        arr = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids, dtype=np.int64).reshape(-1)
        with self._lock:
            self._remove([int(i) for i in arr if int(i) in self])

    def evict(self, n: int) -> np.ndarray:
        """Choose up to ``n`` victims, first victim first, as (<=n,) int64. Does not remove them."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise InvalidInputError(f"evict(n) needs an integer n >= 0, got {n!r}")
        with self._lock:
            return np.asarray(self._order()[: int(n)], dtype=np.int64)

    def ids(self) -> np.ndarray:
        """Tracked ids, first victim first."""
        with self._lock:
            return np.asarray(self._order(), dtype=np.int64)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: name, constructor params and the tracked ids with their bookkeeping."""
        with self._lock:
            return {"name": self.name, "params": {p: getattr(self, p) for p in self.params}, **self._state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output. Raises CorruptFileError (state unchanged) if malformed."""
        if not isinstance(state, dict) or state.get("name") != self.name:
            got = state.get("name") if isinstance(state, dict) else type(state).__name__
            raise CorruptFileError(
                f"policy state is for {got!r}, not {self.name!r}; create the policy with make_policy({got!r})"
            )
        with self._lock:
            backup, backup_params = self._state(), {p: getattr(self, p) for p in self.params}
            try:
                saved = {p: v for p, v in dict(state.get("params") or {}).items() if p in self.params}
                checked = type(self)(**saved) if saved else None  # validates the values (ConfigError if bad)
                for p in saved:
                    setattr(self, p, getattr(checked, p))
                self._load_state(state)
            except (KeyError, TypeError, ValueError) as exc:
                self._load_state(backup)
                for p, v in backup_params.items():
                    setattr(self, p, v)
                raise CorruptFileError(f"policy state for {self.name!r} is malformed ({exc})") from exc

    def reset(self) -> None:
        with self._lock:
            self._remove(list(self._order()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)})"


def _int_list(x: Any, name: str) -> list[int]:
    if not isinstance(x, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in x):
        raise ValueError(f"{name} must be a list of integers")
    return list(x)


POLICIES: Registry[type[EvictionPolicy]] = Registry("policy", base=EvictionPolicy)


class _OrderedPolicy(EvictionPolicy):
    """Keeps ids in an OrderedDict: the first key is the first victim."""

    def __init__(self) -> None:
        super().__init__()
        self._od: OrderedDict[int, None] = OrderedDict()

    def _add(self, ids: list[int]) -> None:
        for i in ids:
            self._od[i] = None

    def _remove(self, ids: list[int]) -> None:
        for i in ids:
            self._od.pop(i, None)

    def _order(self) -> list[int]:
        return list(self._od)

    def _state(self) -> dict[str, Any]:
        return {"order": list(self._od)}

    def _load_state(self, state: dict[str, Any]) -> None:
        order = _int_list(state["order"], "order")
        if len(set(order)) != len(order):
            raise ValueError("order has duplicate ids")
        self._od = OrderedDict.fromkeys(order)

    def __len__(self) -> int:
        return len(self._od)

    def __contains__(self, item: object) -> bool:
        return item in self._od


@register_policy("fifo")
class FIFOPolicy(_OrderedPolicy):
    """First in, first out: the oldest stored chunk goes first; retrieval changes nothing."""

    def _retrieve(self, ids: list[int]) -> None:
        pass


@register_policy("lru")
class LRUPolicy(_OrderedPolicy):
    """Least recently used: a retrieval (or a store) makes a chunk the last victim."""

    def _retrieve(self, ids: list[int]) -> None:
        for i in ids:
            self._od.move_to_end(i)


@register_policy("recency_frequency")
class RecencyFrequencyPolicy(EvictionPolicy):
    """MemLong's dynamic memory update: protect the newest, then evict the least retrieved, oldest first.

    With N chunks tracked, the newest ``floor(protect_recent * N)`` are protected. Victims are the
    other chunks ordered by (retrieval count ascending, insertion time ascending). If more victims
    are asked for than there are unprotected chunks, the protected ones follow, oldest first, so a
    capacity can always be met.
    """

    params = ("protect_recent",)

    def __init__(self, protect_recent: float = 0.5) -> None:
        super().__init__()
        if isinstance(protect_recent, bool) or not isinstance(protect_recent, (int, float)) or not (
            0.0 <= float(protect_recent) < 1.0
        ):
            raise ConfigError(f"protect_recent must be a number in [0, 1), got {protect_recent!r}")
        self.protect_recent = float(protect_recent)
        self._added: dict[int, int] = {}  # id -> insertion clock (larger = newer)
        self._count: dict[int, int] = {}  # id -> times retrieved
        self._clock = 0

    def _add(self, ids: list[int]) -> None:
        for i in ids:
            self._added[i] = self._clock
            self._count[i] = 0
            self._clock += 1

    def _retrieve(self, ids: list[int]) -> None:
        for i in ids:
            self._count[i] += 1

    def _remove(self, ids: list[int]) -> None:
        for i in ids:
            self._added.pop(i, None)
            self._count.pop(i, None)

    def _order(self) -> list[int]:
        n = len(self._added)
        if n == 0:
            return []
        ids = np.fromiter(self._added.keys(), np.int64, n)
        added = np.fromiter(self._added.values(), np.int64, n)
        count = np.fromiter((self._count[i] for i in self._added), np.int64, n)
        by_age = np.argsort(added, kind="stable")  # oldest first
        n_protect = math.floor(self.protect_recent * n)
        old, young = by_age[: n - n_protect], by_age[n - n_protect :]
        old = old[np.lexsort((added[old], count[old]))]  # count asc, then oldest first
        return ids[np.concatenate([old, young])].tolist()

    def retrieval_count(self, chunk_id: int) -> int:
        with self._lock:
            return self._count.get(int(chunk_id), 0)

    def _state(self) -> dict[str, Any]:
        ids = list(self._added)
        return {"ids": ids, "added": [self._added[i] for i in ids], "counts": [self._count[i] for i in ids],
                "clock": self._clock}

    def _load_state(self, state: dict[str, Any]) -> None:
        ids = _int_list(state["ids"], "ids")
        added = _int_list(state["added"], "added")
        counts = _int_list(state["counts"], "counts")
        clock = state["clock"]
        if not (len(ids) == len(added) == len(counts)) or len(set(ids)) != len(ids):
            raise ValueError("ids/added/counts differ in length or ids repeat")
        if not isinstance(clock, int) or (added and clock <= max(added)) or any(c < 0 for c in counts):
            raise ValueError("clock or counts out of range")
        self._added, self._count, self._clock = dict(zip(ids, added)), dict(zip(ids, counts)), clock

    def __len__(self) -> int:
        return len(self._added)

    def __contains__(self, item: object) -> bool:
        return item in self._added
