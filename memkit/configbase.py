"""What every memkit config dataclass shares: the dict/JSON/YAML round trip and the field validators.

Config is data (peft's ``PeftConfig``, torchao's configs): each config is a dataclass whose defaults carry their
reason inline and whose ``__post_init__`` validates every field with the helpers below, so a bad value fails
where it is given, with a :class:`~memkit.errors.ConfigError` that says what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from memkit.errors import ConfigError, MissingDependencyError, UnknownParameterError
from memkit.paths import user_path

__all__ = ["ConfigBase", "check_choice", "check_positive", "check_bool", "check_number", "read_mapping",
           "is_cosine_setting"]

C = TypeVar("C", bound="ConfigBase")


class ConfigBase:
    """Shared dict/JSON/YAML round trip. Subclasses are dataclasses; ``nested`` names sub-config fields."""

    nested: ClassVar[dict[str, type[ConfigBase]]] = {}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, ConfigBase) else _plain(value)
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise UnknownParameterError(f"{cls.__name__} has no field(s) {unknown}; valid fields are {sorted(names)}")
        kwargs = dict(data)
        for name, sub in cls.nested.items():
            if isinstance(kwargs.get(name), dict):
                kwargs[name] = sub.from_dict(kwargs[name])
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        """Write the config as JSON (``.json``) or YAML (``.yaml``/``.yml``)."""
        path = user_path(path, "saving a config", error=ConfigError)
        data = self.to_dict()
        if path.suffix in (".yaml", ".yml"):
            path.write_text(_yaml().safe_dump(data, sort_keys=False))
        else:
            path.write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        """Read a config written by :meth:`save` (JSON or YAML; never executes code)."""
        return cls.from_dict(read_mapping(path))

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def _yaml() -> Any:
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - pyyaml is a core dependency
        raise MissingDependencyError("YAML configs need PyYAML: pip install pyyaml") from exc
    return yaml


def read_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file holding a mapping (never executes code). ``~`` and ``$VARIABLES`` in the path are
    expanded (:mod:`memkit.paths`); a key written twice in one mapping is refused, not silently last-wins."""
    if not isinstance(path, (str, Path)) or not str(path):
        raise ConfigError(f"a config file path must be a non-empty str or Path, got {path!r}")
    path = user_path(path, "config file", error=ConfigError)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; pass the path of a .yaml or .json file in it")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass a path to a .yaml or .json file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"could not read config file {str(path)!r}: {exc}") from exc
    try:
        data = _yaml().load(text, Loader=_unique_key_loader()) if path.suffix in (".yaml", ".yml") else \
            json.loads(text, object_pairs_hook=_unique_pairs)
    except ConfigError as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc}") from exc
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError
        raise ConfigError(f"could not parse config file {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at top level")
    return data


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON object hook: a key written twice is an error (json keeps the last one silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"key {key!r} is written twice in one mapping; keep one")
        out[key] = value
    return out


_LOADER: Any = None


def _unique_key_loader() -> Any:
    """yaml.SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last one silently)."""
    global _LOADER
    if _LOADER is None:
        yaml = _yaml()

        class UniqueKeyLoader(yaml.SafeLoader):  # type: ignore[misc, name-defined]
            def construct_mapping(self, node: Any, deep: bool = False) -> Any:
                seen: set[Any] = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: merged keys may be overridden
                        continue
                    key = self.construct_object(key_node, deep=deep)
                    try:
                        twice = key in seen
                    except TypeError:  # an unhashable key: SafeLoader itself refuses it below
                        continue
                    if twice:
                        raise ConfigError(f"key {key!r} is written twice in one mapping (line "
                                          f"{key_node.start_mark.line + 1}); keep one")
                    seen.add(key)
                return super().construct_mapping(node, deep=deep)

        _LOADER = UniqueKeyLoader
    return _LOADER


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {list(choices)}")


def check_positive(name: str, value: Any, *, allow_zero: bool = False, allow_none: bool = False,
                   maximum: int | None = None) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ConfigError(f"{name} must be an integer {bound}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}={value:,} is above memkit's limit of {maximum:,}")


def check_bool(name: str, value: Any) -> None:
    """Booleans only: "no" and 0 are not booleans (a non-empty string is truthy)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigError(f"{name}={value} must be {'>' if low_open else '>='} {low}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ConfigError(f"{name}={value} must be {'<' if high_open else '<='} {high}")


def is_cosine_setting(value: Any) -> bool:
    """A max-similarity setting: None (off), "auto", or a cosine in (-1, 1]."""
    if value is None or value == "auto":
        return True
    return not isinstance(value, bool) and isinstance(value, (int, float)) and -1.0 < value <= 1.0
