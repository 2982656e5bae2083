"""One registration mechanism for every pluggable part: banks, eviction policies, styles and retrievers.

A :class:`Registry` maps a lowercase name to an entry: the object itself (a class or factory) or a lazy
``"package.module:attr"`` path that is imported on first use, with the pip extra that provides its library
(fsspec's ``known_implementations``). Entries may carry metadata (a style's config class, say). The same
object registers as a decorator (peft's ``register_peft_method``, torchao's handler registry)::

    POLICIES = Registry("policy", base=EvictionPolicy)

    @POLICIES.register("fifo")
    class FIFOPolicy(EvictionPolicy): ...

    BACKENDS.register("faiss-flat", "memkit.backends.faiss_bank:FaissFlatBank", extra="faiss")
    BACKENDS.get("faiss-flat")       # imports faiss_bank now; MissingDependencyError names `memkit[faiss]`

Each registry lives beside its kind (``memkit.bank.BACKENDS``, ``memkit.policy.POLICIES``,
``memkit.styles.STYLES``, ``memkit.retrievers.RETRIEVERS``) and keeps that kind's public helpers
(``register_backend``, ``register_policy``, ``register_style``, ``register_retriever``).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from memkit.errors import ConfigError, MissingDependencyError

__all__ = ["Registry", "Entry"]

T = TypeVar("T")


@dataclass
class Entry:
    """One registered name: the object (once imported), or where to import it from."""

    name: str
    obj: Any = None
    path: str | None = None  # "package.module:attr", imported on first use
    extra: str | None = None  # pip extra that installs the library the path needs
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Lowercase name -> object, lazily imported; see the module docstring."""

    def __init__(self, kind: str, *, base: type | None = None, check: Callable[[Any], bool] | None = None,
                 entry_point_group: str | None = None, unknown_error: type[Exception] = ConfigError,
                 hint: str = "") -> None:
        self.kind = kind
        self.hint = hint  # appended to the unknown-name error, e.g. how to register one
        self.base = base
        self.check = check
        self.entry_point_group = entry_point_group
        self.unknown_error = unknown_error
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self._entry_points_loaded = entry_point_group is None

    # ------------------------------------------------------------------ registering
    def register(self, name: str, obj: Any = None, *, extra: str | None = None, **meta: Any) -> Any:
        """Register ``obj`` (an object or a lazy ``"module:attr"`` path) under ``name``; without ``obj``, a decorator."""
        if not isinstance(name, str) or not name or name != name.lower():
            raise ConfigError(f"{self.kind} names are non-empty lowercase strings, got {name!r}")
        if obj is None:
            def deco(target: Any) -> Any:
                self.register(name, target, extra=extra, **meta)
                return target
            return deco
        if isinstance(obj, str):
            if ":" not in obj:
                raise ConfigError(f"a lazy {self.kind} path looks like 'package.module:attr', got {obj!r}")
            entry = Entry(name, path=obj, extra=extra, meta=dict(meta))
        else:
            self._validate(name, obj)
            entry = Entry(name, obj=obj, extra=extra, meta=dict(meta))
        with self._lock:
            self._entries[name] = entry
        return obj

    def _validate(self, name: str, obj: Any) -> None:
        ok = (isinstance(obj, type) and issubclass(obj, self.base)) if self.base is not None else True
        if ok and self.check is not None:
            ok = self.check(obj)
        if not ok:
            want = f"a {self.base.__name__} subclass" if self.base is not None else f"a valid {self.kind}"
            raise ConfigError(f"{self.kind} {name!r} must be {want} or a 'module:attr' path, got {obj!r}")

    # ------------------------------------------------------------------ looking up
    def refresh(self) -> None:
        """Read the entry-point group again on next use (after installing a package that adds entries)."""
        self._entry_points_loaded = self.entry_point_group is None

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        from importlib.metadata import entry_points

        assert self.entry_point_group is not None
        for ep in entry_points(group=self.entry_point_group):
            if ep.name not in self._entries:
                self._entries[ep.name] = Entry(ep.name, path=ep.value)

    def names(self) -> list[str]:
        """Every registered name (installed or not), sorted."""
        self._load_entry_points()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return isinstance(name, str) and name.lower() in self._entries

    def entry(self, name: str) -> Entry:
        self._load_entry_points()
        key = name.lower() if isinstance(name, str) else name
        entry = self._entries.get(key)
        if entry is None:
            raise self.unknown_error(f"unknown {self.kind} {name!r}; known {self.kind} names: {self.names()}"
                                     + (f" ({self.hint})" if self.hint else ""))
        return entry

    def meta(self, name: str) -> dict[str, Any]:
        return dict(self.entry(name).meta)

    def get(self, name: str) -> T:
        """The registered object, importing it now if it was registered by path."""
        entry = self.entry(name)
        if entry.obj is not None:
            return entry.obj  # type: ignore[no-any-return]
        assert entry.path is not None
        module_name, _, attr = entry.path.partition(":")
        try:
            module = importlib.import_module(module_name)
        except MissingDependencyError:
            raise
        except ImportError as exc:
            hint = f"pip install 'memkit[{entry.extra}]'" if entry.extra else f"install the package providing {module_name}"
            raise MissingDependencyError(f"{self.kind} {name!r} needs a library that is not installed ({exc}); "
                                         f"{hint}") from exc
        obj = getattr(module, attr, None)
        if obj is None:
            raise ConfigError(f"{entry.path} does not exist: the {self.kind} {name!r} is registered wrongly")
        self._validate(name, obj)
        entry.obj = obj
        return obj  # type: ignore[no-any-return]

    def forget(self, name: str) -> None:
        """Drop the imported object of a lazily registered entry (it is imported again on next use)."""
        entry = self._entries.get(name)
        if entry is not None and entry.path is not None:
            entry.obj = None

