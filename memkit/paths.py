"""How memkit reads a path the user gives it: ``~`` and environment variables are expanded, once, here.

One policy for every path memkit takes (a K/V store's ``disk_dir``, save and load directories, ``disk://``,
``qdrant://`` and ``milvus://`` URIs, a bank's ``path`` parameter, config files): ``~`` and ``~user`` become
the home directory, ``$NAME`` and ``${NAME}`` the variable's value, as a shell would expand them. A reference
that cannot be expanded (an unset variable, an unknown user) is refused with the name it could not resolve,
because taking it literally would create a directory called ``~`` or ``$HOME`` in the working directory. For the
same reason a path with a directory named exactly ``~`` anywhere inside it (``./~``, ``data/~/x``) is refused.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from memkit.errors import ConfigError, InvalidInputError, MemkitError

__all__ = ["user_path", "expand_text", "check_dir_target"]

_VARIABLE = re.compile(r"\$(\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*)")


def expand_text(text: str, what: str, *, error: type[MemkitError] = InvalidInputError) -> str:
    """``text`` with ``~``/``~user`` and ``$NAME``/``${NAME}`` expanded; an unresolved one raises ``error``."""
    out = os.path.expanduser(text)
    if out.startswith("~"):
        user = out[1:].split(os.sep, 1)[0]
        raise error(f"{what}: {text!r} starts with ~{user}, but there is no user {user!r} on this machine; give the "
                    "directory in full")
    if "$" in out:
        out = os.path.expandvars(out)
        left = _VARIABLE.search(out)
        if left:
            name = left.group(1).strip("{}")
            raise error(f"{what}: {text!r} uses the environment variable ${name}, which is not set; set it or give "
                        "the path in full (memkit expands ~ and $VARIABLES in paths, and never takes them literally)")
    return out


def user_path(value: Any, what: str, *, error: type[MemkitError] = InvalidInputError) -> Path:
    """A path the user gave (str, bytes or os.PathLike) as a :class:`Path`, ``~`` and variables expanded.

    Refuses (with ``error``) what is not a path: None, "", whitespace, a NUL byte, another type."""
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if not isinstance(value, (str, os.PathLike)):
        raise error(f"{what} needs a path (str or pathlib.Path), got {type(value).__name__}")
    text = os.fspath(value)
    if not isinstance(text, str) or not text.strip() or "\0" in text:
        raise error(f"{what} needs a non-empty path, got {text!r}")
    path = Path(expand_text(text, what, error=error))
    if "~" in path.parts:
        raise error(f"{what}: {text!r} has a directory named '~' inside it; a directory called ~ is easily taken for "
                    "the home directory (rm -rf ~). memkit expands ~ only at the start of a path; choose another name")
    return path


def check_dir_target(path: Path, what: str, *, is_ours: Any = None) -> None:
    """Refuse, without writing anything, a directory ``what`` cannot be created or used at ``path``.

    ``path`` must be a directory or creatable as one (no file in its place or on the way to it). With ``is_ours``
    (a callable taking the directory), an existing non-empty directory is accepted only when ``is_ours`` says it
    holds what ``what`` itself writes: memkit never writes its files beside a user's."""
    probe = path
    while not os.path.lexists(probe):
        if probe.parent == probe:
            return
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file, not a directory" if probe == path else f"cannot be a directory: {str(probe)!r} is a file"
        raise ConfigError(f"{what}: {str(path)!r} {where}; give a directory path")
    if probe != path or is_ours is None:
        return
    try:
        entries = sorted(p.name for p in path.iterdir())
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {str(path)!r} ({exc.strerror}); choose another directory") from exc
    if entries and not is_ours(path):
        raise ConfigError(f"{what}: {str(path)!r} is a non-empty directory that {what} did not write (it holds "
                          f"{', '.join(entries[:3])}...); memkit never writes beside your files. Give a new or empty "
                          "directory, or one it wrote before")
